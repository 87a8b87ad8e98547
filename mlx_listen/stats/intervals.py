"""Intervals and tests the reports print: Wilson, McNemar, Holm, Newcombe's paired interval, paired
accuracy and mean differences, AUC and two-group bootstrap intervals."""

from __future__ import annotations

import numpy as np

from ..errors import ListenError
from ._common import _as_correct, _sps, _task_codes
from .exact import Z95, mcnemar_exact, wilson

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


# -- paired accuracy -------------------------------------------------------------------------------

def holm(pvals) -> list[float]:
    """Holm step-down adjusted p-values, in the input order (monotone, capped at 1)."""
    p = np.asarray(pvals, np.float64).ravel()
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ListenError("p-values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def newcombe_paired_ci(n11: int, n12: int, n21: int, n22: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's square-and-add CI for p1 - p2 of paired proportions (see the module notes).

    n11: both right; n12: first right, second wrong; n21: first wrong, second right; n22: both
    wrong. p1 = (n11 + n12) / n, p2 = (n11 + n21) / n."""
    n = n11 + n12 + n21 + n22
    z = Z95 if level == 0.95 else float(_sps.norm.ppf(0.5 + level / 2))
    p1, p2 = (n11 + n12) / n, (n11 + n21) / n
    l1, u1 = wilson(n11 + n12, n, z)
    l2, u2 = wilson(n11 + n21, n, z)
    margins = (n11 + n12) * (n21 + n22) * (n11 + n21) * (n12 + n22)
    phi = 0.0
    if margins > 0:
        a = n11 * n22 - n12 * n21
        phi = (a - n / 2 if a > n / 2 else 0.0 if a >= 0 else a) / np.sqrt(float(margins))
    d = p1 - p2
    lo = d - np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + np.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, float(lo)), min(1.0, float(hi))


def _paired_row(base: np.ndarray, treat: np.ndarray, method: str, n_boot: int, seed: int, min_group: int) -> dict:
    n = base.size
    both = int((base & treat).sum())
    w2r = int((~base & treat).sum())
    r2w = int((base & ~treat).sum())
    neither = n - both - w2r - r2w
    row = {"n": n, "base_accuracy": float(base.mean()), "treat_accuracy": float(treat.mean()),
           "difference": (w2r - r2w) / n, "wrong_to_right": w2r, "right_to_wrong": r2w,
           "both_right": both, "both_wrong": neither, "mcnemar_p": mcnemar_exact(w2r, r2w),
           "too_small": n < min_group}
    if n < min_group:
        row["ci95"] = None
    elif method == "newcombe":
        row["ci95"] = list(newcombe_paired_ci(both, w2r, r2w, neither))
    else:  # paired bootstrap: items resampled as pairs = the four cells resampled multinomially
        cells = np.random.default_rng(seed).multinomial(n, np.array([w2r, r2w, both, neither]) / n, size=n_boot)
        d = (cells[:, 0] - cells[:, 1]) / n
        row["ci95"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    return row


def paired_accuracy(base_correct, treat_correct, *, tasks=None, method: str = "newcombe", n_boot: int = 10_000,
                    seed: int = 0, min_group: int = 10) -> dict:
    """Steered (treat) minus unsteered (base) accuracy on the same items.

    Overall and (with `tasks`) per task: n, both accuracies, difference, 95% paired CI
    (`method`: "newcombe", the default, or "bootstrap"), discordant counts (wrong_to_right,
    right_to_wrong), McNemar exact p; per-task rows also carry `p_holm`, the Holm adjustment over
    the tasks. Rows under `min_group` items get ci95 None and too_small True."""
    b = _as_correct(base_correct)
    t = _as_correct(treat_correct, b.size)
    if not b.size:
        raise ListenError("no items to compare")
    if method not in ("newcombe", "bootstrap"):
        raise ListenError(f"unknown paired CI method {method!r}: use newcombe or bootstrap")
    out = {"method": method, "level": 0.95, **_paired_row(b, t, method, n_boot, seed, min_group)}
    if tasks is not None:
        codes, names = _task_codes(tasks, b.size)
        rows = [{"task": name, **_paired_row(b[codes == j], t[codes == j], method, n_boot, seed + 1 + j, min_group)}
                for j, name in enumerate(names)]
        for row, adj in zip(rows, holm([r["mcnemar_p"] for r in rows])):
            row["p_holm"] = adj
        out["per_task"] = rows
    return out


def paired_mean_diff(base, treat, level: float = 0.95, min_group: int = 10) -> dict:
    """Mean of treat − base over paired items (e.g. the correct option's log-prob margin, steered
    against unsteered), with its t interval (scipy's; paired, so the items' own spread cancels).
    Non-finite pairs are dropped and counted; under `min_group` pairs ci95 is None."""
    b = np.asarray(base, np.float64).ravel()
    t = np.asarray(treat, np.float64).ravel()
    if b.shape != t.shape:
        raise ListenError(f"paired values of unequal length: {b.size} and {t.size}")
    keep = np.isfinite(b) & np.isfinite(t)
    d = t[keep] - b[keep]
    n = int(d.size)
    out = {"n": n, "dropped": int((~keep).sum()), "level": level,
           "base_mean": float(b[keep].mean()) if n else None, "treat_mean": float(t[keep].mean()) if n else None,
           "difference": float(d.mean()) if n else None, "ci95": None, "too_small": n < min_group}
    if n >= max(min_group, 2):
        se = float(d.std(ddof=1)) / np.sqrt(n)
        half = float(_sps.t.ppf(0.5 + level / 2, n - 1)) * se
        out["ci95"] = [out["difference"] - half, out["difference"] + half]
    return out


