"""`mlx_listen.stats` head scores and their chance reference against a known truth: simulations whose
answer follows from how they were built, and independent computations (numpy's corrcoef,
scipy.stats.pearsonr, least squares with numpy, order statistics, brute-force enumeration).

No expected number here is copied from the code under test. Every simulation has a fixed seed,
and where a property only holds with high probability the test checks it across many draws with
a wide margin, so it is not flaky.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from support.stats_data import TASKS, confounded_data, null_data, planted_data

from mlx_listen import stats
from mlx_listen import stats as S
from mlx_listen.errors import ListenError


def test_pearson_r_equals_numpy_corrcoef_per_head():
    rng = np.random.default_rng(1)
    mass = rng.random((57, 3, 5))
    mass[:, 1] *= 1e-3  # small-valued heads are scored like any other
    correct = rng.random(57) < 0.4
    r = stats.head_scores(mass, correct)
    assert r.shape == (3, 5)
    for l in range(3):
        for h in range(5):
            assert r[l, h] == pytest.approx(np.corrcoef(mass[:, l, h], correct)[0, 1], abs=1e-12)
    assert np.abs(r).max() < 1 and len(np.unique(r)) == 15  # random data: no degenerate values


def test_constant_head_scores_zero():
    rng = np.random.default_rng(2)
    mass = rng.random((300, 2, 4))
    mass[:, 0, 1] = 0.1  # a mean of 300 copies of 0.1 is not exactly 0.1 in floating point
    mass[:, 1, 3] = 1 / 3
    mass[:, 1, 0] = 0.0
    correct = rng.random(300) < 0.5
    r = stats.head_scores(mass, correct)
    assert r[0, 1] == 0.0 and r[1, 3] == 0.0 and r[1, 0] == 0.0
    assert np.count_nonzero(r) == 5


def test_pooled_scores_are_pearson_r():
    mass, correct, _ = null_data(0, n=120, layers=3, heads=4)
    mass[:, 1, 2] += 0.03 * correct  # one head with a signal, so not every r is near 0
    mass[:, 2, 3] = 0.25  # constant head
    r = S.head_scores(mass, correct)
    assert r.shape == (3, 4)
    for l in range(3):
        for h in range(4):
            expect = 0.0 if (l, h) == (2, 3) else sps.pearsonr(mass[:, l, h], correct.astype(float))[0]
            assert r[l, h] == pytest.approx(expect, abs=1e-12)
    for flags in (np.ones(120, bool), np.zeros(120, bool)):
        with pytest.raises(ListenError, match="undefined"):
            S.head_scores(mass, flags)
    with pytest.raises(ListenError, match="120 items"):
        S.head_scores(mass, correct[:-1])
    with pytest.raises(ListenError, match="unknown centering"):
        S.head_scores(mass, correct, center="layer")
    with pytest.raises(ListenError, match="task of every item"):
        S.head_scores(mass, correct, center="task")


def lstsq_partial_r(x, y, tasks, cov):
    """Partial correlation by explicit regression: intercept + task dummies (first dropped) + cov."""
    names = sorted(set(tasks))
    cols = [np.ones(len(x))] + [(tasks == t).astype(float) for t in names[1:]]
    if cov is not None:
        cols.append(cov)
    X = np.column_stack(cols)
    rx = x - X @ np.linalg.lstsq(X, x, rcond=None)[0]
    ry = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    return sps.pearsonr(rx, ry)[0]


def test_task_centred_scores_are_partial_correlations():
    mass, correct, tasks, audio_tokens, conf, true = confounded_data(1, n=300, layers=4, heads=4)
    assert conf == [(2, 1)] and true == [(3, 3)]  # one head of each kind in this small shape
    loglen = np.log(audio_tokens)
    r_task = S.head_scores(mass, correct, center="task", tasks=tasks)
    r_len = S.head_scores(mass, correct, center="task", tasks=tasks, covariates=S.length_covariate(audio_tokens))
    y = correct.astype(float)
    for l in range(4):
        for h in range(4):
            x = mass[:, l, h]
            # task only: the correlation of within-task-demeaned values
            xd, yd = x.copy(), y.copy()
            for t in TASKS:
                m = tasks == t
                xd[m] -= x[m].mean()
                yd[m] -= y[m].mean()
            assert r_task[l, h] == pytest.approx(sps.pearsonr(xd, yd)[0], abs=1e-10)
            assert r_len[l, h] == pytest.approx(lstsq_partial_r(x, y, tasks, loglen), abs=1e-10)
    # covariates with center="none": intercept + covariate
    r_none_len = S.head_scores(mass, correct, covariates=loglen)
    X = np.column_stack([np.ones(len(y)), loglen])
    res = lambda v: v - X @ np.linalg.lstsq(X, v, rcond=None)[0]  # noqa: E731
    assert r_none_len[1, 2] == pytest.approx(sps.pearsonr(res(mass[:, 1, 2]), res(y))[0], abs=1e-10)


def test_task_centring_degenerate_cases():
    rng = np.random.default_rng(2)
    tasks = np.repeat(TASKS, 20)
    mass = rng.random((60, 2, 3))
    mass[:, 0, 1] = np.repeat([0.1, 0.5, 0.9], 20)  # varies only between tasks
    correct = np.repeat([True, False, True], 20)  # each task all right or all wrong
    with pytest.raises(ListenError, match="within-task correlation is undefined"):
        S.head_scores(mass, correct, center="task", tasks=tasks)
    correct = rng.random(60) < 0.5
    r = S.head_scores(mass, correct, center="task", tasks=tasks)
    assert r[0, 1] == 0.0  # no within-task variation left: scored 0, not float noise
    assert S.head_scores(mass, correct)[0, 1] != 0.0  # pooled, it does vary


def test_head_scores_at_a_real_models_shape():
    """The whole (items, 32 layers, 32 heads) array at once, pooled and task-centred with a
    covariate: every head scored, each the correlation computed on its own. (How fast is a
    benchmark's question, not a test's: a wall-clock bound here failed on a busy machine.)"""
    rng = np.random.default_rng(3)
    n = 1000
    mass = rng.random((n, 32, 32))
    correct = rng.random(n) < 0.5
    tasks = rng.choice(TASKS, n)
    audio_tokens = rng.integers(50, 750, n)
    cov = S.length_covariate(audio_tokens)
    pooled = S.head_scores(mass, correct)
    centred = S.head_scores(mass, correct, center="task", tasks=tasks, covariates=cov)
    for r in (pooled, centred):
        assert r.shape == (32, 32) and np.isfinite(r).all() and len(np.unique(r)) == 32 * 32
    y = correct.astype(float)
    for l, h in [(0, 0), (5, 17), (31, 31), *map(tuple, rng.integers(0, 32, (5, 2)))]:
        assert pooled[l, h] == pytest.approx(sps.pearsonr(mass[:, l, h], y)[0], abs=1e-10)
        assert centred[l, h] == pytest.approx(lstsq_partial_r(mass[:, l, h], y, tasks, np.log(audio_tokens)),
                                              abs=1e-10)


@pytest.mark.parametrize("center", ["none", "task"])
def test_weighted_scores_equal_replicated_rows(center):
    mass, correct, tasks, audio_tokens, _, _ = confounded_data(4, n=240, layers=3, heads=5)
    cov = S.length_covariate(audio_tokens)
    rng = np.random.default_rng(5)
    idx = [rng.integers(0, 240, 240) for _ in range(3)]
    half = rng.permutation(240)[:120]
    W = np.stack([np.bincount(i, minlength=240) for i in idx] + [np.isin(np.arange(240), half)])
    got = S.weighted_head_scores(mass, correct, W, center=center, tasks=tasks, covariates=cov)
    for w, rows in zip(got, idx + [np.sort(half)]):
        expect = S.head_scores(mass[rows], correct[rows], center=center, tasks=tasks[rows], covariates=cov[rows])
        np.testing.assert_allclose(w, expect, atol=1e-10)


def test_top_k_ranking_ties_and_refusals():
    s = np.array([[0.2, 0.5, 0.5, -0.1], [0.5, 0.0, -0.3, 0.2]])
    expect = [(l, h) for _, l, h in sorted((-s[l, h], l, h) for l in range(2) for h in range(4))]
    tk = S.top_k(s, 8)  # the case: every head of a small model, including r <= 0
    assert tk.heads == expect
    assert tk.r == [s[l, h] for l, h in expect]
    assert set(tk.nonpositive) == {(1, 1), (0, 3), (1, 2)}
    assert S.top_k(s, 3).heads == [(0, 1), (0, 2), (1, 0)]  # ties at 0.5 by (layer, head)
    assert S.top_k(s, 3).nonpositive == []
    with pytest.raises(ListenError, match="more than the 8 heads"):
        S.top_k(s, 20)
    for bad in (0, -1, 2.5):
        with pytest.raises(ListenError, match="positive integer"):
            S.top_k(s, bad)


def test_permutation_null_matches_order_statistics():
    """1024 independent heads, 500 items: under a permutation each r is ~N(0, 1/(N-1)) and the j-th best
    of M iid draws has the quantiles of Beta(M - j + 1, j) on the uniform scale."""
    rng = np.random.default_rng(6)
    n, M = 500, 1024
    mass = rng.standard_normal((n, 32, 32))
    correct = rng.random(n) < 0.5
    pn = S.permutation_null(mass, correct, k=20, n_perm=200, seed=0)
    sd = 1 / math.sqrt(n - 1)
    for j in (1, 5, 20):
        median = sps.norm.ppf(sps.beta.median(M - j + 1, j)) * sd
        assert pn["rank_q50"][j - 1] == pytest.approx(median, rel=0.06)
    assert pn["rank_q50"][19] == pytest.approx(0.0927, abs=0.006)  # the "~0.09"
    max95 = sps.norm.ppf(0.95 ** (1 / M)) * sd
    assert pn["fwer_threshold"] == pytest.approx(max95, rel=0.08)
    assert len(pn["null_topk"]) == 200 and all(len(row) == 20 for row in pn["null_topk"])
    assert all(np.all(np.diff(row) <= 0) for row in pn["null_topk"])
    assert pn["rank_q50"] <= pn["rank_q95"] and pn["rank_q95"] <= pn["rank_q99"]
    assert S.top_k(S.head_scores(mass, correct), 20).heads == [tuple(h) for h in pn["observed_heads"]]


def test_null_is_calibrated():
    """No signal: across 20 datasets the family-wise threshold is beaten in ~5% of them and the set
    p-value is roughly uniform; split halves agree no more than random head sets."""
    beaten, p_set, jac = 0, [], []
    for s in range(20):
        mass, correct, tasks = null_data(100 + s, n=200, p_right=0.4)
        pn = S.permutation_null(mass, correct, k=5, n_perm=99, seed=s, tasks=tasks)
        beaten += pn["n_beating_null"] > 0
        p_set.append(pn["p_set"])
        assert min(pn["p_rank"]) >= 1 / 100 and max(pn["p_rank"]) <= 1
        if s < 5:
            sh = S.split_half_jaccard(mass, correct, k=5, n_repeats=20, seed=s, tasks=tasks)
            jac.append(sh["mean"])
            assert sh["n_repeats"] == 20 and len(sh["values"]) == 20
    assert beaten <= 4  # Binomial(20, 0.05): P(>= 5) < 0.003
    assert 0.25 <= np.mean(p_set) <= 0.75  # mean of 20 uniforms: sd 0.065
    chance = S.chance_jaccard(5, 128)
    assert abs(np.mean(jac) - chance) < 0.03
    # The same at the default n_perm and a larger k. One dataset's p_set > 0.05 holds with
    # probability 0.95 only (a harmless change of the draws could break it); what matters is that
    # a significant set is rare: at most 2 of 5 null datasets (Binomial(5, 0.05): P(>= 3) ~ 0.001).
    significant = 0
    for s in range(7, 12):
        mass, correct, tasks = null_data(s)
        significant += S.permutation_null(mass, correct, k=10, n_perm=200, seed=0, tasks=tasks)["p_set"] <= 0.05
    assert significant <= 2


def test_chance_jaccard_by_enumeration():
    for M, k in ((6, 2), (7, 3)):
        subsets = list(itertools.combinations(range(M), k))
        mean = np.mean([S.jaccard([(0, x) for x in a], [(0, x) for x in b]) for a in subsets for b in subsets])
        assert S.chance_jaccard(k, M) == pytest.approx(mean, abs=1e-12)
    assert S.jaccard([(0, 1), (2, 3)], [(2, 3), (4, 5)]) == pytest.approx(1 / 3)
    ov = S.set_overlap([(0, 1), (2, 3)], [[2, 3], [4, 5], [6, 7]])
    assert ov["n_common"] == 1 and ov["common"] == [[2, 3]] and ov["jaccard"] == pytest.approx(1 / 4)


def test_planted_signal_is_recovered():
    mass, correct, tasks, planted = planted_data(8)
    pn = S.permutation_null(mass, correct, k=4, n_perm=200, seed=0, tasks=tasks)
    assert {tuple(h) for h in pn["observed_heads"]} == set(planted)
    assert pn["n_beating_null"] == 4
    assert pn["p_set"] == pytest.approx(1 / 201)  # no shuffle comes near: the floor of (1 + 0) / (1 + n)
    assert max(pn["p_fwer"]) < 0.01
    freq = S.bootstrap_stability(mass, correct, k=4, n_boot=200, seed=0, tasks=tasks)
    assert freq.shape == (16, 16)
    assert freq.sum() == pytest.approx(4.0)  # each resample keeps exactly 4 heads
    assert min(freq[l, h] for l, h in planted) >= 0.9
    others = np.ones_like(freq, bool)
    for l, h in planted:
        others[l, h] = False
    assert freq[others].max() <= 0.2
    sh = S.split_half_jaccard(mass, correct, k=4, n_repeats=20, seed=0, tasks=tasks)
    assert sh["mean"] >= 0.7 and sh["chance"] < 0.05


def test_within_task_shuffle_gives_task_only_heads_no_credit():
    """A head that only tracks the task keeps exactly its r under a within-task shuffle, so it never
    beats its own null (p = 1); a global shuffle breaks the task link and calls it significant."""
    rng = np.random.default_rng(9)
    n = 300
    tasks = np.repeat(TASKS, n // 3)
    correct = rng.random(n) < np.repeat([0.8, 0.5, 0.2], n // 3)
    mass = 0.1 + 0.02 * rng.standard_normal((n, 4, 4))
    mass[:, 1, 1] = np.repeat([0.3, 0.2, 0.1], n // 3)  # task only; accuracy falls with it
    within = S.permutation_null(mass, correct, k=1, n_perm=100, seed=0, tasks=tasks)
    assert within["observed_heads"] == [[1, 1]]
    assert within["p_fwer"] == [1.0] and within["p_rank"] == [1.0] and within["n_beating_null"] == 0
    assert within["null_topk"][0][0] == pytest.approx(within["observed_r"][0], abs=1e-12)
    overall = S.permutation_null(mass, correct, k=1, n_perm=100, seed=0)
    assert overall["p_fwer"] == [pytest.approx(1 / 101)] and overall["n_beating_null"] == 1


def test_task_centring_removes_length_confounding():
    mass, correct, tasks, audio_tokens, confounded, true = confounded_data(0)
    cov = S.length_covariate(audio_tokens)
    k = 10
    pooled = S.top_k(S.head_scores(mass, correct), k).heads
    task_only = S.top_k(S.head_scores(mass, correct, center="task", tasks=tasks), k).heads
    centred = S.top_k(S.head_scores(mass, correct, center="task", tasks=tasks, covariates=cov), k).heads
    assert len(set(pooled) & set(confounded)) >= 9  # pooled Pearson picks clip length
    assert len(set(task_only) & set(confounded)) >= 5  # task centring alone leaves within-task length
    assert set(true) <= set(centred) and len(set(centred) & set(confounded)) <= 2
    assert S.set_overlap(pooled, centred)["n_common"] <= 3
    pn = S.permutation_null(mass, correct, k=k, n_perm=200, seed=0, tasks=tasks, center="task", covariates=cov)
    assert pn["n_beating_null"] == 3
    assert {tuple(h) for h in pn["observed_heads"][:3]} == set(true)
    r = S.head_scores(mass, correct, center="task", tasks=tasks, covariates=cov)
    assert max(r[l, h] for l, h in confounded) < pn["fwer_threshold"]
