"""Paired comparisons (the same items under two conditions): accuracy differences with an interval
and a test that come from one method, so they always agree; mean differences of a graded score;
Holm; and the smallest effect a design can detect.

- `paired_accuracy(..., method="score")` (the default): Tango's asymptotic score interval for the
  difference of paired proportions (Tango 1998, Stat Med 17:891), inverted from the same score
  statistic whose value at 0 is McNemar's z = (b - c) / sqrt(b + c); the p-value is that score
  test's. So the interval excludes 0 exactly when p < 0.05 (the "CI excludes 0 while McNemar
  p = 0.065 on the same line" disagreement of an exact test beside a Newcombe interval cannot
  happen). Fagerland, Lydersen & Laake (2013, BMC Med Res Methodol 13:91; 2014, Stat Med 33:2850)
  recommend both: the asymptotic McNemar test keeps its size better than the exact conditional
  one, which is conservative, and Tango's interval covers well down to small discordant counts.
  The exact McNemar p is still recorded (`mcnemar_exact_p`), for reference only.
- `method="newcombe"` (square-and-add) and `"bootstrap"` remain; their `p` is the exact McNemar p
  (no dual test exists), so only the score method guarantees agreement.
- `paired_mean_diff`: mean of treat - base with the t interval and the t test's p (dual).
- `mde(n, sd)`: the smallest true mean difference a two-sided level-0.05 test on n paired items
  with per-item difference sd detects with 80% power, (z_0.975 + z_0.8) sd / sqrt(n); for paired
  accuracy sd = sqrt(discordant share) (the per-item difference's sd at no effect).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ListenError
from ._common import _as_correct, _sps, _task_codes
from .exact import Z95, mcnemar_exact, wilson

P_METHODS = {"score": "McNemar score test (asymptotic), dual to the Tango interval",
             "newcombe": "McNemar exact test (the Newcombe interval has no dual test)",
             "bootstrap": "McNemar exact test (the bootstrap interval has no dual test)"}


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


def _norm_sf2(z: float) -> float:
    """Two-sided normal tail 2(1 - Phi(|z|)), without scipy."""
    return math.erfc(abs(z) / math.sqrt(2.0))


# -- Tango's score interval and the McNemar score test ---------------------------------------------

def tango_statistic(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: (b - c) / n = delta, where b counts items right under the
    first condition only and c under the second only, out of n pairs. At delta = 0 it is McNemar's
    z = (b - c) / sqrt(b + c) (0 when b = c = 0)."""
    A = 2.0 * n
    B = -b - c + (2.0 * n - b + c) * delta
    C = -c * delta * (1.0 - delta)
    p21 = (math.sqrt(max(B * B - 4 * A * C, 0.0)) - B) / (2 * A)  # the MLE of p21 under H0
    var = n * (2 * p21 + delta * (1 - delta))
    num = b - c - n * delta
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def mcnemar_score_p(b: int, c: int) -> float:
    """Two-sided p of the asymptotic McNemar (score) test; 1 when there is no discordant pair."""
    return 1.0 if b + c == 0 else _norm_sf2((b - c) / math.sqrt(b + c))


def tango_ci(b: int, c: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Tango's asymptotic score interval for (b - c) / n: every delta the score test does not reject
    at two-sided level 2(1 - Phi(z)); the statistic falls in delta, so each bound is one root."""
    if n <= 0:
        raise ListenError("no pairs")
    est = (b - c) / n

    def root(target: float, lo: float, hi: float) -> float:  # T(lo) > target > T(hi), T decreasing
        for _ in range(200):
            mid = (lo + hi) / 2
            if tango_statistic(b, c, n, mid) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-13:
                break
        return (lo + hi) / 2

    eps = 1e-12
    lower = -1.0 if tango_statistic(b, c, n, -1 + eps) <= z else root(z, -1 + eps, est)
    upper = 1.0 if tango_statistic(b, c, n, 1 - eps) >= -z else root(-z, est, 1 - eps)
    return max(-1.0, lower), min(1.0, upper)


def newcombe_paired_ci(n11: int, n12: int, n21: int, n22: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's square-and-add CI for p1 - p2 of paired proportions (method 10, phi shrunk toward 0
    by n/2 when positive, as in Fagerland, Lydersen & Laake 2014).

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


# -- the smallest detectable effect -------------------------------------------------------------------

Z80 = 0.8416212335729143  # the 80th percentile of the standard normal


def mde(n: int, sd: float) -> float | None:
    """Smallest true mean difference a two-sided 5% test on `n` paired items whose per-item
    difference has standard deviation `sd` detects with 80% power (normal approximation)."""
    if n < 2 or sd is None or not np.isfinite(sd):
        return None
    return float((Z95 + Z80) * sd / math.sqrt(n))


def accuracy_mde(n: int, discordant: int) -> float | None:
    """`mde` of a paired accuracy difference with `discordant` items that differ between the two
    conditions out of `n` (the per-item difference's sd at no effect is sqrt(discordant / n))."""
    return mde(n, math.sqrt(discordant / n)) if n >= 2 else None


# -- paired accuracy -------------------------------------------------------------------------------

def _paired_row(base: np.ndarray, treat: np.ndarray, method: str, n_boot: int, seed: int, min_group: int) -> dict:
    n = base.size
    both = int((base & treat).sum())
    w2r = int((~base & treat).sum())
    r2w = int((base & ~treat).sum())
    neither = n - both - w2r - r2w
    exact = mcnemar_exact(w2r, r2w)
    row = {"n": n, "base_accuracy": float(base.mean()), "treat_accuracy": float(treat.mean()),
           "difference": (w2r - r2w) / n, "wrong_to_right": w2r, "right_to_wrong": r2w,
           "both_right": both, "both_wrong": neither,
           "p": mcnemar_score_p(w2r, r2w) if method == "score" else exact,
           "mcnemar_exact_p": exact, "too_small": n < min_group,
           "mde80": accuracy_mde(n, w2r + r2w)}
    if n < min_group:
        row["ci95"] = None
    elif method == "score":
        row["ci95"] = list(tango_ci(w2r, r2w, n))
    elif method == "newcombe":
        row["ci95"] = list(newcombe_paired_ci(both, w2r, r2w, neither))
    else:  # paired bootstrap: items resampled as pairs = the four cells resampled multinomially
        cells = np.random.default_rng(seed).multinomial(n, np.array([w2r, r2w, both, neither]) / n, size=n_boot)
        d = (cells[:, 0] - cells[:, 1]) / n
        row["ci95"] = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    return row


def paired_accuracy(base_correct, treat_correct, *, tasks=None, method: str = "score", n_boot: int = 10_000,
                    seed: int = 0, min_group: int = 10) -> dict:
    """Steered (treat) minus unsteered (base) accuracy on the same items.

    Overall and (with `tasks`) per task: n, both accuracies, difference, 95% paired CI and its `p`
    (`method`: "score", the default: Tango's interval with the McNemar score test, dual; or
    "newcombe" / "bootstrap" with the exact McNemar p), discordant counts (wrong_to_right,
    right_to_wrong), `mde80` (the smallest difference detectable with 80% power at this n and
    discordance); per-task rows also carry `p_holm`, Holm over the tasks. Rows under `min_group`
    items get ci95 None and too_small True."""
    b = _as_correct(base_correct)
    t = _as_correct(treat_correct, b.size)
    if not b.size:
        raise ListenError("no items to compare")
    if method not in P_METHODS:
        raise ListenError(f"unknown paired CI method {method!r}: use one of {', '.join(P_METHODS)}")
    out = {"method": method, "p_method": P_METHODS[method], "level": 0.95,
           **_paired_row(b, t, method, n_boot, seed, min_group)}
    if tasks is not None:
        codes, names = _task_codes(tasks, b.size)
        rows = [{"task": name, **_paired_row(b[codes == j], t[codes == j], method, n_boot, seed + 1 + j, min_group)}
                for j, name in enumerate(names)]
        for row, adj in zip(rows, holm([r["p"] for r in rows])):
            row["p_holm"] = adj
        out["per_task"] = rows
    return out


def paired_mean_diff(base, treat, level: float = 0.95, min_group: int = 10) -> dict:
    """Mean of treat − base over paired items (e.g. the correct option's log-prob margin, steered
    against unsteered; or per-item accuracy averaged over repeats), with its t interval and the t
    test's two-sided p (one method: the interval excludes 0 exactly when p < 1 - level), and `mde80`.
    Non-finite pairs are dropped and counted; under `min_group` pairs ci95 and p are None."""
    b = np.asarray(base, np.float64).ravel()
    t = np.asarray(treat, np.float64).ravel()
    if b.shape != t.shape:
        raise ListenError(f"paired values of unequal length: {b.size} and {t.size}")
    keep = np.isfinite(b) & np.isfinite(t)
    d = t[keep] - b[keep]
    n = int(d.size)
    out = {"n": n, "dropped": int((~keep).sum()), "level": level, "p_method": "paired t test, dual to the t interval",
           "base_mean": float(b[keep].mean()) if n else None, "treat_mean": float(t[keep].mean()) if n else None,
           "difference": float(d.mean()) if n else None, "ci95": None, "p": None, "too_small": n < min_group,
           "sd": float(d.std(ddof=1)) if n > 1 else None}
    out["mde80"] = mde(n, out["sd"]) if n > 1 else None
    if n >= max(min_group, 2):
        se = float(d.std(ddof=1)) / np.sqrt(n)
        q = float(_sps.t.ppf(0.5 + level / 2, n - 1))
        out["ci95"] = [out["difference"] - q * se, out["difference"] + q * se]
        if se > 0:
            out["p"] = float(2 * _sps.t.sf(abs(out["difference"]) / se, n - 1))
        else:  # every item moved by the same amount: no spread to test against
            out["p"] = 1.0 if out["difference"] == 0 else 0.0
    return out
