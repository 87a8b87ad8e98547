"""Two-group intervals the reports print: AUC (pooled and within strata) and mean differences with
bootstrap intervals. Paired comparisons are in `paired.py`."""

from __future__ import annotations

import numpy as np

from ..errors import ListenError
from ._common import _sps

# -- two-group comparisons (validation) ----------------------------------------------------------

def _as_values(x, what: str) -> np.ndarray:
    v = np.asarray(x, np.float64).ravel()
    if not np.isfinite(v).all():
        raise ListenError(f"{what} holds NaN or infinite values")
    return v


def _auc_rows(P: np.ndarray, N: np.ndarray) -> np.ndarray:
    """AUC per row of (B, n_pos) positives and (B, n_neg) negatives, from midranks."""
    ranks = _sps.rankdata(np.concatenate([P, N], axis=1), axis=1)
    n1, n0 = P.shape[1], N.shape[1]
    return (ranks[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auc(pos, neg) -> float:
    """ROC AUC of a score for pos vs neg: Mann-Whitney U / (n_pos n_neg), ties count half; NaN when a
    group is empty."""
    p, n = _as_values(pos, "pos"), _as_values(neg, "neg")
    if not p.size or not n.size:
        return float("nan")
    return float(_auc_rows(p[None], n[None])[0])


def _boot_two(a, b, stat, n_boot, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    step = max(1, 4_000_000 // (a.size + b.size))
    for s in range(0, n_boot, step):
        m = min(step, n_boot - s)
        out[s:s + m] = stat(a[rng.integers(0, a.size, (m, a.size))], b[rng.integers(0, b.size, (m, b.size))])
    return out


def _two_group(a, b, point, stat, n_boot, seed, min_group, names) -> dict:
    na, nb = a.size, b.size
    res = {names[0]: na, names[1]: nb, "min_group": min_group}
    res["estimate"] = float(point) if na and nb else None
    small = na < min_group or nb < min_group
    res["too_small"] = bool(small)
    if small:
        res["ci95"] = None
        res["reason"] = f"fewer than {min_group} items in a group ({names[0]}={na}, {names[1]}={nb})"
    else:
        d = _boot_two(a, b, stat, int(n_boot), seed)
        res["ci95"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
        res["n_boot"], res["seed"] = int(n_boot), seed
    return res


def auc_ci(pos, neg, n_boot: int = 2000, seed: int = 0, min_group: int = 10) -> dict:
    """AUC with a 95% percentile-bootstrap CI, pos and neg resampled separately.

    {"auc", "ci95", "n_pos", "n_neg", "too_small", ...}. With fewer than `min_group` items in a
    group, `too_small` is True and ci95 None (the AUC is still given; None if a group is empty)."""
    p, n = _as_values(pos, "pos"), _as_values(neg, "neg")
    res = _two_group(p, n, auc(p, n) if p.size and n.size else None, _auc_rows, n_boot, seed, min_group,
                     ("n_pos", "n_neg"))
    res["auc"] = res.pop("estimate")
    return res


def mean_diff_ci(a, b, n_boot: int = 2000, seed: int = 0, min_group: int = 10) -> dict:
    """mean(a) - mean(b) with a 95% percentile-bootstrap CI (groups resampled separately); same
    too-small convention as `auc_ci`."""
    x, y = _as_values(a, "a"), _as_values(b, "b")
    point = x.mean() - y.mean() if x.size and y.size else None
    res = _two_group(x, y, point, lambda P, N: P.mean(1) - N.mean(1), n_boot, seed, min_group, ("n_a", "n_b"))
    res["difference"] = res.pop("estimate")
    res["mean_a"] = float(x.mean()) if x.size else None
    res["mean_b"] = float(y.mean()) if y.size else None
    return res


def stratified_auc(scores, positive, strata) -> float | None:
    """`stratified_auc_ci`'s point estimate alone (None when no stratum holds both groups)."""
    x = _as_values(scores, "scores")
    pos = np.asarray(positive, bool).ravel()
    st = np.asarray(strata).astype(str).ravel()
    num = den = 0.0
    for name in set(st.tolist()):
        P, N = x[(st == name) & pos], x[(st == name) & ~pos]
        if P.size and N.size:
            num += float(_auc_rows(P[None], N[None])[0]) * P.size * N.size
            den += P.size * N.size
    return num / den if den else None


def stratified_auc_ci(scores, positive, strata, n_boot: int = 2000, seed: int = 0, min_group: int = 10) -> dict:
    """The AUC of `scores` for positive vs negative items counting only pairs in the same stratum:
    sum over strata of the Mann-Whitney U, over the sum of n_pos x n_neg (a stratum with one group
    empty adds nothing). A score that tracks the strata alone (e.g. correctness, when the strata are
    right and wrong answers) gets 0.5 however strongly the strata predict `positive`.

    95% percentile bootstrap, positives and negatives resampled within each stratum. Returns
    {"auc", "ci95", "n_pos", "n_neg" (in usable strata), "strata": {name: {n_pos, n_neg, auc}},
    "too_small"} with the `auc_ci` convention (fewer than `min_group` usable positives or
    negatives: no interval)."""
    x = _as_values(scores, "scores")
    pos = np.asarray(positive, bool).ravel()
    st = np.asarray(strata).astype(str).ravel()
    if not (x.size == pos.size == st.size):
        raise ListenError(f"{x.size} scores, {pos.size} labels and {st.size} strata")
    rng = np.random.default_rng(seed)
    per, u_total, pairs, boot_u = {}, 0.0, 0, np.zeros(int(n_boot))
    n_pos = n_neg = 0
    for name in sorted(set(st.tolist())):
        P, N = x[(st == name) & pos], x[(st == name) & ~pos]
        per[name] = {"n_pos": int(P.size), "n_neg": int(N.size),
                     "auc": float(_auc_rows(P[None], N[None])[0]) if P.size and N.size else None}
        if not (P.size and N.size):
            continue
        n_pos, n_neg = n_pos + P.size, n_neg + N.size
        w = P.size * N.size
        u_total += per[name]["auc"] * w
        pairs += w
        boot_u += _boot_two(P, N, _auc_rows, int(n_boot), int(rng.integers(1 << 31))) * w
    out = {"auc": u_total / pairs if pairs else None, "n_pos": n_pos, "n_neg": n_neg, "strata": per,
           "min_group": min_group, "too_small": n_pos < min_group or n_neg < min_group}
    if out["too_small"] or not pairs:
        out["ci95"] = None
        out["reason"] = (f"fewer than {min_group} items in a group within strata that have both "
                         f"(positive {n_pos}, negative {n_neg})")
    else:
        b = boot_u / pairs
        out["ci95"] = [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
        out["n_boot"], out["seed"] = int(n_boot), seed
    return out
