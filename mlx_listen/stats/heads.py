"""Head scores (pooled or within-task partial correlation), the top k, and their chance reference:
the permutation null, bootstrap stability and set overlaps."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ListenError
from ._common import _CHUNK, _HEAD_TOL, _TIE, _prepare, _Prepared, _sps, _unit_mass
from .folds import _bootstrap_weights, _stratified_labels

# -- head scores -------------------------------------------------------------------------------

def head_scores(mass, correct, *, center: str = "none", tasks=None, covariates=None) -> np.ndarray:
    """(layers, heads) correlation of audio mass with correctness.

    center="none": pooled Pearson r (point-biserial), the paper's score. center="task": partial
    correlation given the task (dummies) and `covariates` (e.g. `length_covariate(audio_tokens)`),
    i.e. the Pearson r of the least-squares residuals. `covariates` also works with "none"
    (intercept + covariates). Heads with no variation left get 0. Raises ListenError when the
    correlation is undefined (all right / all wrong, or correctness constant within every task).
    """
    p = _prepare(mass, correct, center, tasks, covariates)
    r = (p.c_res @ _unit_mass(p)) / np.linalg.norm(p.c_res)
    return np.clip(r, -1.0, 1.0).reshape(p.shape)


def weighted_head_scores(mass, correct, weights, *, center: str = "none", tasks=None,
                         covariates=None) -> np.ndarray:
    """`head_scores` for B weight vectors at once: (B, N) nonnegative weights -> (B, layers, heads).

    Integer weights w give exactly `head_scores` on the data with item i repeated w[i] times (a
    bootstrap resample); 0/1 weights give a subset. Weighted least squares residualisation, via
    the Gram matrices, so each block of weight vectors costs a few matrix products. A row whose
    correlation is undefined (correctness explained by the design on its support) is NaN; heads
    without variation on a row's support get 0.
    """
    p = _prepare(mass, correct, center, tasks, covariates)
    W = np.asarray(weights, np.float64)
    W = W[None] if W.ndim == 1 else W
    n = p.a.shape[0]
    if W.ndim != 2 or W.shape[1] != n:
        raise ListenError(f"weights must be (B, {n}), got {W.shape}")
    if (W < 0).any() or not np.isfinite(W).all():
        raise ListenError("weights must be finite and nonnegative")
    return _weighted_r(p, W).reshape((W.shape[0],) + p.shape)


def _weighted_r(p: _Prepared, W: np.ndarray) -> np.ndarray:
    """(B, M) weighted partial correlations (see `weighted_head_scores`)."""
    X, A0, c0 = p.X, p.a_res, p.c_res  # residuals: same span, better conditioned Gram differences
    A0c, A0sq, a_raw_sq = A0 * c0[:, None], A0**2, p.a**2
    out = np.empty((W.shape[0], A0.shape[1]))
    for s in range(0, W.shape[0], _CHUNK // 4):
        w = W[s:s + _CHUNK // 4]
        WXt = (w[:, :, None] * X[None]).transpose(0, 2, 1)  # (b, p, N)
        Gi = np.linalg.pinv(WXt @ X)  # (b, p, p); pinv: a task with no weight leaves a zero row
        Ua = (WXt.reshape(-1, X.shape[0]) @ A0).reshape(len(w), X.shape[1], -1)  # (b, p, M): one GEMM
        uc = WXt @ c0  # (b, p)
        GiUa = Gi @ Ua
        num = w @ A0c - np.einsum("bp,bpm->bm", uc, GiUa)
        daa = w @ A0sq - np.einsum("bpm,bpm->bm", Ua, GiUa)
        dcc = w @ c0**2 - np.einsum("bp,bpq,bq->b", uc, Gi, uc)
        ok_a = p.a_ok & (daa > _HEAD_TOL**2 * (w @ a_raw_sq))
        den = np.sqrt(np.where(ok_a, daa, 1.0) * np.maximum(dcc, 1e-300)[:, None])
        r = np.where(ok_a, num / den, 0.0)
        r[dcc <= 1e-10 * np.maximum(w.sum(1), 1.0)] = np.nan
        out[s:s + len(w)] = np.clip(r, -1.0, 1.0)
    return out


class TopK(NamedTuple):
    heads: list[tuple[int, int]]  # best first
    r: list[float]  # their scores
    nonpositive: list[tuple[int, int]]  # chosen heads with r <= 0: warn, they are not "specialists"


def _check_k(k, n_total: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ListenError(f"k must be a positive integer, got {k!r}")
    if k > n_total:
        raise ListenError(f"k={k} is more than the {n_total} heads of this model")
    return int(k)


def _rank_rows(R: np.ndarray, k: int) -> np.ndarray:
    """(B, k) flat indices of the k largest per row; ties by index (= by (layer, head))."""
    return np.argsort(-R, axis=1, kind="stable")[:, :k]


def top_k(scores, k: int) -> TopK:
    """The k highest-scoring heads, best first; ties broken by (layer, head).

    Refuses k larger than the number of heads; the chosen heads with r <= 0 are listed in
    `nonpositive` (a model with few heads, or a weak signal, can fill the top k with them)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 2:
        raise ListenError(f"scores must be (layers, heads), got shape {s.shape}")
    if np.isnan(s).any():
        raise ListenError("scores hold NaN")
    k = _check_k(k, s.size)
    H = s.shape[1]
    idx = _rank_rows(s.reshape(1, -1), k)[0]
    heads = [(int(i // H), int(i % H)) for i in idx]
    r = [float(s[l, h]) for l, h in heads]
    return TopK(heads, r, [hd for hd, v in zip(heads, r) if v <= 0])


# -- chance and stability ----------------------------------------------------------------------

def _within_task_permutations(c: np.ndarray, codes: np.ndarray, n_perm: int, rng) -> np.ndarray:
    """(n_perm, N): c shuffled independently within each task, one row per permutation."""
    out = np.empty((n_perm, c.size))
    for t in np.unique(codes):
        idx = np.flatnonzero(codes == t)
        out[:, idx] = rng.permuted(np.broadcast_to(c[idx], (n_perm, idx.size)), axis=1)
    return out


def permutation_null(mass, correct, *, k: int, n_perm: int = 200, seed: int = 0, tasks=None,
                     center: str = "none", covariates=None) -> dict:
    """Chance reference for the top-k scores: correctness shuffled within task, heads re-scored.

    Returns (JSON-ready):
    - observed_heads / observed_r: the observed top k (as `top_k`);
    - null_topk: (n_perm, k) sorted top-k r of each permutation;
    - rank_q50 / rank_q95 / rank_q99: per rank j, quantiles of the j-th best null r (the curve
      to draw on the score plot);
    - fwer_threshold: 95th percentile of the null maximum r; a head above it beats chance at the
      family-wise 5% level; n_beating_null: how many of the observed top k are above it;
    - p_rank: per rank j, (1 + #{null j-th best >= observed j-th best}) / (1 + n_perm);
    - p_fwer: per observed head, the max-T adjusted p (1 + #{null max >= r}) / (1 + n_perm);
    - p_set: the same for the mean of the top-k r (is the set as a whole better than chance?).
    """
    p = _prepare(mass, correct, center, tasks, covariates)
    M = p.a.shape[1]
    k = _check_k(k, M)
    if isinstance(n_perm, bool) or int(n_perm) < 1:
        raise ListenError(f"n_perm must be a positive integer, got {n_perm!r}")
    n_perm = int(n_perm)
    U = _unit_mass(p)
    obs_all = np.clip((p.c_res @ U) / np.linalg.norm(p.c_res), -1, 1)
    obs = top_k(obs_all.reshape(p.shape), k)
    rng = np.random.default_rng(seed)
    null = np.empty((n_perm, k))
    for s in range(0, n_perm, _CHUNK):
        C = _within_task_permutations(p.c, p.codes, min(_CHUNK, n_perm - s), rng)
        Cr = C - (C @ p.Q) @ p.Q.T
        cn = np.linalg.norm(Cr, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            R = np.where(cn[:, None] > 1e-8, (Cr @ U) / cn[:, None], 0.0)
        part = np.partition(R, M - k, axis=1)[:, M - k:]
        null[s:s + len(C)] = -np.sort(-part, axis=1)
    o = np.array(obs.r)
    thr = float(np.quantile(null[:, 0], 0.95))
    o_tie = o - _TIE  # a null r equal to the observed one up to rounding counts as reaching it
    ep = lambda hits: ((1 + hits) / (1 + n_perm)).tolist()  # noqa: E731
    return {
        "k": k, "n_perm": n_perm, "seed": seed, "center": center,
        "stratified_by_task": tasks is not None, "n_items": int(p.a.shape[0]),
        "observed_heads": [list(h) for h in obs.heads], "observed_r": obs.r,
        "null_topk": null.tolist(),
        "rank_q50": np.quantile(null, 0.50, axis=0).tolist(),
        "rank_q95": np.quantile(null, 0.95, axis=0).tolist(),
        "rank_q99": np.quantile(null, 0.99, axis=0).tolist(),
        "fwer_threshold": thr,
        "n_beating_null": int((o > thr).sum()),
        "p_rank": ep((null >= o_tie[None, :]).sum(0)),
        "p_fwer": ep((null[:, :1] >= o_tie[None, :]).sum(0)),
        "p_set": float((1 + (null.mean(1) >= o.mean() - _TIE).sum()) / (1 + n_perm)),
    }


def bootstrap_stability(mass, correct, *, k: int, n_boot: int = 200, seed: int = 0, tasks=None,
                        center: str = "none", covariates=None) -> np.ndarray:
    """(layers, heads) share of task-stratified bootstrap resamples in which each head is in the top k.

    Resamples whose correlation is undefined (all outcomes equal within every task) are skipped;
    the frequency is over the rest (ListenError when none is left)."""
    p = _prepare(mass, correct, center, tasks, covariates)
    k = _check_k(k, p.a.shape[1])
    if isinstance(n_boot, bool) or int(n_boot) < 1:
        raise ListenError(f"n_boot must be a positive integer, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    R = _weighted_r(p, _bootstrap_weights(p.codes, int(n_boot), rng))
    R = R[~np.isnan(R).any(1)]
    if not len(R):
        raise ListenError("every bootstrap resample had a single outcome per task: no stability estimate")
    hits = np.zeros(p.a.shape[1])
    np.add.at(hits, _rank_rows(R, k).ravel(), 1)
    return (hits / len(R)).reshape(p.shape)


def null_stability(mass, correct, *, k: int, n_boot: int = 200, seed: int = 0, tasks=None, center: str = "none",
                   covariates=None, n_shuffles: int = 3) -> dict:
    """The reference for `bootstrap_stability`: the mean bootstrap frequency of the top k found on the
    same mass with correctness shuffled within task (nothing to find), over `n_shuffles` shuffles.
    Top-k heads of real data whose mean frequency is near this are no more stable than noise."""
    p = _prepare(mass, correct, center, tasks, covariates)
    rng = np.random.default_rng(seed)
    vals = []
    for i in range(int(n_shuffles)):
        c = _within_task_permutations(p.c, p.codes, 1, rng)[0]
        c = c.astype(bool) if np.isin(p.c, (0, 1)).all() else c
        kw = dict(tasks=tasks, center=center, covariates=covariates)
        top = top_k(head_scores(mass, c, **kw), k)
        freq = bootstrap_stability(mass, c, k=k, n_boot=n_boot, seed=seed + 1 + i, **kw)
        vals.append(float(np.mean([freq[l, h] for l, h in top.heads])))
    return {"mean": float(np.mean(vals)), "values": vals, "n_shuffles": int(n_shuffles), "n_boot": int(n_boot),
            "definition": "mean bootstrap frequency of the top k with correctness shuffled within task"}


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two head sets (1.0 when both are empty)."""
    A, B = {tuple(map(int, x)) for x in a}, {tuple(map(int, x)) for x in b}
    return 1.0 if not (A or B) else len(A & B) / len(A | B)


def set_overlap(a, b) -> dict:
    """The overlap of two head sets, for the report (e.g. pooled vs task-centred heads)."""
    A, B = {tuple(map(int, x)) for x in a}, {tuple(map(int, x)) for x in b}
    return {"n_a": len(A), "n_b": len(B), "n_common": len(A & B), "common": [list(h) for h in sorted(A & B)],
            "jaccard": jaccard(A, B)}


def chance_jaccard(k: int, n_total: int) -> float:
    """Expected Jaccard of two independent uniformly random k-subsets of n_total heads (exact)."""
    x = np.arange(0, k + 1)
    pmf = _sps.hypergeom.pmf(x, n_total, k, k)
    return float((pmf * x / (2 * k - x)).sum())


def split_half_jaccard(mass, correct, *, k: int, n_repeats: int = 50, seed: int = 0, tasks=None,
                       center: str = "none", covariates=None) -> dict:
    """Stability of the top k: Jaccard of the top k found on two disjoint task-stratified halves.

    Returns mean / sd / values over the repeats whose two halves both have a defined score, and
    `chance`, the expected Jaccard of two random k-subsets (what a pure-noise ranking gives)."""
    p = _prepare(mass, correct, center, tasks, covariates)
    M = p.a.shape[1]
    k = _check_k(k, M)
    rng = np.random.default_rng(seed)
    W = np.empty((2 * n_repeats, p.a.shape[0]))
    for i in range(n_repeats):
        lab = _stratified_labels(p.codes, 2, rng)
        W[2 * i], W[2 * i + 1] = lab == 0, lab == 1
    R = _weighted_r(p, W)
    vals = []
    for i in range(n_repeats):
        if np.isnan(R[2 * i]).any() or np.isnan(R[2 * i + 1]).any():
            continue
        top = _rank_rows(R[2 * i:2 * i + 2], k)
        vals.append(len(set(top[0]) & set(top[1])) / len(set(top[0]) | set(top[1])))
    if not vals:
        raise ListenError("no split half had both outcomes within a task: no stability estimate")
    v = np.array(vals)
    return {"k": k, "n_repeats": len(vals), "seed": seed, "center": center, "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "values": v.tolist(),
            "chance": chance_jaccard(k, M)}


