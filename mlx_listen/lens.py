"""`mlx-listen steer inspect`: what a steering direction does to the logits, where the audio–silence
contrast lives across layers, and how consistent the direction is across items and tasks.

The steering edit (steering.py, method.md §3.4) adds α·d to the last decoder block's output h at T,
before the final RMSNorm y = w ⊙ h / r(h), r(h) = sqrt(mean(h²) + eps), then `lm_head`. Three lenses
read d through that head (each a vocabulary-sized vector; its top-k are the tokens d promotes, its
bottom-k the ones it demotes; logits are shift-invariant, so only the order and differences count):

- `direct`: lm_head(w ⊙ d). State-free. It is the Jacobian below at a state h ⊥ d, up to the
  positive factor 1/r(h), so it ranks tokens without any data (a fixed vector alone).
- `jacobian`: the first-order effect at the model's actual state, J(h)·d with
      J(h)·d = lm_head(w ⊙ (d − h (h·d) / (n r²)) / r),     n = hidden size, r = r(h),
  averaged over the items (each with its own h = h_final(x)[T] and, per-input steering, its own
  d(x)). Linear in d, so the mean is lm_head(w ⊙ mean of the tangents): one head product per group.
  The h-term is what RMSNorm takes away: the part of d along h only rescales the state. Per unit α.
- `exact`: unembed(h + α d) − unembed(h), averaged over the items, for the strength α steering
  uses (1 for HEADS.json, a vector file's stored strength). exact ≈ α·jacobian for small α.

With data (MMAU items and their audio), every item also gives, at every decoder layer l,
Δ_l(x) = h_l(audio)[T] − h_l(silence)[T] (same prompt, equal-length digital silence, the cached
silence encodings of `steering.Silence`): its norm, its norm relative to ‖h_l(audio)[T]‖ (the
residual stream grows with depth, so the raw norm alone mostly shows that growth), the mean
pairwise cosine of Δ_l over items (is the contrast one direction there?), and its cosine with the
steering direction. d(x) is the mean of Δ_l(x) over L*, exactly as `Steerer.direction` forms it.
Across tasks: the cosines between the per-task mean directions, and the mean pairwise cosine of
per-item directions within each task (diagonal) and across each pair of tasks (off-diagonal),
computed from per-group sums of unit vectors, so memory stays O(layers × hidden) at any N.

Cost per item: two whole-decoder passes at T only (audio and silence; no KV cache, no logits
except the final-norm/head products at T that the lenses need). Items that cannot be used
(unreadable audio, too long a prompt) are recorded with their reason and skipped.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import mmau
from .errors import ListenError, ListenWarning
from .heads import HeadSet
from .load import load
from .plots import DPI, curve_plot, heatmap
from .prompt import prepare
from .records import write_atomic, write_json
from .steering import Silence, load_vector, read_residuals

LENSES = ("direct", "jacobian", "exact")
ALL = "all"


# -- the lenses -----------------------------------------------------------------------------------

def _head(lm, x: mx.array) -> mx.array:
    """lm_head alone (no norm), as `LanguageModel.unembed` applies it."""
    return lm.model.embed_tokens.as_linear(x) if lm.config.tie_word_embeddings else lm.lm_head(x)


def _norm_weight(model) -> tuple[np.ndarray, float, int]:
    norm = model.language_model.model.norm
    w = np.array(norm.weight.astype(mx.float32), np.float64)
    return w, float(norm.eps), w.size


def tangent(h: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
    """(d − h (h·d) / (n r²)) / r, r = sqrt(mean(h²) + eps): J(h)·d before w ⊙ and lm_head (float64)."""
    h, d = np.asarray(h, np.float64), np.asarray(d, np.float64)
    r2 = float(np.mean(h * h)) + eps
    return (d - h * (float(h @ d) / (h.size * r2))) / np.sqrt(r2)


def _lens_of(model, hidden_vec: np.ndarray) -> np.ndarray:
    """lm_head(w ⊙ v) for a hidden-space vector v (float32 math, float64 result)."""
    lm = model.language_model
    w = lm.model.norm.weight.astype(mx.float32)
    out = _head(lm, (w * mx.array(np.asarray(hidden_vec, np.float32)))[None])[0]
    return np.array(out.astype(mx.float32), np.float64)


def exact_delta(model, h: np.ndarray, d: np.ndarray, alpha: float) -> np.ndarray:
    """unembed(h + α d) − unembed(h) (float32 math, float64 result)."""
    h = mx.array(np.asarray(h, np.float32))
    d = mx.array(np.asarray(d, np.float32))
    logits = model.language_model.unembed(mx.stack([h + alpha * d, h])).astype(mx.float32)
    return np.array(logits[0] - logits[1], np.float64)


def lens_vectors(model, d, h=None, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """The lenses of one direction d (hidden,): `direct` always; `jacobian` and `exact` at state h
    (the last block's output at T, pre-norm) when given. Vocabulary-sized float64 arrays."""
    d = np.asarray(d, np.float32)
    out = {"direct": _lens_of(model, d)}
    if h is not None:
        _, eps, _ = _norm_weight(model)
        out["jacobian"] = _lens_of(model, tangent(h, d, eps))
        out["exact"] = exact_delta(model, h, d, alpha)
    return out


# -- statistics over items --------------------------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return None if n == 0.0 else v / n


def _cos(a, b) -> float | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return None if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _num(x) -> float | None:
    """A JSON number, or None for an undefined one (NaN is not JSON)."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _mean_sd(values) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not v.size:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def pairwise_cosines(unit_sums: dict[str, np.ndarray], counts: dict[str, int]) -> dict:
    """Mean pairwise cosines of unit vectors from their per-group sums S_g and counts n_g:
    within g: (‖S_g‖² − n_g) / (n_g (n_g − 1)) (pairs of distinct items); across g ≠ h:
    S_g·S_h / (n_g n_h); `across` pools every cross-group pair; `all` every pair."""
    groups = [g for g in unit_sums if counts[g] > 0]
    mat = [[None] * len(groups) for _ in groups]
    for i, g in enumerate(groups):
        for j, k in enumerate(groups):
            if i == j:
                n = counts[g]
                mat[i][j] = _num((unit_sums[g] @ unit_sums[g] - n) / (n * (n - 1))) if n > 1 else None
            else:
                mat[i][j] = _num(unit_sums[g] @ unit_sums[k] / (counts[g] * counts[k]))
    cross = sum(unit_sums[g] @ unit_sums[k] for i, g in enumerate(groups) for k in groups[i + 1:])
    n_cross = sum(counts[g] * counts[k] for i, g in enumerate(groups) for k in groups[i + 1:])
    n = sum(counts[g] for g in groups)
    total = np.sum([unit_sums[g] for g in groups], axis=0) if groups else None
    return {"groups": groups, "matrix": mat, "within": {g: mat[i][i] for i, g in enumerate(groups)},
            "across": _num(cross / n_cross) if n_cross else None,
            "all": _num((total @ total - n) / (n * (n - 1))) if n > 1 else None}


class DirectionStats:
    """Accumulates, item by item, everything `inspect_direction` reports about the directions
    (no per-item vector is kept): per-layer differences Δ_l, per-input directions d(x) over L*,
    the applied direction's tangents and exact logit changes, per task and over all items."""

    def __init__(self, n_layers: int, hidden: int, tasks: Sequence[str] = mmau.TASKS):
        self.n_layers, self.hidden, self.tasks = n_layers, hidden, tuple(tasks)
        groups = (ALL, *self.tasks)
        self.items: list[dict] = []
        self.layer_units = {g: np.zeros((n_layers, hidden)) for g in groups}
        self.layer_counts = {g: np.zeros(n_layers, np.int64) for g in groups}
        self.d_sum = {g: np.zeros(hidden) for g in groups}
        self.d_units = {g: np.zeros(hidden) for g in groups}
        self.d_count = {g: 0 for g in groups}
        self.d_n = {g: 0 for g in groups}
        self.tangent_sum = {g: np.zeros(hidden) for g in groups}
        self.exact_sum: dict[str, np.ndarray] = {}
        self.n = {g: 0 for g in groups}

    def add(self, item_id: str, task: str, diffs: np.ndarray | None = None, audio: np.ndarray | None = None,
            d: np.ndarray | None = None, applied: np.ndarray | None = None, final: np.ndarray | None = None,
            tangent_vec: np.ndarray | None = None, exact: np.ndarray | None = None):
        """One item. diffs: (layers, hidden) Δ_l; audio: (layers, hidden) h_l(audio)[T]; d: its
        per-input direction (None without L*); applied: the direction steering adds (d, or the
        fixed vector); final: h_final[T]; tangent_vec / exact: its lens contributions."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}")
        groups = (ALL, task)
        rec = {"id": item_id, "task": task}
        for g in groups:
            self.n[g] += 1
        if diffs is not None:
            diffs = np.asarray(diffs, np.float64)
            norms = np.linalg.norm(diffs, axis=1)
            rec["layer_norm"] = norms.tolist()
            if audio is not None:
                an = np.linalg.norm(np.asarray(audio, np.float64), axis=1)
                rec["layer_relative_norm"] = [_num(a / b) if b > 0 else None for a, b in zip(norms, an)]
            if applied is not None:
                rec["layer_cos_direction"] = [_cos(x, applied) for x in diffs]
            for l in range(self.n_layers):
                u = _unit(diffs[l])
                if u is not None:
                    for g in groups:
                        self.layer_units[g][l] += u
                        self.layer_counts[g][l] += 1
        if d is not None:
            d = np.asarray(d, np.float64)
            rec["d_norm"] = float(np.linalg.norm(d))
            u = _unit(d)
            for g in groups:
                self.d_sum[g] += d
                self.d_n[g] += 1
                if u is not None:
                    self.d_units[g] += u
                    self.d_count[g] += 1
        if final is not None:
            rec["final_norm"] = float(np.linalg.norm(np.asarray(final, np.float64)))
            if applied is not None:
                rec["applied_norm"] = float(np.linalg.norm(np.asarray(applied, np.float64)))
                rec["applied_relative_norm"] = _num(rec["applied_norm"] / rec["final_norm"]) if rec["final_norm"] else None
        if tangent_vec is not None:
            for g in groups:
                self.tangent_sum[g] += tangent_vec
        if exact is not None:
            for g in groups:
                self.exact_sum[g] = self.exact_sum.get(g, 0.0) + exact
        self.items.append(rec)

    def groups(self) -> list[str]:
        return [g for g in (ALL, *self.tasks) if self.n[g] > 0]

    def mean_direction(self, group: str = ALL) -> np.ndarray | None:
        return self.d_sum[group] / self.d_n[group] if self.d_n[group] else None

    def per_layer(self, layers_marked: Sequence[int] = ()) -> dict | None:
        rows = [r for r in self.items if "layer_norm" in r]
        if not rows:
            return None

        def column(key, rs):
            return list(zip(*[r[key] for r in rs])) if rs and key in rs[0] else None

        def summary(rs, g):
            out = {"n": len(rs)}
            for key, name in (("layer_norm", "norm"), ("layer_relative_norm", "relative_norm"),
                              ("layer_cos_direction", "cos_direction")):
                cols = column(key, rs)
                if cols is not None:
                    ms = [_mean_sd(c) for c in cols]
                    out[f"{name}_mean"] = [m for m, _ in ms]
                    out[f"{name}_sd"] = [s for _, s in ms]
            out["consistency"] = [
                _num((self.layer_units[g][l] @ self.layer_units[g][l] - c) / (c * (c - 1))) if c > 1 else None
                for l, c in enumerate(self.layer_counts[g])]
            return out

        res = {"layers": list(range(self.n_layers)), "marked": sorted(set(layers_marked)),
               **summary(rows, ALL), "by_task": {}}
        for t in self.tasks:
            rs = [r for r in rows if r["task"] == t]
            if rs:
                res["by_task"][t] = summary(rs, t)
        return res

    def task_consistency(self) -> dict | None:
        if not self.d_n[ALL]:
            return None
        tasks = [t for t in self.tasks if self.d_n[t]]
        means = {t: self.mean_direction(t) for t in tasks}
        overall = self.mean_direction(ALL)
        item = pairwise_cosines({t: self.d_units[t] for t in tasks}, {t: self.d_count[t] for t in tasks})
        return {
            "tasks": tasks, "n": {t: self.d_n[t] for t in tasks},
            "mean_direction_norm": {t: float(np.linalg.norm(means[t])) for t in tasks},
            "mean_direction_cosine": [[_cos(means[a], means[b]) for b in tasks] for a in tasks],
            "cos_to_overall_mean": {t: _cos(means[t], overall) for t in tasks},
            "item_cosine": item["matrix"], "item_cosine_within": item["within"],
            "item_cosine_across": item["across"], "item_cosine_all": item["all"],
            "zero_directions": self.d_n[ALL] - self.d_count[ALL],
        }


# -- the report -----------------------------------------------------------------------------------

def _token_names(processor, ids: Sequence[int]) -> list[tuple[str, str]]:
    tok = processor.tokenizer
    out = []
    for i in ids:
        try:
            text = tok.decode([int(i)])
        except Exception:  # an id the tokenizer does not know (padded head rows)
            text = f"<id {int(i)}>"
        try:
            piece = tok.convert_ids_to_tokens(int(i))
        except Exception:
            piece = None
        out.append((text, piece if isinstance(piece, str) else text))
    return out


def n_ranked_tokens(model, processor) -> int:
    """Ids ranked by the lenses: the head's rows the tokenizer knows (Qwen pads lm_head past them)."""
    V = int(model.config.text_config.vocab_size)
    tok = getattr(processor.tokenizer, "_tokenizer", processor.tokenizer)
    try:
        return min(V, len(tok))
    except TypeError:
        return V


def top_tokens(values: np.ndarray, processor, k: int, n_ranked: int | None = None) -> dict:
    """The k highest (promoted) and k lowest (demoted) entries of a lens vector, ties by id."""
    v = np.asarray(values, np.float64)[: n_ranked or len(values)]
    ids = np.arange(v.size)
    k = min(k, v.size)
    up = np.lexsort((ids, -v))[:k]
    down = np.lexsort((ids, v))[:k]

    def rows(idx):
        return [{"id": int(i), "token": t, "piece": p, "value": float(v[i])}
                for i, (t, p) in zip(idx, _token_names(processor, idx))]

    return {"promoted": rows(up), "demoted": rows(down)}


def _centered_cos(a: np.ndarray, b: np.ndarray) -> float | None:
    return _cos(a - a.mean(), b - b.mean())


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


def inspect_direction(model, processor, *, headset=None, vector=None, items: Sequence[dict] | None = None,
                      audio_dir=None, prompt_preset: str = mmau.DEFAULT_PRESET, top_k: int = 20,
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
    if (headset is None) == (vector is None):
        raise ListenError("inspect needs exactly one direction: a HEADS.json head set or a vector")
    if top_k < 1:
        raise ListenError(f"top_k must be at least 1, not {top_k}")
    n_layers = len(model.layers)
    tcfg = model.config.text_config
    hidden = tcfg.hidden_size
    source: dict = {}
    fixed = None
    if headset is not None:
        if not isinstance(headset, HeadSet):
            raise ListenError("headset must be a heads.HeadSet")
        headset.check(n_layers, tcfg.num_attention_heads)
        read_layers = sorted(set(layers)) if layers is not None else headset.layers
        source = {"kind": "heads", "direction": "per input (audio - silence)", "heads": [list(h) for h in headset.heads]}
        if headset.path:
            source.update(path=str(headset.path), sha256=mmau.file_sha256(headset.path))
        apply_layer, default_alpha = n_layers - 1, 1.0
        if not read_layers:
            raise ListenError("a per-input direction needs read layers")
        if not items:
            raise ListenError("a HEADS.json direction is formed per input: give items (--data and --audio-dir)")
    else:
        if isinstance(vector, (str, Path)):
            fixed, apply_layer, md = load_vector(vector, hidden, n_layers)
            source = {"kind": "vector", "direction": "fixed vector", "path": str(vector),
                      "sha256": mmau.file_sha256(vector),
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
            apply_layer, default_alpha, meta_layers = n_layers - 1, 1.0, None
            source = {"kind": "vector", "direction": "fixed vector"}
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
    if items and audio_dir is None:
        raise ListenError("items need audio_dir, the folder their audio_id paths are relative to")
    if items:
        mmau.build_prompt(items[0], prompt_preset)  # an unknown preset is the user's error, not every item's
    source.update(layers=read_layers, apply_layer=apply_layer, alpha=alpha)

    _, eps, _ = _norm_weight(model)
    stats = DirectionStats(n_layers, hidden)
    failed: list[dict] = []
    silence = silence or Silence(model)
    all_layers = list(range(n_layers))
    for item in tqdm(items or [], desc="inspect", unit="item", file=sys.stderr, disable=not progress):
        try:
            prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]],
                             mmau.build_prompt(item, prompt_preset))
        except ListenError as e:
            failed.append({"id": item["id"], "task": item.get("task"), "error": str(e)})
            continue
        a = read_residuals(model, prompt, all_layers)
        s = silence.residuals(prompt, all_layers)  # its encoding and prefix cached per clip length
        d_mx = mx.stack([a[l] - s[l] for l in read_layers]).mean(0) if read_layers else None  # as Steerer does
        diffs = np.stack([np.array(a[l] - s[l]) for l in all_layers])
        audio = np.stack([np.array(a[l]) for l in all_layers])
        final = audio[-1]
        d = np.array(d_mx) if d_mx is not None else None
        applied = fixed if fixed is not None else d
        stats.add(item["id"], item["task"], diffs=diffs, audio=audio, d=d, applied=applied, final=final,
                  tangent_vec=tangent(final, applied, eps),
                  exact=exact_delta(model, final, applied, alpha) if alpha != 0 else None)
    if items and not stats.items:
        raise ListenError("no item could be used" + (f" ({len(failed)} failed, e.g. {failed[0]['id']}: "
                                                    f"{failed[0]['error']})" if failed else ""))

    n_ranked = n_ranked_tokens(model, processor)
    lens: dict = {}
    vectors: dict = {}
    for g in ([ALL] if not stats.items else stats.groups()):
        entry, vec = {}, {}
        if fixed is not None:
            if g == ALL:  # state-free: the same for every task
                vec["direct"] = _lens_of(model, fixed)
        else:
            vec["direct"] = _lens_of(model, stats.mean_direction(g))
        if stats.n[g]:
            vec["jacobian"] = _lens_of(model, stats.tangent_sum[g] / stats.n[g])
            if g in stats.exact_sum:
                vec["exact"] = stats.exact_sum[g] / stats.n[g]
        for kind, v in vec.items():
            entry[kind] = top_tokens(v, processor, top_k, n_ranked)
        entry["n"] = stats.n[g]
        ref = vec.get("direct", vectors.get(ALL, {}).get("direct"))
        if ref is not None and ("jacobian" in vec or "exact" in vec):
            ref_top = {r["id"] for r in top_tokens(ref, processor, top_k, n_ranked)["promoted"]}
            entry["agreement_with_direct"] = {
                kind: {"centered_cosine": _centered_cos(ref[:n_ranked], vec[kind][:n_ranked]),
                       "promoted_overlap": len({r["id"] for r in entry[kind]["promoted"]} & ref_top)}
                for kind in ("jacobian", "exact") if kind in vec}
        lens[g] = entry
        vectors[g] = vec

    direction: dict = {}
    if fixed is not None:
        direction["vector_norm"] = float(np.linalg.norm(fixed))
    mean_d = stats.mean_direction(ALL) if stats.d_n[ALL] else None
    if mean_d is not None:
        direction["mean_direction_norm"] = float(np.linalg.norm(mean_d))
        m, s = _mean_sd(r.get("d_norm") for r in stats.items)
        direction.update(item_norm_mean=m, item_norm_sd=s)
        if fixed is not None:
            direction["vector_cos_mean_direction"] = _cos(fixed, mean_d)
            direction["vector_cos_task_mean"] = {t: _cos(fixed, stats.mean_direction(t)) for t in stats.tasks
                                                 if stats.d_n[t]}
    if stats.items:
        for key in ("final_norm", "applied_relative_norm"):
            m, s = _mean_sd(r.get(key) for r in stats.items)
            direction[f"{key}_mean"], direction[f"{key}_sd"] = m, s

    res = {
        "source": source,
        "model": {"n_layers": n_layers, "hidden_size": hidden, "vocab_size": int(tcfg.vocab_size),
                  "ranked_tokens": n_ranked},
        "data": {"n_items": len(items or []), "used": len(stats.items), "failed": failed,
                 "by_task": {t: stats.n[t] for t in stats.tasks if stats.n[t]}, "prompt": prompt_preset}
        if items else None,
        "definitions": {
            "direct": "lm_head(w * d): state-free lens (= J(h) d for h orthogonal to d, up to 1/rms(h) > 0)",
            "jacobian": "mean over items of lm_head(w * (d - h (h.d)/(n rms^2)) / rms), h = h_final[T]; per unit alpha",
            "exact": f"mean over items of unembed(h + alpha d) - unembed(h), alpha = {alpha:g}",
            "d": "per input: mean over L* of h_l(audio)[T] - h_l(silence)[T]; fixed vector: the vector",
            "per_layer": "h_l(audio)[T] - h_l(silence)[T] at every layer l; relative: / |h_l(audio)[T]|; "
                         "consistency: mean pairwise cosine over items; cos_direction: cosine with d",
            "task_cosines": "mean_direction_cosine: between per-task mean d; item_cosine: mean pairwise cosine of "
                            "per-item d, within a task (diagonal, distinct pairs) and across tasks",
        },
        "top_k": top_k,
        "direction": direction,
        "lens": lens,
        "per_layer": stats.per_layer(read_layers or []),
        "tasks": stats.task_consistency(),
        "items": stats.items,
    }
    if stats.items and not stats.d_n[ALL]:
        res["notes"] = ["no L* (the vector file names no layers): per-input directions and task cosines omitted"]
    if alpha == 0:
        res.setdefault("notes", []).append("alpha 0: the exact lens is zero and omitted")
    if out is not None:
        write_outputs(res, Path(out))
    return res


# -- outputs --------------------------------------------------------------------------------------

def _shown(row: dict) -> str:
    """The decoded token, or its raw piece where decoding one token alone gives a partial character."""
    return repr(row["piece"] if "\ufffd" in row["token"] else row["token"])


def _fmt_tokens(rows: list[dict], n: int) -> str:
    return ", ".join(f"{_shown(r)} {r['value']:+.3g}" for r in rows[:n])


def _g(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def inspect_lines(res: dict, n_tokens: int = 10) -> list[str]:
    """The terminal summary of `inspect_direction`."""
    src, lines = res["source"], []
    if src["kind"] == "heads":
        lines.append(f"direction: per input (audio - silence), mean over L* = {src['layers']}")
    else:
        lines.append(f"direction: fixed vector{' ' + src['path'] if src.get('path') else ''} (applied after block "
                     f"{src['apply_layer']}; L* = {src['layers'] if src['layers'] else 'unknown'})")
    data = res.get("data")
    if data:
        by = ", ".join(f"{t} {n}" for t, n in data["by_task"].items())
        lines.append(f"items: {data['used']} used ({by})" + (f", {len(data['failed'])} failed (e.g. "
                     f"{data['failed'][0]['id']}: {data['failed'][0]['error']})" if data["failed"] else ""))
    dr = res["direction"]
    parts = []
    if "vector_norm" in dr:
        parts.append(f"|v| = {dr['vector_norm']:.4g}")
    if "item_norm_mean" in dr:
        parts.append(f"|d(x)| = {_g(dr['item_norm_mean'], '{:.4g}')} ± {_g(dr['item_norm_sd'])}, "
                     f"|mean d| = {dr['mean_direction_norm']:.4g}")
    if dr.get("applied_relative_norm_mean") is not None:
        parts.append(f"|d|/|h_final[T]| = {dr['applied_relative_norm_mean']:.3g}, |h_final[T]| = {dr['final_norm_mean']:.4g}")
    if "vector_cos_mean_direction" in dr:
        parts.append(f"cos(v, mean d) = {_g(dr['vector_cos_mean_direction'])}")
    if parts:
        lines.append("; ".join(parts))
    has_exact = any("exact" in e for e in res["lens"].values())
    lines.append(f"logit lens, top {n_tokens} promoted (+) and demoted (-)"
                 + (f"; 'exact' at alpha {src['alpha']:g}:" if has_exact else " (state-free; --data adds the "
                    "lenses at the model's states):"))
    for g, entry in res["lens"].items():
        tag = f"{g}, n={entry['n']}" if entry["n"] else g
        for kind in LENSES:
            if kind in entry:
                lines.append(f"  [{tag}] {kind:8s} + {_fmt_tokens(entry[kind]['promoted'], n_tokens)}")
                lines.append(f"  [{tag}] {kind:8s} - {_fmt_tokens(entry[kind]['demoted'], n_tokens)}")
        for kind, a in entry.get("agreement_with_direct", {}).items():
            lines.append(f"  [{g}] {kind} vs direct: centered cosine {_g(a['centered_cosine'])}, "
                         f"{a['promoted_overlap']}/{res['top_k']} promoted in common")
    pl = res.get("per_layer")
    if pl:
        lines.append("per layer, |h_l(audio)[T] - h_l(silence)[T]| (* = L*):")
        lines.append("  layer   norm mean      sd   relative  consistency  cos(d)")
        cos_d = pl.get("cos_direction_mean") or [None] * len(pl["layers"])
        for l in pl["layers"]:
            lines.append(f"  {'*' if l in pl['marked'] else ' '}{l:>4d}  {_g(pl['norm_mean'][l], '{:10.4g}')}  "
                         f"{_g(pl['norm_sd'][l], '{:7.3g}')}  {_g(pl['relative_norm_mean'][l], '{:8.3g}')}  "
                         f"{_g(pl['consistency'][l], '{:11.3f}')}  {_g(cos_d[l], '{:6.3f}')}")
    tk = res.get("tasks")
    if tk:
        names = tk["tasks"]
        lines.append("task cosines (mean directions | per-item mean pairwise, diagonal = within):")
        lines.append("  " + " " * 8 + "".join(f"{t:>9s}" for t in names) + "  |" + "".join(f"{t:>9s}" for t in names))
        for i, t in enumerate(names):
            lines.append(f"  {t:8s}" + "".join(_g(x, "{:9.3f}") for x in tk["mean_direction_cosine"][i]) + "  |"
                         + "".join(_g(x, "{:9.3f}") if x is not None else f"{'-':>9s}" for x in tk["item_cosine"][i]))
        lines.append(f"  per-item cosine: across tasks {_g(tk['item_cosine_across'])}, all pairs {_g(tk['item_cosine_all'])}")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return lines


def write_outputs(res: dict, out: Path):
    """inspect.json, inspect.txt and the PNGs into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = ["inspect.json", "inspect.txt"]
    pl = res.get("per_layer")
    if pl:
        plot_layers(res, out / "layers.png")
        plot_consistency(res, out / "consistency.png")
        files += ["layers.png", "consistency.png"]
    tk = res.get("tasks")
    if tk and len(tk["tasks"]) > 1:
        plot_tasks(res, out / "tasks.png")
        files.append("tasks.png")
    res["files"] = files
    write_json(out / "inspect.json", res)
    write_atomic(out / "inspect.txt", "\n".join(inspect_lines(res)) + "\n")


def _mark_layers(fig, path: Path, marked: Sequence[int]):
    """Shade L* on a saved curve plot and save it again."""
    if not marked:
        return fig
    ax = fig.axes[0]
    for l in marked:
        ax.axvspan(l - 0.35, l + 0.35, color="0.5", alpha=0.12, lw=0, zorder=0)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.06)
    return fig


def _layer_title(res, what: str) -> str:
    src = res["source"]
    return f"{what}; L* = {src['layers']} shaded" if src.get("layers") else what


def plot_layers(res: dict, path: Path):
    pl = res["per_layer"]
    series = {"all items": pl["norm_mean"]}
    for t, s in pl["by_task"].items():
        series[t] = s["norm_mean"]
    mean = np.array([np.nan if x is None else x for x in pl["norm_mean"]])
    sd = np.array([0.0 if x is None else x for x in pl["norm_sd"]])
    series = {k: [np.nan if x is None else x for x in v] for k, v in series.items()}
    fig = curve_plot(pl["layers"], series, path, "decoder layer", "|h_l(audio)[T] - h_l(silence)[T]|",
                     _layer_title(res, f"Audio-silence contrast per layer (mean over {pl['n']} items, band ±1 sd)"),
                     bands={"all items": (mean - sd, mean + sd)})
    return _mark_layers(fig, path, pl["marked"])


def plot_consistency(res: dict, path: Path):
    pl = res["per_layer"]
    series = {"relative norm |Δ_l| / |h_l(audio)|": pl["relative_norm_mean"],
              "mean pairwise cosine of Δ_l (all items)": pl["consistency"]}
    if pl.get("cos_direction_mean"):
        series["cosine of Δ_l with d"] = pl["cos_direction_mean"]
    series = {k: [np.nan if x is None else x for x in v] for k, v in series.items()}
    fig = curve_plot(pl["layers"], series, path, "decoder layer", "value",
                     _layer_title(res, "Where the audio-silence contrast is large and consistent"))
    return _mark_layers(fig, path, pl["marked"])


def plot_tasks(res: dict, path: Path):
    tk = res["tasks"]
    m = np.array([[np.nan if x is None else x for x in row] for row in tk["item_cosine"]])
    names = tk["tasks"]
    return heatmap(m, path, "Mean pairwise cosine of per-item directions d(x) (diagonal: within a task)", "cosine",
                   center=True, xlabel="task", ylabel="task", xticklabels=names, yticklabels=names, annotate=True)


def inspect(source_path, model_path, data=None, audio_dir=None, out=None, *, limit: int | None = None,
            tasks: Sequence[str] = mmau.TASKS, prompt: str = mmau.DEFAULT_PRESET, top_k: int = 20,
            alpha: float | None = None, progress: bool = True) -> dict:
    """`mlx-listen steer inspect SOURCE`: the files are read and checked before the model loads."""
    headset, vec = read_source(source_path)
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
    model, processor = load(model_path)
    res = inspect_direction(model, processor, headset=headset, vector=None if vec is None else Path(source_path),
                            items=items, audio_dir=audio_dir, prompt_preset=prompt, top_k=top_k, alpha=alpha,
                            progress=progress)
    res["model"]["path"] = str(model_path)
    if data is not None:
        res["data"].update(path=str(data), sha256=mmau.file_sha256(data), tasks=list(tasks), limit=limit)
    if out is not None:
        write_outputs(res, Path(out))
    return res
