"""The PyTorch reference: run transformers' model of each family (Qwen2-Audio, Audio Flamingo 3, the
Qwen2.5-Omni thinker) on the same inputs and keep every number the MLX side computes (features,
encoder and projector outputs, each decoder layer's output, logits, greedy tokens), as numpy arrays.

Per family (`FAMILY`): the transformers class and how it is loaded, the name of its feature mask, the
modules whose outputs are the "encoder" and "projector" stages (Omni: `ln_post` and `proj` inside its
tower, whose outputs are the valid tokens already), and its in-memory weight names. Everything else
(the decoder at `model.model.language_model`, `lm_head`, the processor call) is the same for all three.

Needs the `reference` extra (torch, transformers). Used by the parity tests and the reference run;
the interventions' references are `ablation`, `patching` and `lens` beside this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mlx_listen.chat import messages_for

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_hf(path_or_repo) -> str:
    """A local folder, or a hub repo id through huggingface-hub's cache."""
    from pathlib import Path

    if Path(path_or_repo).exists():
        return str(path_or_repo)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(path_or_repo), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])


def revision_of(path_or_repo) -> str | None:
    """The hub commit of a cached snapshot (its folder name), or None for a plain folder."""
    from pathlib import Path

    p = Path(resolve_hf(path_or_repo)).resolve()
    return p.name if p.parent.name == "snapshots" else None


# model_type (config.json) -> (in-memory model_type, transformers class, feature-mask key, stage modules,
# MLX module-tree prefix -> transformers' in-memory prefix)
FAMILY = {
    "qwen2_audio": dict(kind="qwen2_audio", cls="Qwen2AudioForConditionalGeneration", mask="feature_attention_mask",
                        encoder="model.audio_tower", projector="model.multi_modal_projector", flat=False),
    "audioflamingo3": dict(kind="audioflamingo3", cls="AudioFlamingo3ForConditionalGeneration",
                           mask="input_features_mask", encoder="model.audio_tower",
                           projector="model.multi_modal_projector", flat=False),
    "qwen2_5_omni": dict(kind="qwen2_5_omni_thinker", cls="Qwen2_5OmniThinkerForConditionalGeneration",
                         mask="feature_attention_mask", encoder="model.audio_tower.ln_post",
                         projector="model.audio_tower.proj", flat=True),
}
IN_MEMORY = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("audio_tower.", "model.audio_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def family_of(model) -> dict:
    """The `FAMILY` entry of a loaded transformers model."""
    kind = model.config.model_type
    return next(f for f in FAMILY.values() if f["kind"] == kind)


def model_type_of(path) -> str | None:
    import json
    from pathlib import Path

    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def load_hf(path, dtype: str = "float32", device: str | None = None, attn: str = "sdpa"):
    """`(model, processor)` of a transformers checkpoint of any family (Omni: its thinker, as a hub
    checkpoint is loaded); `attn="eager"` makes `run` also record the per-head attention mass on the audio."""
    import torch
    import transformers
    from transformers import AutoProcessor

    path = resolve_hf(path)
    kind = model_type_of(path) or "qwen2_audio"
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    if kind == "qwen2_5_omni":
        from .tiny_families import load_omni

        model, processor = load_omni(path, dtype=torch_dtype, attn=attn)
        return model.to(pick_device(device)).eval(), processor
    cls = getattr(transformers, FAMILY[kind]["cls"])
    model = cls.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn).to(pick_device(device)).eval()
    return model, AutoProcessor.from_pretrained(path)


def hf_inputs(processor, clips: Sequence[np.ndarray], question: str, system: str | None = None):
    """The processor's inputs for one question about `clips` (16 kHz float arrays)."""
    text = processor.apply_chat_template(
        messages_for(question, len(clips), system), add_generation_prompt=True, tokenize=False
    )
    return processor(text=text, audio=list(clips), sampling_rate=16000, return_tensors="pt")


def module(model, dotted: str):
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


def stage_output(out):
    """A hooked module's output as a tensor (the tower returns a model output)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def valid_tokens(x, mask, flat: bool):
    """The kept audio tokens of every clip (every window for AF3), concatenated, as float32 numpy: rows of
    (rows, 750, d) cut to each row's valid length; Omni's stages hold the valid tokens already."""
    import torch

    if flat:
        return x.float().cpu().numpy()
    n_tok = [((n - 1) // 2 + 1 - 2) // 2 + 1 for n in mask.sum(-1).tolist()]
    return torch.cat([x[i, :n] for i, n in enumerate(n_tok)]).float().cpu().numpy()


def run(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None,
        max_new_tokens: int = 0) -> dict[str, np.ndarray]:
    """Every stage's output for one prompt, as float32/int numpy arrays (batch dim dropped)."""
    import torch

    fam = family_of(model)
    inputs = hf_inputs(processor, clips, question, system).to(model.device)
    features = inputs["input_features"].float().cpu().numpy()  # the extractor's fp32 output
    inputs["input_features"] = inputs["input_features"].to(model.dtype)
    lm = model.model.language_model
    grabbed: dict[str, object] = {}
    hooks = [
        module(model, fam["encoder"]).register_forward_hook(
            lambda m, a, o: grabbed.__setitem__("encoder", stage_output(o))),
        module(model, fam["projector"]).register_forward_hook(
            lambda m, a, o: grabbed.__setitem__("projector", o)),
    ]
    layer_out: list = []
    for layer in lm.layers:
        hooks.append(layer.register_forward_hook(
            lambda m, a, o: layer_out.append(o[0] if isinstance(o, tuple) else o)))
    eager = model.config._attn_implementation == "eager"  # attention weights need eager attention
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=eager)
    finally:
        for h in hooks:
            h.remove()

    mask = inputs[fam["mask"]]
    res = {
        "input_ids": inputs["input_ids"][0].cpu().numpy(),
        "input_features": features,  # (rows, 128, frames): a row per clip, or per window (AF3)
        "feature_attention_mask": mask.cpu().numpy(),  # (rows, frames)
        "encoder": valid_tokens(grabbed["encoder"], mask, fam["flat"]),
        "projector": valid_tokens(grabbed["projector"], mask, fam["flat"]),
        "hidden_states": torch.stack([h[0] for h in layer_out]).float().cpu().numpy(),
        "logits": out.logits[0].float().cpu().numpy(),
    }
    if eager:  # per layer and head, the attention mass on the audio at the last prompt position
        ids = inputs["input_ids"][0]
        audio = (ids == model.config.audio_token_id).nonzero()[:, 0]
        res["audio_mass"] = torch.stack([a[0, :, -1, audio].float().sum(-1) for a in out.attentions]).cpu().numpy()
    if max_new_tokens:
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        res["greedy_tokens"] = gen[0, inputs["input_ids"].shape[1]:].cpu().numpy()
    return res


def run_steered(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None, *,
                layers: Sequence[int], alpha: float, at: str = "all", max_new_tokens: int = 0) -> dict[str, np.ndarray]:
    """Audio–silence steering in PyTorch (forward hooks), the reference for `mlx_listen.steering`.

    d = mean over `layers` of (block output with the audio - with equal-length digital silence) at
    the last prompt position, in float32; α·d is added to the last decoder block's output at the
    last position of every forward call (`at="all"`: the prompt's last position, then each
    generated token) or of the first call only (`at="prompt"`).
    """
    d, inputs = audio_silence_direction(model, processor, clips, question, system, layers)
    return {"steer_direction": d.cpu().numpy(), **add_at_last_block(model, inputs, alpha * d, at, max_new_tokens)}


def _prepared(model, processor, audio, question, system):
    inputs = hf_inputs(processor, audio, question, system).to(model.device)
    inputs["input_features"] = inputs["input_features"].to(model.dtype)
    return inputs


def audio_silence_direction(model, processor, clips, question: str, system: str | None, layers: Sequence[int]):
    """d(x): mean over `layers` of (block output with the audio - with equal-length digital silence) at
    the last prompt position, in float32 (a torch tensor); and the prompt's inputs with the audio."""
    import torch

    lm = model.model.language_model

    def block_outputs(inputs) -> dict[int, "torch.Tensor"]:
        got, hooks = {}, []
        for l in layers:
            hooks.append(lm.layers[l].register_forward_hook(
                lambda m, a, o, l=l: got.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[0, -1].float())))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        return got

    inputs = _prepared(model, processor, list(clips), question, system)
    silent = _prepared(model, processor, [np.zeros_like(c) for c in clips], question, system)
    assert torch.equal(inputs["input_ids"], silent["input_ids"]), "silence changed the prompt"
    a, s = block_outputs(inputs), block_outputs(silent)
    return torch.stack([a[l] - s[l] for l in layers]).mean(0), inputs


def add_at_last_block(model, inputs, delta, at: str = "all", max_new_tokens: int = 0) -> dict[str, np.ndarray]:
    """`delta` added to the last decoder block's output at the last position of every forward call
    (`at="all"`) or of the first only (`at="prompt"`): the steered last logits and greedy tokens."""
    import torch

    calls = {"n": 0}

    def steer(module, args, output):
        calls["n"] += 1
        if at == "prompt" and calls["n"] > 1:
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1] += delta.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    hook = model.model.language_model.layers[-1].register_forward_hook(steer)
    try:
        with torch.no_grad():
            res = {"steered_logits_last": model(**inputs).logits[0, -1].float().cpu().numpy()}
            if max_new_tokens:
                calls["n"] = 0
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                res["steered_greedy_tokens"] = gen[0, inputs["input_ids"].shape[1]:].cpu().numpy()
    finally:
        hook.remove()
    return res


def option_logprobs_hf(model, processor, clips: Sequence[np.ndarray], question: str, continuations, system=None,
                       steer=None, at: str = "all") -> dict:
    """transformers' log-probabilities of answer continuations, the reference for `mlx_listen.scoring`.

    Each continuation (a string, tokenised without special tokens, or a list of token ids) is
    appended to the prompt and the whole sequence runs through the decoder in one forward pass; its
    score is the sum over its tokens of the float32 log-softmax of the logits at the position before
    each token (the last prompt position T for the first). The audio runs through the tower once:
    the decoder reads the input embeddings transformers merged for the prompt, followed by the
    continuation's token embeddings. `steer`: a delta (hidden,) added to the last decoder layer's
    output (forward hook) at T and every later position (`at="all"`) or at T only (`at="prompt"`).
    Returns {"ids": [list], "per_token": [float32 arrays], "sums": float64 array}.
    """
    import torch

    inputs = hf_inputs(processor, clips, question, system).to(model.device)
    inputs["input_features"] = inputs["input_features"].to(model.dtype)
    T = inputs["input_ids"].shape[1] - 1
    lm = model.model.language_model
    grabbed = {}
    grab = lm.register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.__setitem__("emb", kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        grab.remove()
    prompt_emb = grabbed["emb"]  # (1, T + 1, hidden): text embeddings with the audio merged in
    hook = None
    if steer is not None:
        d = torch.as_tensor(np.asarray(steer, np.float32), device=model.device)

        def edit(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            if at == "prompt":
                h[:, T] += d.to(h.dtype)
            else:
                h[:, T:] += d.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        hook = lm.layers[-1].register_forward_hook(edit)
    out = {"ids": [], "per_token": [], "sums": []}
    try:
        for c in continuations:
            ids = processor.tokenizer(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else list(c)
            cont = torch.tensor(ids, dtype=torch.long, device=model.device)
            emb = torch.cat([prompt_emb, lm.embed_tokens(cont)[None].to(prompt_emb.dtype)], dim=1)
            with torch.no_grad():
                h = lm(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long,
                                                                  device=model.device)).last_hidden_state
                logits = model.lm_head(h[0, T:T + len(ids)]).float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, cont[:, None])[:, 0].cpu().numpy()
            out["ids"].append(list(ids))
            out["per_token"].append(lp.astype(np.float32))
            out["sums"].append(float(lp.astype(np.float64).sum()))
    finally:
        if hook is not None:
            hook.remove()
    out["sums"] = np.array(out["sums"], np.float64)
    return out
