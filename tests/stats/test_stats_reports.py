"""`mlx_listen.stats`: every dict result goes into a results file as it stands (strict JSON)."""

from __future__ import annotations

import json

import numpy as np
from support.stats_data import pairs, planted_data

from mlx_listen import stats as S


def test_reports_are_strict_json():
    """Every dict result goes into a results file as it stands: no numpy types, no NaN."""

    mass, correct, tasks, _ = planted_data(16, n=120)
    base, treat = pairs(30, 5, 2, 3)
    reports = [
        S.permutation_null(mass, correct, k=3, n_perm=20, tasks=tasks),
        S.split_half_jaccard(mass, correct, k=3, n_repeats=3, tasks=tasks),
        S.set_overlap([(0, 1)], [(0, 1), (2, 2)]),
        S.compare_to_controls(0.1, [0.0, 0.05]),
        S.auc_ci([1.0, 2.0], [0.5] * 12), S.auc_ci(np.arange(12.0), np.arange(12.0) - 3, n_boot=50),
        S.mean_diff_ci([], [1.0]), S.mean_diff_ci(np.arange(12.0), np.arange(12.0), n_boot=50),
        S.paired_accuracy(base, treat, tasks=["a"] * 20 + ["b"] * 20),
        S.paired_accuracy(base, treat, method="bootstrap", n_boot=100),
    ]
    for rep in reports:
        assert json.loads(json.dumps(rep, allow_nan=False)) == rep
    assert isinstance(S.matched_random_sets([(0, 0)], 3, 2, n_sets=2)[0][0][0], int)
