"""Statistics of steering directions over items, accumulated one item at a time (no per-item vector
kept, so memory stays O(layers x hidden) at any N): per-layer audio-silence differences, per-input
directions d(x), the lens contributions, per task and over all items (`mlx-listen steer inspect`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..eval import mmau

ALL = "all"


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
