"""`mlx-listen steer inspect`: what a steering direction does to the logits (the lenses of
`interp.lens`), where the audio–silence contrast lives across layers, and how consistent the
direction is across items and tasks.

With data (MMAU items and their audio), every item also gives, at every decoder layer l,
Δ_l(x) = h_l(audio)[T] − h_l(silence)[T] (same prompt, equal-length digital silence, the cached
silence encodings of `interp.steering.Silence`): its norm, its norm relative to ‖h_l(audio)[T]‖
(the residual stream grows with depth, so the raw norm alone mostly shows that growth), the mean
pairwise cosine of Δ_l over items (is the contrast one direction there?), and its cosine with the
steering direction. d(x) is the mean of Δ_l(x) over L* (`interp.steering.direction`). Across
tasks: the cosines between the per-task mean directions, and the mean pairwise cosine of per-item
directions within each task and across each pair of tasks (`method.direction_stats`).

The `jacobian` and `exact` lenses are averaged over the items (each with its own h = h_final(x)[T]
and, per-input steering, its own d(x)); `exact` uses the strength α steering uses (1 for
HEADS.json, a vector file's stored strength).

Cost per item: two whole-decoder passes at T only (audio and silence; no logits except the
final-norm/head products at T that the lenses need). Items that cannot be used (unreadable audio,
too long a prompt) are recorded with their reason and skipped.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .. import presets
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..headset import HeadSet
from ..identity import check_binding
from ..interp.lens import exact_delta, lens_of, n_ranked_tokens, norm_eps, tangent, top_tokens
from ..interp.steering import Silence, direction, read_residuals
from ..load import ModelRef
from ..prompt import prepare
from ..records import file_sha256
from .direction_stats import ALL, DirectionStats, _cos, _mean_sd
from .directions import load_vector, vector_binding
from .inspect_report import write_outputs

DEFINITIONS = {
    "direct": "lm_head(w * d): state-free lens (= J(h) d for h orthogonal to d, up to 1/rms(h) > 0)",
    "jacobian": "mean over items of lm_head(w * (d - h (h.d)/(n rms^2)) / rms), h = h_final[T]; per unit alpha",
    "exact": "mean over items of unembed(h + alpha d) - unembed(h), alpha = {alpha:g}",
    "d": "per input: mean over L* of h_l(audio)[T] - h_l(silence)[T]; fixed vector: the vector",
    "per_layer": "h_l(audio)[T] - h_l(silence)[T] at every layer l; relative: / |h_l(audio)[T]|; "
                 "consistency: mean pairwise cosine over items; cos_direction: cosine with d",
    "task_cosines": "mean_direction_cosine: between per-task mean d; item_cosine: mean pairwise cosine of "
                    "per-item d, within a task (diagonal, distinct pairs) and across tasks",
}


def read_source(path) -> tuple[object | None, tuple | None]:
    """(HeadSet, None) for a HEADS.json, (None, (vector, apply_layer, metadata)) for a vector file."""
    path = Path(path)
    order = ("heads", "vector") if path.suffix.lower() == ".json" else ("vector", "heads")
    errors = []
    for kind in order:
        try:
            return (HeadSet.load(path), None) if kind == "heads" else (None, load_vector(path))
        except ListenError as e:
            errors.append(str(e))
    raise ListenError(f"{path} is neither a HEADS.json file nor a steering vector file ({errors[0]})")


def _vector_layers(md: dict) -> list[int] | None:
    raw = md.get("layers")
    if raw is None:
        return None
    try:
        layers = json.loads(raw) if isinstance(raw, str) else raw
        return sorted({int(l) for l in layers})
    except (ValueError, TypeError):
        warnings.warn(f"the vector's 'layers' metadata ({raw!r}) is not a list of layers; ignored", ListenWarning)
        return None


@dataclass
class Source:
    """The direction being inspected: a fixed vector, or per input over `read_layers` (L*)."""

    info: dict  # what report.json says about it
    fixed: np.ndarray | None
    read_layers: list[int] | None
    apply_layer: int
    alpha: float


def resolve_source(model, headset, vector, layers, alpha, items) -> Source:
    """The direction of a head set (per input, over its layers) or a vector (file or array), checked
    against the model; `alpha` None: 1, or the vector file's stored strength."""
    if (headset is None) == (vector is None):
        raise ListenError("inspect needs exactly one direction: a HEADS.json head set or a vector")
    n_layers, hidden = model.n_layers, model.hidden_size
    fixed, default_alpha = None, 1.0
    if headset is not None:
        if not isinstance(headset, HeadSet):
            raise ListenError("headset must be a headset.HeadSet")
        headset.check(n_layers, model.n_heads)
        read_layers = sorted(set(layers)) if layers is not None else headset.layers
        info = {"kind": "heads", "direction": "per input (audio - silence)", "heads": [list(h) for h in headset.heads]}
        if headset.path:
            info.update(path=str(headset.path), sha256=file_sha256(headset.path))
        apply_layer = n_layers - 1
        if not read_layers:
            raise ListenError("a per-input direction needs read layers")
        if not items:
            raise ListenError("a HEADS.json direction is formed per input: give items (--data and --audio-dir)")
    else:
        if isinstance(vector, (str, Path)):
            fixed, apply_layer, md = load_vector(vector, hidden, n_layers)
            info = {"kind": "vector", "direction": "fixed vector", "path": str(vector), "sha256": file_sha256(vector),
                    "metadata": {k: v for k, v in md.items() if k != "calibration"}}
            try:
                default_alpha = float(md.get("coeff", 1.0))
            except ValueError:
                default_alpha = 1.0
            meta_layers = _vector_layers(md)
        else:
            fixed = np.asarray(vector, np.float32)
            if fixed.shape != (hidden,) or not np.isfinite(fixed).all():
                raise ListenError(f"the vector must be {hidden} finite numbers, got shape {fixed.shape}")
            apply_layer, meta_layers = n_layers - 1, None
            info = {"kind": "vector", "direction": "fixed vector"}
        apply_layer %= n_layers
        read_layers = sorted(set(layers)) if layers is not None else meta_layers
        if apply_layer != n_layers - 1:
            warnings.warn(f"the vector applies at layer {apply_layer}, not before the final norm: the lens shows "
                          "what it would do there, not through the later blocks", ListenWarning)
    bad = [l for l in (read_layers or []) if not 0 <= l < n_layers]
    if bad:
        raise ListenError(f"layers {bad} do not exist in this {n_layers}-layer model")
    alpha = default_alpha if alpha is None else float(alpha)
    if not np.isfinite(alpha):
        raise ListenError(f"alpha must be a finite number, not {alpha}")
    info.update(layers=read_layers, apply_layer=apply_layer, alpha=alpha)
    return Source(info, fixed, read_layers, apply_layer, alpha)


def accumulate(model, processor, src: Source, items, audio_dir, prompt_preset: str, silence: Silence,
               progress: bool) -> tuple[DirectionStats, list[dict]]:
    """Every item's residuals with the audio and with silence at every layer, into the statistics."""
    stats = DirectionStats(model.n_layers, model.hidden_size)
    failed: list[dict] = []
    eps, all_layers = norm_eps(model), list(range(model.n_layers))
    for item in tqdm(items or [], desc="inspect", unit="item", file=sys.stderr, disable=not progress):
        try:
            prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]],
                             presets.build_prompt(item, prompt_preset))
        except ListenError as e:
            failed.append({"id": item["id"], "task": item.get("task"), "error": str(e)})
            continue
        a = read_residuals(model, prompt, all_layers)
        s = silence.residuals(prompt, all_layers)  # its encoding and prefix cached per clip length
        d = np.array(direction(a, s, src.read_layers)) if src.read_layers else None
        diffs = np.stack([np.array(a[l] - s[l]) for l in all_layers])
        audio = np.stack([np.array(a[l]) for l in all_layers])
        final = audio[-1]
        applied = src.fixed if src.fixed is not None else d
        stats.add(item["id"], item["task"], diffs=diffs, audio=audio, d=d, applied=applied, final=final,
                  tangent_vec=tangent(final, applied, eps),
                  exact=exact_delta(model, final, applied, src.alpha) if src.alpha != 0 else None)
    if items and not stats.items:
        raise ListenError("no item could be used" + (f" ({len(failed)} failed, e.g. {failed[0]['id']}: "
                                                    f"{failed[0]['error']})" if failed else ""))
    return stats, failed


def lens_report(model, processor, src: Source, stats: DirectionStats, top_k: int) -> dict:
    """Per group (all items, each task): each lens's promoted and demoted tokens, and how far the
    state-dependent lenses agree with the direct one."""
    n_ranked = n_ranked_tokens(model, processor)
    lens: dict = {}
    vectors: dict = {}
    for g in ([ALL] if not stats.items else stats.groups()):
        entry, vec = {}, {}
        if src.fixed is not None:
            if g == ALL:  # state-free: the same for every task
                vec["direct"] = lens_of(model, src.fixed)
        else:
            vec["direct"] = lens_of(model, stats.mean_direction(g))
        if stats.n[g]:
            vec["jacobian"] = lens_of(model, stats.tangent_sum[g] / stats.n[g])
            if g in stats.exact_sum:
                vec["exact"] = stats.exact_sum[g] / stats.n[g]
        for kind, v in vec.items():
            entry[kind] = top_tokens(v, processor, top_k, n_ranked)
        entry["n"] = stats.n[g]
        ref = vec.get("direct", vectors.get(ALL, {}).get("direct"))
        if ref is not None and ("jacobian" in vec or "exact" in vec):
            ref_top = {r["id"] for r in top_tokens(ref, processor, top_k, n_ranked)["promoted"]}
            entry["agreement_with_direct"] = {
                kind: {"centered_cosine": _cos(ref[:n_ranked] - ref[:n_ranked].mean(),
                                               vec[kind][:n_ranked] - vec[kind][:n_ranked].mean()),
                       "promoted_overlap": len({r["id"] for r in entry[kind]["promoted"]} & ref_top)}
                for kind in ("jacobian", "exact") if kind in vec}
        lens[g] = entry
        vectors[g] = vec
    return lens


def direction_summary(src: Source, stats: DirectionStats) -> dict:
    """Norms of the direction (fixed, per item, mean) and its cosine with the items' mean direction."""
    out: dict = {}
    if src.fixed is not None:
        out["vector_norm"] = float(np.linalg.norm(src.fixed))
    mean_d = stats.mean_direction(ALL) if stats.d_n[ALL] else None
    if mean_d is not None:
        out["mean_direction_norm"] = float(np.linalg.norm(mean_d))
        m, s = _mean_sd(r.get("d_norm") for r in stats.items)
        out.update(item_norm_mean=m, item_norm_sd=s)
        if src.fixed is not None:
            out["vector_cos_mean_direction"] = _cos(src.fixed, mean_d)
            out["vector_cos_task_mean"] = {t: _cos(src.fixed, stats.mean_direction(t)) for t in stats.tasks
                                           if stats.d_n[t]}
    if stats.items:
        for key in ("final_norm", "applied_relative_norm"):
            m, s = _mean_sd(r.get(key) for r in stats.items)
            out[f"{key}_mean"], out[f"{key}_sd"] = m, s
    return out


def inspect_direction(model, processor, *, headset=None, vector=None, items: Sequence[dict] | None = None,
                      audio_dir=None, prompt_preset: str = presets.DEFAULT_PRESET, top_k: int = 20,
                      alpha: float | None = None, layers: Sequence[int] | None = None, out=None,
                      silence=None, progress: bool = False) -> dict:
    """The logit lens, per-layer contrast and task consistency of a steering direction.

    headset: a `HeadSet` (per-input direction d(x) over its layers L*; needs `items` and `audio_dir`).
    vector: a vector file path (`steer build`) or a (hidden,) array: a fixed direction. Its L* is
        the file's `layers` metadata or `layers`; without L* no per-input directions are formed.
    items: MMAU items (`mmau.load_items`), their audio under `audio_dir`. Without them only the
        direct lens of a fixed vector is reported.
    alpha: the strength of the `exact` lens (default: 1, or the vector file's stored strength).
    out: a folder for inspect.json, inspect.txt and the PNGs (made if missing).
    Returns the JSON-ready dict that inspect.json holds.
    """
    if top_k < 1:
        raise ListenError(f"top_k must be at least 1, not {top_k}")
    src = resolve_source(model, headset, vector, layers, alpha, items)
    if items and audio_dir is None:
        raise ListenError("items need audio_dir, the folder their audio_id paths are relative to")
    if items:
        presets.build_prompt(items[0], prompt_preset)  # an unknown preset is the user's error, not every item's
    stats, failed = accumulate(model, processor, src, items, audio_dir, prompt_preset, silence or Silence(model),
                               progress)
    res = {
        "source": src.info,
        "model": {"n_layers": model.n_layers, "hidden_size": model.hidden_size, "vocab_size": int(model.vocab_size),
                  "ranked_tokens": n_ranked_tokens(model, processor)},
        "data": {"n_items": len(items or []), "used": len(stats.items), "failed": failed,
                 "by_task": {t: stats.n[t] for t in stats.tasks if stats.n[t]}, "prompt": prompt_preset}
        if items else None,
        "definitions": {k: v.format(alpha=src.alpha) if k == "exact" else v for k, v in DEFINITIONS.items()},
        "top_k": top_k,
        "direction": direction_summary(src, stats),
        "lens": lens_report(model, processor, src, stats, top_k),
        "per_layer": stats.per_layer(src.read_layers or []),
        "tasks": stats.task_consistency(),
        "items": stats.items,
    }
    if stats.items and not stats.d_n[ALL]:
        res["notes"] = ["no L* (the vector file names no layers): per-input directions and task cosines omitted"]
    zero = (res["tasks"] or {}).get("zero_directions", 0)
    if zero:
        msg = (f"{zero} of {stats.d_n[ALL]} items gave an all-zero direction (audio and silence identical at L*: "
               "silent clips?)")
        res.setdefault("notes", []).append(msg)
        warnings.warn(msg, ListenWarning, stacklevel=2)
    if src.alpha == 0:
        res.setdefault("notes", []).append("alpha 0: the exact lens is zero and omitted")
    if out is not None:
        write_outputs(res, Path(out))
    return res


def inspect(source_path, model, data=None, audio_dir=None, out=None, *, limit: int | None = None,
            tasks: Sequence[str] = mmau.TASKS, prompt: str = presets.DEFAULT_PRESET, top_k: int = 20,
            alpha: float | None = None, force: bool = False, progress: bool = True) -> dict:
    """`mlx-listen steer inspect SOURCE`: the files are read and checked before the model loads
    (`model`: a folder, repo id or loaded pair). A head set or vector found on another model or
    prompt is refused unless `force` (then recorded in `warnings`)."""
    headset, vec = read_source(source_path)
    meta = (headset.meta or {}) if headset is not None else vector_binding(source_path)
    if headset is not None and data is None:
        raise ListenError(f"{source_path} gives a per-input direction: it needs --data and --audio-dir")
    if data is not None and audio_dir is None:
        raise ListenError("--data needs --audio-dir")
    items = None
    if data is not None:
        items = [it for it in mmau.load_items(data) if it["task"] in tasks][:limit]
        if not items:
            raise ListenError(f"{data} has no items of tasks {', '.join(tasks)}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ListenError(f"--out {out} is a file, not a folder")
    found = check_binding(meta, str(source_path), prompt=prompt if data is not None else None, force=force,
                          ids=[it["id"] for it in items] if items else None, family=ModelRef.of(model).family)
    ref = ModelRef.of(model)
    if headset is not None:
        headset.check(*ref.shape)
    mdl, processor = ref.get()
    found += check_binding(meta, str(source_path), model=mdl, force=force)
    for w in found:
        warnings.warn(w, ListenWarning, stacklevel=2)
    res = inspect_direction(mdl, processor, headset=headset, vector=None if vec is None else Path(source_path),
                            items=items, audio_dir=audio_dir, prompt_preset=prompt, top_k=top_k, alpha=alpha,
                            progress=progress)
    res["model"]["path"] = str(ref)
    if found:
        res["warnings"] = found
    if data is not None:
        res["data"].update(path=str(data), sha256=file_sha256(data), tasks=list(tasks), limit=limit)
    if out is not None:
        write_outputs(res, Path(out))
    return res

