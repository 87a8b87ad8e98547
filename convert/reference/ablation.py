"""The PyTorch reference for head ablation and audio masking (`mlx_listen.interp.ablation`), with forward
hooks on transformers' Qwen2-Audio: what the MLX side computes, done the plain PyTorch way.

- output ablation: a forward pre-hook on the layer's `o_proj`, whose input is the heads' outputs
  side by side (B, L, heads * head_dim): the selected heads' slices are zeroed, scaled or replaced;
- audio masking: a forward pre-hook on `self_attn` that adds -inf to the selected heads' scores
  at the `<|AUDIO|>` keys (eager attention: `attn_weights + attention_mask`, then softmax).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np


@contextmanager
def ablated(model, heads: Sequence[tuple[int, int]], *, mode: str = "zero", factor: float = 0.0,
            means: dict | None = None, audio_positions=None):
    """Hooks on a transformers Qwen2AudioForConditionalGeneration for the duration of the block.
    `audio_positions` given: mask the heads' attention to those keys (needs eager attention)."""
    import torch

    lm = model.model.language_model
    cfg = lm.config
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    handles = []
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    for l, sel in by_layer.items():
        attn = lm.layers[l].self_attn
        if audio_positions is not None:
            if model.config._attn_implementation != "eager":
                raise ValueError("audio masking in the reference needs eager attention (load_hf(attn='eager'))")
            cols = torch.as_tensor(np.asarray(audio_positions), dtype=torch.long)

            def pre(module, args, kwargs, sel=sel, cols=cols):
                hs = kwargs["hidden_states"]
                mask = kwargs.get("attention_mask")
                B, L = hs.shape[:2]
                if mask is None:  # one decode row: every cached key visible
                    S = kwargs["cache"].get_seq_length(module.layer_idx) + L if kwargs.get("cache") is not None else L
                    mask = torch.zeros(B, 1, L, S, dtype=hs.dtype, device=hs.device)
                mask = mask.expand(B, H, L, mask.shape[-1]).clone()
                c = cols[cols < mask.shape[-1]].to(mask.device)
                for h in sel:
                    mask[:, h, :, c] = torch.finfo(mask.dtype).min
                kwargs["attention_mask"] = mask
                return args, kwargs

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def pre_o(module, args, sel=sel, l=l):
                (x,) = args
                x = x.clone().view(*x.shape[:-1], H, d)
                for h in sel:
                    if mode == "mean":
                        x[..., h, :] = torch.as_tensor(means[l][h], dtype=x.dtype, device=x.device)
                    else:
                        x[..., h, :] = x[..., h, :] * (0.0 if mode == "zero" else factor)
                return (x.view(*x.shape[:-2], H * d),)

            handles.append(attn.o_proj.register_forward_pre_hook(pre_o))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def head_means_hf(model, processor, prompts: Sequence[tuple], layers: Sequence[int]) -> dict[int, np.ndarray]:
    """Each head's mean o_proj input over every position of `prompts` ((clips, question) pairs)."""
    import torch

    from .hf import hf_inputs

    lm = model.model.language_model
    cfg = lm.config
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    total = {l: torch.zeros(H, d, dtype=torch.float64) for l in layers}
    n = 0
    for clips, question in prompts:
        inputs = hf_inputs(processor, clips, question).to(model.device)
        got = {}
        handles = [lm.layers[l].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(l, a[0][0].double().view(-1, H, d))) for l in layers]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for hd in handles:
                hd.remove()
        for l in layers:
            total[l] += got[l].sum(0).cpu()
        n += inputs["input_ids"].shape[1]
    return {l: (v / n).numpy() for l, v in total.items()}
