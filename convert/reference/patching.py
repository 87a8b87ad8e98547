"""Activation patching audio -> silence in PyTorch (forward hooks on transformers' Qwen2-Audio): the
reference for `mlx_listen.interp.patching`."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .hf import hf_inputs


def run_patched(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None, *,
                continuation: Sequence[int], layer: int, positions: Sequence[int],
                head: int | None = None) -> dict[str, np.ndarray]:
    """Activation patching audio -> silence in PyTorch (forward hooks), the reference for
    `mlx_listen.interp.patching`.

    The prompt is continued by `continuation` (token ids, teacher-forced: the prompt's ids and all
    but the last continuation token in one forward pass). The audio run records decoder layer
    `layer`'s output (`head` None; a forward hook) or the input of its `o_proj` for head `head`'s
    slice (a forward pre-hook: the per-head attention output) at the absolute `positions`; the run
    with equal-length digital silence then has those values written over its own. Returns, float32,
    the logits at the positions that predict each continuation token (k, vocab) of the audio run,
    the silence run and the patched silence run, and each one's log-probability of the continuation.
    """
    import torch

    lm = model.model.language_model
    cont = torch.tensor([int(t) for t in continuation], dtype=torch.long)
    pos = torch.tensor([int(p) for p in positions], dtype=torch.long)

    def prepared(audio):
        inputs = hf_inputs(processor, audio, question, system).to(model.device)
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        extra = cont[None, :-1].to(model.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        return inputs

    inputs = prepared(list(clips))
    silent = prepared([np.zeros_like(c) for c in clips])
    assert torch.equal(inputs["input_ids"], silent["input_ids"]), "silence changed the prompt"
    T = inputs["input_ids"].shape[1] - len(cont)  # the last prompt position
    k = len(cont)
    grabbed: dict[str, "torch.Tensor"] = {}
    if head is None:
        target = lm.layers[layer]

        def read(m, a, o):
            h = o[0] if isinstance(o, tuple) else o
            grabbed["v"] = h[0, pos].clone()

        def write(m, a, o):
            h = (o[0] if isinstance(o, tuple) else o).clone()
            h[0, pos] = grabbed["v"].to(h.dtype)
            return (h, *o[1:]) if isinstance(o, tuple) else h

        register = target.register_forward_hook
    else:
        target = lm.layers[layer].self_attn.o_proj
        d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
        d = getattr(model.config.text_config, "head_dim", None) or d
        cols = slice(head * d, (head + 1) * d)

        def read(m, args):
            grabbed["v"] = args[0][0, pos, cols].clone()

        def write(m, args):
            x = args[0].clone()
            x[0, pos, cols] = grabbed["v"].to(x.dtype)
            return (x, *args[1:])

        register = target.register_forward_pre_hook

    def logits_of(inp, hook=None):
        handle = register(hook) if hook is not None else None
        try:
            with torch.no_grad():
                return model(**inp).logits[0, T:T + k].float()
        finally:
            if handle is not None:
                handle.remove()

    audio = logits_of(inputs, read)
    silence = logits_of(silent)
    patched = logits_of(silent, write)
    res = {}
    for name, lg in (("audio", audio), ("silence", silence), ("patched", patched)):
        lp = torch.log_softmax(lg.double(), dim=-1)
        res[f"{name}_logits"] = lg.cpu().numpy()
        res[f"{name}_logp"] = float(lp[torch.arange(k), cont].sum())
    return res
