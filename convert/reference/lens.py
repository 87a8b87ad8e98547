"""The logit lens of a steering direction in PyTorch (the reference for `mlx_listen.interp.lens` and
`mlx_listen.method.inspect`): per-layer audio–silence differences through forward hooks, the lenses
through transformers' final norm and lm_head (the Jacobian by autograd), and the whole inspect
report brute force (every per-item vector kept)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .hf import hf_inputs


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
    """The numbers of `mlx_listen.method.inspect.inspect_direction`, brute force: every per-item vector kept,
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
