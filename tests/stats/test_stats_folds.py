"""`mlx_listen.stats` cross-validation folds: stratified by task, disjoint and complete, order-free."""

from __future__ import annotations

import numpy as np
import pytest
from support.stats_data import TASKS

from mlx_listen import stats as S
from mlx_listen.errors import ListenError


@pytest.mark.parametrize("n_folds", [2, 3])
def test_stratified_folds(n_folds):
    rng = np.random.default_rng(15)
    ids = [f"item{i:03d}" for i in range(101)]
    tasks = list(rng.choice(TASKS, 101, p=[0.5, 0.3, 0.2]))
    folds = S.stratified_folds(ids, tasks, n_folds=n_folds, seed=0)
    assert len(folds) == n_folds
    flat = [i for f in folds for i in f]
    assert sorted(flat) == ids  # every id exactly once: disjoint and complete
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    task_of = dict(zip(ids, tasks))
    for t in TASKS:
        per = [sum(task_of[i] == t for i in f) for f in folds]
        assert max(per) - min(per) <= 1, (t, per)
    for f in folds:
        assert f == sorted(f)  # each fold keeps the input order
    # the same (id, task) pairs in another order give the same folds
    perm = rng.permutation(101)
    again = S.stratified_folds([ids[i] for i in perm], [tasks[i] for i in perm], n_folds=n_folds, seed=0)
    assert [set(f) for f in again] == [set(f) for f in folds]
    assert S.stratified_folds(ids, tasks, n_folds=n_folds, seed=1) != folds


def test_stratified_folds_refusals():
    with pytest.raises(ListenError, match="duplicate"):
        S.stratified_folds(["a", "b", "a"], ["x", "x", "y"])
    with pytest.raises(ListenError, match=">= 2"):
        S.stratified_folds(["a", "b"], ["x", "x"], n_folds=1)
    with pytest.raises(ListenError, match="3 folds for 2 items"):
        S.stratified_folds(["a", "b"], ["x", "x"], n_folds=3)
    assert S.stratified_folds(["a", "b", "c", "d"], None, n_folds=2, seed=0) is not None
