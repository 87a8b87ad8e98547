"""Statistics for the head experiment: head scores with a chance reference, their stability,
matched random-head controls, and the CIs / tests the reports print. Pure numpy/scipy; it reads
no model and imports nothing from the package except `ListenError`.

Inputs are record-level arrays: `mass` (N, layers, heads) audio mass at the last prompt token,
`correct` (N,) bool, `tasks` (N,) task names, `audio_tokens` (N,) ints. Every dict returned is
strict JSON as it stands (python floats / ints / lists; `None` where a value is undefined).

API (one line each; details in the docstrings):

Head scores
- `head_scores(mass, correct, *, center="none", tasks=None, covariates=None) -> (L, H)`:
  "none" is the paper's pooled Pearson r (`heads.head_scores`: constant heads 0, all-right /
  all-wrong refused); "task" is the partial correlation given task indicators (and
  `covariates`, e.g. `length_covariate(audio_tokens)`): the Pearson r of the residuals of mass
  and of correctness after least squares on [task dummies, covariates].
- `length_covariate(audio_tokens) -> (N,)`: log audio length, the covariate `--center task`
  partials out.
- `weighted_head_scores(mass, correct, weights, ...) -> (B, L, H)`: the same score for B weight
  vectors at once (bootstrap counts, 0/1 halves); equals `head_scores` on the replicated rows.
- `top_k(scores, k) -> TopK(heads, r, nonpositive)`: best first, ties by (layer, head); refuses
  k > number of heads; `nonpositive` lists the chosen heads with r <= 0 so the caller can warn.
- `permutation_null(mass, correct, *, k, n_perm=200, seed=0, tasks, center, covariates) -> dict`:
  correctness shuffled within task; per-rank null quantiles of the j-th best r, the family-wise
  threshold (95th percentile of the null maximum), p per rank, max-T adjusted p per head, a set
  p for the mean top-k r, and `n_beating_null`.
- `bootstrap_stability(...) -> (L, H)`: frequency of each head in the top k over task-stratified
  bootstrap resamples.
- `split_half_jaccard(...) -> dict`: Jaccard of the top k of two task-stratified random halves,
  over repeats, with the exact chance level for random k-subsets.
- `jaccard(a, b)`, `set_overlap(a, b) -> dict`: overlap of two head sets (e.g. pooled vs
  task-centred).

Random-head controls
- `matched_random_sets(heads, n_layers, n_heads, n_sets=10, seed=0, exclude=None)`: sets with
  the same number of heads, the same number of distinct layers and the same per-layer head
  counts as `heads`; never the specialist layer set; distinct; seeded; prefix-stable.
- `count_matched_sets(...) -> int`: how many distinct such sets exist (exact).
- `compare_to_controls(specialist, controls) -> dict`: the control distribution and the
  empirical p of the specialist value within it.
- `empirical_p(observed, null) = (1 + #{null >= observed}) / (1 + n)`.

Intervals and tests
- `auc(pos, neg)`: Mann-Whitney AUC, ties count half.
- `auc_ci(pos, neg, n_boot=2000, seed=0, min_group=10) -> dict`; `mean_diff_ci(a, b, ...)`.
- `paired_accuracy(base_correct, treat_correct, *, tasks=None, method="newcombe", ...) -> dict`:
  treat - base with a 95% paired CI, discordant counts, McNemar exact p, per-task rows with
  Holm-adjusted p.
- `paired_mean_diff(base, treat, level=0.95, min_group=10) -> dict`: mean paired difference
  (e.g. the option log-prob margin, steered minus unsteered) with its t interval.
- `wilson(correct, n)`: the Wilson interval every accuracy in every report carries.
- `mcnemar_exact(b, c)`, `newcombe_paired_ci(n11, n12, n21, n22)`, `holm(pvals)`.
- `stratified_folds(ids, tasks, n_folds=2, seed=0) -> list[list[id]]`: disjoint folds covering
  every id once, balanced per task; independent of the input order.

Design choices
- Partial correlation by projection: residualise mass and correctness on the span of
  [task dummies, standardised covariates] (an SVD basis, so collinear covariates are harmless),
  then Pearson on the residuals. With center="none" the span is the intercept alone, which is
  plain Pearson. This is the Frisch-Waugh form of "within-task correlation, partialling out
  length"; it is one matrix product for all heads.
- The permutation null shuffles correctness within task (globally when `tasks` is None), so it
  is the null "mass carries no information about correctness beyond task composition" for either
  centering. A head that only tracks task therefore gets no credit even in pooled mode. Each
  permutation scores every head with one matrix product against the fixed mass residuals.
- Group-too-small convention (`auc_ci`, `mean_diff_ci`, `paired_accuracy`): when a group has
  fewer than `min_group` items the point estimate is still reported (it is descriptive; None
  only when a group is empty) but `ci95` is None and `too_small` is True, so a report prints
  "too small" rather than an interval.
- AUC and mean-difference CIs: percentile bootstrap, resampling the two groups separately
  (stratified), vectorised.
- Paired accuracy CI: Newcombe's square-and-add (MOVER) interval for paired proportions (Newcombe
  1998, Stat Med 17:2635, method 10: Wilson score limits for each accuracy, combined with the
  estimated correlation phi), with phi shrunk toward 0 by n/2 when positive, as in Newcombe's
  chapter in Altman et al. "Statistics with Confidence" and Fagerland, Lydersen & Laake (2014),
  who recommend it. Closed form and deterministic; good coverage for small discordant counts,
  where a paired bootstrap degenerates (0 discordant pairs gives the bootstrap interval [0, 0]).
  `method="bootstrap"` gives the paired percentile bootstrap (items resampled as pairs) instead.
- McNemar: exact two-sided binomial test on the discordant pairs, in exact integer arithmetic;
  p = 1 when there are none. Per-task p-values are Holm-adjusted (step-down, monotone).
- Matched controls: steering reads only the layers of the heads, so a control must match the
  layer profile (number of layers and heads per layer), not just the head count. Layers are
  drawn uniformly without replacement and the profile's counts are assigned to them in random
  order; heads are then drawn uniformly within each layer, excluding `exclude` (default: the
  specialist heads). Draws that would read exactly the specialist layers, that do not fit
  (a layer with too few free heads), or that repeat an earlier set are redrawn. The number of
  possible sets is counted exactly first, so impossible requests fail with a clear message.
  With n sets the smallest reachable empirical p is 1/(n + 1) (0.09 for 10 sets).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from math import comb
from typing import Hashable, NamedTuple, Sequence

import numpy as np

from .errors import ListenError

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


class _SciPy:
    """scipy.stats on first use: scoring a run (`eval score`) needs Wilson and McNemar, not scipy's
    import time."""

    def __getattr__(self, name):
        from scipy import stats

        return getattr(stats, name)


_sps = _SciPy()

CENTERS = ("none", "task")
_HEAD_TOL = 1e-9  # a head whose residual norm is below this share of its raw norm is constant
_CHUNK = 256  # rows per block in the batched computations (bounds memory)
_TIE = 1e-12  # in empirical p-values, a null value this close below the observed one is a tie (float noise)


# -- inputs ------------------------------------------------------------------------------------

def _as_mass(mass) -> np.ndarray:
    a = np.asarray(mass, np.float64)
    if a.ndim != 3:
        raise ListenError(f"audio mass must be (items, layers, heads), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ListenError("audio mass holds NaN or infinite values")
    return a


def _as_correct(correct, n: int | None = None) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 1:
        raise ListenError(f"correctness must be one flag per item, got shape {c.shape}")
    if c.dtype != bool:
        if np.issubdtype(c.dtype, np.floating) and not np.isin(c, (0, 1)).all():  # a continuous target (margin)
            if not np.isfinite(c).all():
                raise ListenError("the calibration target holds NaN or infinite values")
            c = c.astype(np.float64)
        elif not np.isin(c, (0, 1)).all():
            raise ListenError("correctness must be 0/1 or boolean")
        else:
            c = c.astype(bool)
    if n is not None and c.size != n:
        raise ListenError(f"{c.size} correctness flags for {n} items")
    return c


def _task_codes(tasks, n: int) -> tuple[np.ndarray, list]:
    """Integer code per item (tasks sorted by name) and the task names; one task when None."""
    if tasks is None:
        return np.zeros(n, np.int64), ["all"]
    t = np.asarray(tasks)
    if t.ndim != 1 or t.size != n:
        raise ListenError(f"{t.size} task labels for {n} items")
    names, codes = np.unique(t.astype(str), return_inverse=True)
    return codes.astype(np.int64), [str(x) for x in names]


def length_covariate(audio_tokens) -> np.ndarray:
    """log(audio tokens) per item: the clip-length covariate for `center="task"`."""
    n = np.asarray(audio_tokens, np.float64)
    if n.ndim != 1 or not np.isfinite(n).all() or (n <= 0).any():
        raise ListenError("audio_tokens must be one positive count per item")
    return np.log(n)


def _design(n: int, center: str, tasks, covariates) -> np.ndarray:
    """Columns whose span is removed before correlating: intercept or task dummies, covariates."""
    if center not in CENTERS:
        raise ListenError(f"unknown centering {center!r}: use one of {', '.join(CENTERS)}")
    if center == "task":
        if tasks is None:
            raise ListenError("center='task' needs the task of every item")
        codes, names = _task_codes(tasks, n)
        cols = [(codes == j).astype(np.float64) for j in range(len(names))]
    else:
        cols = [np.ones(n)]
    if covariates is not None:
        z = np.asarray(covariates, np.float64)
        z = z[:, None] if z.ndim == 1 else z
        if z.ndim != 2 or z.shape[0] != n:
            raise ListenError(f"covariates must be (items,) or (items, k) with {n} items, got {z.shape}")
        if not np.isfinite(z).all():
            raise ListenError("covariates hold NaN or infinite values")
        z = z - z.mean(0)  # the constant is in the span already; scaling only helps conditioning
        sd = z.std(0)
        cols += [z[:, j] / sd[j] for j in range(z.shape[1]) if sd[j] > 0]
    return np.column_stack(cols)


def _basis(X: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column span of X (rank-revealing, so collinearity is harmless)."""
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    return U[:, s > s[0] * 1e-10]


class _Prepared(NamedTuple):
    shape: tuple[int, int]
    a: np.ndarray  # (N, M) raw mass
    c: np.ndarray  # (N,) float correctness
    X: np.ndarray  # (N, p) design
    Q: np.ndarray  # (N, q) orthonormal basis of the design
    a_res: np.ndarray  # (N, M) mass residuals
    c_res: np.ndarray  # (N,) correctness residuals
    a_norm: np.ndarray  # (M,) residual norms
    a_ok: np.ndarray  # (M,) heads with variation left after residualising
    codes: np.ndarray  # (N,) task codes (all 0 without tasks)


def _prepare(mass, correct, center, tasks, covariates) -> _Prepared:
    m = _as_mass(mass)
    n, L, H = m.shape
    c = _as_correct(correct, n)
    if n < 3:
        raise ListenError(f"{n} calibration items: head scores need at least 3")
    if c.min() == c.max() and c.dtype != bool:
        raise ListenError("the calibration target has one value on every item: the correlation is undefined")
    if c.min() == c.max():
        raise ListenError(f"every calibration item is {'right' if c[0] else 'wrong'}: the correlation with "
                          "correctness is undefined; use a calibration set with both outcomes")
    codes, _ = _task_codes(tasks, n)
    X = _design(n, center, tasks, covariates)
    Q = _basis(X)
    a = m.reshape(n, L * H)
    cf = c.astype(np.float64)
    if Q.shape[1] == 1 and center == "none":  # plain Pearson: centre exactly like heads.head_scores
        a_res, c_res = a - a.mean(0), cf - cf.mean()
    else:
        a_res, c_res = a - Q @ (Q.T @ a), cf - Q @ (Q.T @ cf)
    if np.linalg.norm(c_res) <= 1e-8 * np.sqrt(n):
        raise ListenError("correctness is fully explained by the task"
                          + (" and the covariates" if covariates is not None else "")
                          + " (e.g. every task all right or all wrong): the within-task correlation is undefined")
    a_norm = np.linalg.norm(a_res, axis=0)
    a_ok = (a.max(0) != a.min(0)) & (a_norm > _HEAD_TOL * np.linalg.norm(a, axis=0))
    return _Prepared((L, H), a, cf, X, Q, a_res, c_res, a_norm, a_ok, codes)


def _unit_mass(p: _Prepared) -> np.ndarray:
    """Mass residuals scaled to unit norm; degenerate heads are zero columns (so they score 0)."""
    return np.where(p.a_ok, p.a_res / np.where(p.a_ok, p.a_norm, 1.0), 0.0)


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


def _stratified_labels(codes: np.ndarray, n_folds: int, rng) -> np.ndarray:
    """Fold label per item: within each task a random order dealt round-robin, the deal carried
    on across tasks, so every task and every fold differ in size by at most one."""
    lab = np.empty(codes.size, np.int64)
    offset = 0
    for t in np.unique(codes):
        idx = rng.permutation(np.flatnonzero(codes == t))
        lab[idx] = (offset + np.arange(idx.size)) % n_folds
        offset += idx.size
    return lab


def _bootstrap_weights(codes: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """(n_boot, N) counts of a task-stratified bootstrap: each task resampled to its own size."""
    n = codes.size
    flat = []
    for t in np.unique(codes):
        idx = np.flatnonzero(codes == t)
        draw = idx[rng.integers(0, idx.size, (n_boot, idx.size))]
        flat.append((np.arange(n_boot)[:, None] * n + draw).ravel())
    return np.bincount(np.concatenate(flat), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


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


# -- matched random-head controls ---------------------------------------------------------------

def check_heads(heads, n_layers: int, n_heads: int, what: str = "heads", allow_empty: bool = False) -> list:
    """`heads` as (layer, head) int pairs; refuses a malformed, empty (unless `allow_empty`) or
    repeated list and heads a model of `n_layers` x `n_heads` does not have. The one head check."""
    try:
        hs = [(int(l), int(h)) for l, h in heads]
    except (TypeError, ValueError):
        raise ListenError(f"{what} must be (layer, head) pairs") from None
    if not hs and not allow_empty:
        raise ListenError(f"{what}: no heads")
    if len(set(hs)) != len(hs):
        dup = sorted({h for h in hs if hs.count(h) > 1})
        raise ListenError(f"{what} list {dup} more than once")
    bad = [x for x in hs if not (0 <= x[0] < n_layers and 0 <= x[1] < n_heads)]
    if bad:
        raise ListenError(f"{what} {bad} do not exist in this model ({n_layers} layers x {n_heads} heads)")
    return hs


def _count_fills(layers, cap, counts, every_layer: bool) -> int:
    """Head sets that give each of `counts` to a distinct layer of `layers` (capacity cap[l]),
    leaving the other layers empty (every_layer: none may stay empty). Exact DP over layers."""
    values = sorted(set(counts))
    dp = {tuple(counts.count(v) for v in values): 1}
    for l in layers:
        nxt: dict = defaultdict(int)
        for state, ways in dp.items():
            if not every_layer:
                nxt[state] += ways
            for i, v in enumerate(values):
                if state[i] and cap[l] >= v:
                    s = list(state)
                    s[i] -= 1
                    nxt[tuple(s)] += ways * comb(cap[l], v)
        dp = nxt
    return dp.get((0,) * len(values), 0)


def _profile(heads, n_layers, n_heads, exclude):
    hs = check_heads(heads, n_layers, n_heads, "specialist heads")
    ex = set(hs) if exclude is None else set(check_heads(exclude, n_layers, n_heads, "excluded heads", True))
    per_layer = Counter(l for l, _ in hs)
    cap = [n_heads - sum(1 for l, _ in ex if l == layer) for layer in range(n_layers)]
    return hs, ex, per_layer, cap


def count_matched_sets(heads, n_layers: int, n_heads: int, exclude=None) -> int:
    """Number of distinct head sets matching `heads`' layer profile, avoiding `exclude` (default:
    `heads`) and not reading exactly the same layers."""
    _, _, per_layer, cap = _profile(heads, n_layers, n_heads, exclude)
    counts = sorted(per_layer.values())
    return (_count_fills(range(n_layers), cap, counts, False)
            - _count_fills(sorted(per_layer), cap, counts, True))


def matched_random_sets(heads, n_layers: int, n_heads: int, n_sets: int = 10, seed: int = 0,
                        exclude=None) -> list[list[tuple[int, int]]]:
    """Random-head controls matched to `heads`: same head count, same number of distinct layers,
    same per-layer head counts (the counts go to uniformly drawn layers in random order; heads
    uniform within a layer), never a head of `exclude` (default: `heads`) and never exactly the
    specialist layer set (steering reads layers only, so that set would be no control).

    Seeded; distinct sets; prefix-stable (the first j sets do not depend on n_sets). Each set is
    sorted by (layer, head). Raises ListenError when fewer than n_sets such sets exist (e.g. the
    specialist heads span every layer)."""
    hs, ex, per_layer, cap = _profile(heads, n_layers, n_heads, exclude)
    if isinstance(n_sets, bool) or int(n_sets) < 1:
        raise ListenError(f"n_sets must be a positive integer, got {n_sets!r}")
    n_sets = int(n_sets)
    m = len(per_layer)
    if m == n_layers:
        raise ListenError(f"the specialist heads span all {n_layers} layers: a layer-matched random set would "
                          "steer with the same layers, so no matched control exists")
    total = count_matched_sets(hs, n_layers, n_heads, list(ex))
    if total < n_sets:
        raise ListenError(f"only {total} distinct random head sets match the specialist layer profile "
                          f"{dict(sorted(per_layer.items()))} (excluding {len(ex)} heads); {n_sets} were asked for")
    spec_layers = frozenset(per_layer)
    counts = np.array(sorted(per_layer.values()))
    free = {l: [h for h in range(n_heads) if (l, h) not in ex] for l in range(n_layers)}
    rng = np.random.default_rng(seed)
    out, seen, tries = [], set(), 0
    max_tries = 10_000 + 1_000 * n_sets
    while len(out) < n_sets:
        tries += 1
        if tries > max_tries:
            raise ListenError(f"could not draw {n_sets} distinct matched random head sets in {max_tries} tries "
                              f"({total} exist); ask for fewer")
        layers = rng.choice(n_layers, m, replace=False)
        cs = rng.permutation(counts)
        if frozenset(layers.tolist()) == spec_layers or any(cap[l] < c for l, c in zip(layers, cs)):
            continue
        chosen = sorted((int(l), free[l][j]) for l, c in zip(layers, cs)
                        for j in rng.choice(len(free[l]), int(c), replace=False))
        key = tuple(chosen)
        if key in seen:
            continue
        seen.add(key)
        out.append(chosen)
    return out


def empirical_p(observed: float, null_values) -> float:
    """(1 + #{null >= observed}) / (1 + n): the p of `observed` within a null / control sample
    (NaNs dropped; values within 1e-12 relative of `observed` count as ties, so two gains that
    differ only by float rounding are not ranked). Never 0; its floor is 1 / (n + 1)."""
    x = np.asarray(null_values, np.float64).ravel()
    x = x[~np.isnan(x)]
    if not x.size:
        raise ListenError("empirical p-value: no null values")
    if observed is None or np.isnan(observed):
        raise ListenError("empirical p-value: the observed value is undefined")
    return float((1 + (x >= observed - _TIE * max(1.0, abs(observed))).sum()) / (1 + x.size))


def compare_to_controls(specialist: float, controls) -> dict:
    """The control distribution (e.g. test gains of matched random sets) and the empirical p of
    the specialist value in it (one-sided: are the specialist heads better than the controls?)."""
    x = np.asarray(controls, np.float64).ravel()
    x = x[~np.isnan(x)]
    if not x.size:
        raise ListenError("no control values")
    return {"specialist": float(specialist), "n": int(x.size), "values": x.tolist(), "mean": float(x.mean()),
            "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0, "min": float(x.min()),
            "median": float(np.median(x)), "max": float(x.max()),
            "empirical_p": empirical_p(specialist, x), "min_possible_p": 1.0 / (1 + x.size)}


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


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p: the binomial(b + c, 1/2) tail of the discordant pairs, doubled, in
    exact integer arithmetic; 1 when b + c = 0."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(int(b), int(c)) + 1))
    return min(1.0, 2 * tail / 2**n)


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); (0, 1) when there is no data, and
    exactly 0 / 1 at 0/n and n/n."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


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


# -- folds -------------------------------------------------------------------------------------

def stratified_folds(ids: Sequence[Hashable], tasks, n_folds: int = 2, seed: int = 0) -> list[list]:
    """Split item ids into n_folds disjoint folds that cover every id once, stratified by task:
    within each task the fold sizes differ by at most one, and so do the fold totals. The result
    depends on the set of (id, task) pairs and the seed only, not on the input order; each fold
    keeps the input order."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
        dup = sorted({str(i) for i, n in Counter(ids).items() if n > 1})[:5]
        raise ListenError(f"duplicate item ids {dup}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ListenError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if n_folds > len(ids):
        raise ListenError(f"{n_folds} folds for {len(ids)} items")
    codes, _ = _task_codes(tasks, len(ids))
    order = sorted(range(len(ids)), key=lambda i: (int(codes[i]), str(ids[i])))  # canonical order
    lab_sorted = _stratified_labels(codes[order], n_folds, np.random.default_rng(seed))
    lab = np.empty(len(ids), np.int64)
    lab[order] = lab_sorted
    return [[ids[i] for i in range(len(ids)) if lab[i] == f] for f in range(n_folds)]
