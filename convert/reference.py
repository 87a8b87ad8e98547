"""The PyTorch reference: run transformers' Qwen2-Audio on the same inputs and keep every number
the MLX side computes (features, encoder and projector outputs, each decoder layer's output,
logits, greedy tokens), as numpy arrays.

Needs the `reference` extra (torch, transformers). Used by the parity tests and the reference run.
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


def load_hf(path, dtype: str = "float32", device: str | None = None, attn: str = "sdpa"):
    """`attn="eager"` makes `run` also record the per-head attention mass on the audio."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    path = resolve_hf(path)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, TORCH_DTYPES[dtype]), attn_implementation=attn
    ).to(pick_device(device)).eval()
    return model, AutoProcessor.from_pretrained(path)


def hf_inputs(processor, clips: Sequence[np.ndarray], question: str, system: str | None = None):
    """The processor's inputs for one question about `clips` (16 kHz float arrays)."""
    text = processor.apply_chat_template(
        messages_for(question, len(clips), system), add_generation_prompt=True, tokenize=False
    )
    return processor(text=text, audio=list(clips), sampling_rate=16000, return_tensors="pt")


def run(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None,
        max_new_tokens: int = 0) -> dict[str, np.ndarray]:
    """Every stage's output for one prompt, as float32/int numpy arrays (batch dim dropped)."""
    import torch

    inputs = hf_inputs(processor, clips, question, system).to(model.device)
    features = inputs["input_features"].float().cpu().numpy()  # the extractor's fp32 output
    inputs["input_features"] = inputs["input_features"].to(model.dtype)
    lm = model.model.language_model
    grabbed: dict[str, object] = {}
    hooks = [
        model.model.audio_tower.register_forward_hook(
            lambda m, a, o: grabbed.__setitem__("encoder", o.last_hidden_state)),
        model.model.multi_modal_projector.register_forward_hook(
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

    n_frames = inputs["feature_attention_mask"].sum(-1).tolist()
    n_tok = [((n - 1) // 2 + 1 - 2) // 2 + 1 for n in n_frames]

    def valid(x):  # (clips, 750, d) → the kept tokens of every clip, concatenated
        return torch.cat([x[i, :n] for i, n in enumerate(n_tok)]).float().cpu().numpy()

    res = {
        "input_ids": inputs["input_ids"][0].cpu().numpy(),
        "input_features": features,
        "feature_attention_mask": inputs["feature_attention_mask"].cpu().numpy(),
        "encoder": valid(grabbed["encoder"]),
        "projector": valid(grabbed["projector"]),
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

    def prepared(audio):
        inputs = hf_inputs(processor, audio, question, system).to(model.device)
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        return inputs

    inputs = prepared(list(clips))
    silent = prepared([np.zeros_like(c) for c in clips])
    assert torch.equal(inputs["input_ids"], silent["input_ids"]), "silence changed the prompt"
    a, s = block_outputs(inputs), block_outputs(silent)
    d = torch.stack([a[l] - s[l] for l in layers]).mean(0)
    calls = {"n": 0}

    def steer(module, args, output):
        calls["n"] += 1
        if at == "prompt" and calls["n"] > 1:
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1] += (alpha * d).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    hook = lm.layers[-1].register_forward_hook(steer)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float().cpu().numpy()
            res = {"steer_direction": d.cpu().numpy(), "steered_logits_last": logits}
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


# -- the logit lens of a steering direction (reference for `mlx_listen.lens`) --------------------

def layer_differences(model, processor, clips: Sequence[np.ndarray], question: str,
                      system: str | None = None) -> dict[str, np.ndarray]:
    """Every decoder block's output at the last prompt position, with the audio and with
    equal-length digital silence (forward hooks), float32: "audio", "silence" and
    "diff" = audio - silence, each (layers, hidden); "final" = the last block's output with the
    audio (pre-norm), the state the steering edit is added to."""
    import torch

    lm = model.model.language_model

    def block_outputs(audio):  # (layers, hidden) at the last position, and the prompt ids
        inputs = hf_inputs(processor, audio, question, system).to(model.device)
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        got, hooks = {}, []
        for l, layer in enumerate(lm.layers):
            hooks.append(layer.register_forward_hook(
                lambda m, a, o, l=l: got.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[0, -1].float())))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        return torch.stack([got[l] for l in range(len(lm.layers))]), inputs["input_ids"]

    a, ids_a = block_outputs(list(clips))
    s, ids_s = block_outputs([np.zeros_like(c) for c in clips])
    assert torch.equal(ids_a, ids_s), "silence changed the prompt"
    return {"audio": a.cpu().numpy(), "silence": s.cpu().numpy(), "diff": (a - s).cpu().numpy(),
            "final": a[-1].cpu().numpy()}


def lens_vectors(model, d, h=None, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """The lenses of a direction d through transformers' final norm and lm_head (float32):
    "direct" = lm_head(norm.weight * d); at a state h (pre-norm): "jacobian" = the directional
    derivative of lm_head(norm(.)) at h along d (torch.func.jvp: autograd, not the closed form the
    MLX side uses) and "exact" = lm_head(norm(h + alpha d)) - lm_head(norm(h))."""
    import torch

    lm = model.model.language_model
    head, norm = model.lm_head, lm.norm
    dev = head.weight.device
    d = torch.as_tensor(np.asarray(d, np.float32), device=dev)
    with torch.no_grad():
        out = {"direct": head(norm.weight.float() * d).float().cpu().numpy()}
    if h is not None:
        h = torch.as_tensor(np.asarray(h, np.float32), device=dev)

        def f(x):
            return head(norm(x)).float()

        with torch.no_grad():
            _, jac = torch.func.jvp(f, (h,), (d,))
            out["jacobian"] = jac.cpu().numpy()
            out["exact"] = (f(h + alpha * d) - f(h)).cpu().numpy()
    return out


def inspect_reference(model, processor, items: Sequence[tuple[str, Sequence[np.ndarray], str]], *,
                      layers: Sequence[int] | None, alpha: float = 1.0, vector: np.ndarray | None = None,
                      tasks: Sequence[str] = ("sound", "music", "speech"), system: str | None = None) -> dict:
    """The numbers of `mlx_listen.lens.inspect_direction`, brute force: every per-item vector kept,
    cosines from full Gram matrices. `items`: (task, clips, question). d(x) = mean over `layers`
    of the per-layer differences; the applied direction is `vector` if given, else d(x)."""
    import torch

    per = []
    for task, clips, question in items:
        r = layer_differences(model, processor, clips, question, system)
        per.append((task, {k: torch.as_tensor(v, dtype=torch.float64) for k, v in r.items()}))
    n_layers = per[0][1]["diff"].shape[0]

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def sd(x):
        return float(x.std(unbiased=True)) if x.numel() > 1 else None

    def mean_pairwise(U, V=None):  # rows unit; distinct pairs within U, or all U x V pairs
        if V is None:
            n = U.shape[0]
            return float(((U @ U.T).sum() - torch.diagonal(U @ U.T).sum()) / (n * (n - 1))) if n > 1 else None
        return float((U @ V.T).mean())

    def unit(X):
        return X / X.norm(dim=-1, keepdim=True)

    groups = {"all": list(range(len(per)))}
    for t in tasks:
        idx = [i for i, (task, _) in enumerate(per) if task == t]
        if idx:
            groups[t] = idx
    diffs = torch.stack([p["diff"] for _, p in per])  # (N, L, hidden)
    audio = torch.stack([p["audio"] for _, p in per])
    finals = torch.stack([p["final"] for _, p in per])
    ds = diffs[:, list(layers)].mean(1) if layers else None
    applied = torch.as_tensor(np.asarray(vector), dtype=torch.float64).expand_as(finals) if vector is not None else ds

    res: dict = {"per_layer": {}, "lens": {}, "tasks": None}
    for g, idx in groups.items():
        D = diffs[idx]
        norms = D.norm(dim=-1)  # (n, L)
        rel = norms / audio[idx].norm(dim=-1)
        cosd = torch.stack([torch.stack([torch.as_tensor(cos(D[i, l], applied[j]))
                                         for l in range(n_layers)]) for i, j in enumerate(idx)])
        res["per_layer"][g] = {
            "norm_mean": norms.mean(0).tolist(), "norm_sd": [sd(norms[:, l]) for l in range(n_layers)],
            "relative_norm_mean": rel.mean(0).tolist(), "cos_direction_mean": cosd.mean(0).tolist(),
            "consistency": [mean_pairwise(unit(D[:, l])) for l in range(n_layers)]}
        vecs = {}
        if vector is None:
            vecs["direct"] = lens_vectors(model, ds[idx].mean(0).float().numpy())["direct"]
        elif g == "all":
            vecs["direct"] = lens_vectors(model, np.asarray(vector, np.float32))["direct"]
        per_item = [lens_vectors(model, applied[i].float().numpy(), finals[i].float().numpy(), alpha) for i in idx]
        vecs["jacobian"] = np.mean([p["jacobian"] for p in per_item], axis=0)
        vecs["exact"] = np.mean([p["exact"] for p in per_item], axis=0)
        res["lens"][g] = vecs
    res["final_norm_mean"] = float(finals.norm(dim=-1).mean())
    res["applied_relative_norm_mean"] = float((applied.norm(dim=-1) / finals.norm(dim=-1)).mean())
    if ds is not None:
        names = [t for t in tasks if t in groups]
        means = {t: ds[groups[t]].mean(0) for t in names}
        U = {t: unit(ds[groups[t]]) for t in names}
        res["tasks"] = {
            "tasks": names,
            "mean_direction_cosine": [[cos(means[a], means[b]) for b in names] for a in names],
            "item_cosine": [[mean_pairwise(U[a]) if a == b else mean_pairwise(U[a], U[b]) for b in names]
                            for a in names],
            "item_cosine_all": mean_pairwise(unit(ds)),
            "cos_to_overall_mean": {t: cos(means[t], ds.mean(0)) for t in names},
        }
        cross = [(U[a] @ U[b].T).flatten() for i, a in enumerate(names) for b in names[i + 1:]]
        res["tasks"]["item_cosine_across"] = float(torch.cat(cross).mean()) if cross else None
        res["mean_direction_norm"] = float(ds.mean(0).norm())
        res["item_norm_mean"] = float(ds.norm(dim=-1).mean())
        res["directions"] = ds.float().numpy()
    return res


def run_patched(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None, *,
                continuation: Sequence[int], layer: int, positions: Sequence[int],
                head: int | None = None) -> dict[str, np.ndarray]:
    """Activation patching audio -> silence in PyTorch (forward hooks), the reference for
    `mlx_listen.patching`.

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
