"""Folds and resamples stratified by task."""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import numpy as np

from ..errors import ListenError
from ._common import _task_codes

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


