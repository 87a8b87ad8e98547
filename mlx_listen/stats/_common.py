"""What every statistic shares: input checks, the design matrix of partial correlations, and
scipy on first use."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ListenError


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


def length_covariates(audio_tokens, text_tokens) -> np.ndarray:
    """(N, 2): log clip length (audio tokens) and log question length (text tokens of the prompt):
    what `center="task"` partials out besides the task, so heads that only track how long the clip
    or the question is (both can predict correctness) get no credit."""
    t = np.asarray(text_tokens, np.float64)
    if t.ndim != 1 or not np.isfinite(t).all() or (t <= 0).any():
        raise ListenError("text_tokens must be one positive count per item")
    a = length_covariate(audio_tokens)
    if a.size != t.size:
        raise ListenError(f"{a.size} clip lengths for {t.size} question lengths")
    return np.column_stack([a, np.log(t)])


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


