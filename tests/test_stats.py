"""`mlx_listen.stats` against a known truth: simulations whose answer follows from how they were
built, and independent computations (scipy.stats.pearsonr / mannwhitneyu / binomial sums by hand,
least squares with numpy, brute-force enumeration, a published worked example).

No expected number here is copied from the code under test. Every simulation has a fixed seed,
and where a property only holds with high probability the test checks it across many draws with
a wide margin, so it is not flaky.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter

import numpy as np
import pytest
from scipy import stats as sps

from mlx_listen import stats as S
from mlx_listen.errors import ListenError

TASKS = np.array(["music", "sound", "speech"])


def null_data(seed: int, n: int = 300, layers: int = 8, heads: int = 16, p_right: float = 0.5, tasks: bool = True):
    """Mass independent of correctness: no head carries a signal."""
    rng = np.random.default_rng(seed)
    mass = 0.1 + 0.02 * rng.standard_normal((n, layers, heads))
    correct = rng.random(n) < p_right
    t = rng.choice(TASKS, n) if tasks else None
    return mass, correct, t


def planted_data(seed: int, n: int = 400, layers: int = 16, heads: int = 16):
    """Four heads whose mass rises with correctness (population r about 0.35-0.55); the rest noise."""
    rng = np.random.default_rng(seed)
    mass = 0.1 + 0.02 * rng.standard_normal((n, layers, heads))
    correct = rng.random(n) < 0.5
    tasks = rng.choice(TASKS, n)
    planted = [(2, 5), (7, 1), (7, 9), (13, 14)]
    for (l, h), d in zip(planted, (0.015, 0.018, 0.022, 0.026)):
        mass[:, l, h] += d * correct
    return mass, correct, tasks, planted


def confounded_data(seed: int, n: int = 900, layers: int = 16, heads: int = 16):
    """Accuracy depends on task and (within task) on clip length; 10 heads only track clip length,
    3 heads carry a real correctness signal within task."""
    rng = np.random.default_rng(seed)
    code = np.repeat(np.arange(3), n // 3)
    tasks = TASKS[code]
    mu = np.array([5.0, 5.6, 6.2])[code]  # tasks differ in typical length
    audio_tokens = np.round(np.exp(mu + 0.35 * rng.standard_normal(n))).astype(int)
    loglen = np.log(audio_tokens)
    logit = np.array([1.2, 0.0, -1.0])[code] - 1.5 * (loglen - mu)  # longer clip: harder, in every task
    correct = rng.random(n) < 1 / (1 + np.exp(-logit))
    mass = 0.1 + 0.02 * rng.standard_normal((n, layers, heads))
    fits = lambda hs: [(l, h) for l, h in hs if l < layers and h < heads]  # noqa: E731 (small test shapes)
    confounded = fits([(l, h) for l in range(2, 12, 2) for h in (1, 5)])
    true = fits([(3, 3), (7, 0), (13, 9)])
    for l, h in confounded:  # linear in log length, plus a little noise: nothing about correctness
        mass[:, l, h] = 0.2 - 0.04 * (loglen - 5.6) + 0.005 * rng.standard_normal(n)
    for l, h in true:
        mass[:, l, h] += 0.012 * correct
    return mass, correct, tasks, audio_tokens, confounded, true


# -- head scores -------------------------------------------------------------------------------

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


def test_head_scores_are_vectorised():
    rng = np.random.default_rng(3)
    n = 1000
    mass = rng.random((n, 32, 32))
    correct = rng.random(n) < 0.5
    tasks = rng.choice(TASKS, n)
    cov = S.length_covariate(rng.integers(50, 750, n))
    S.head_scores(mass, correct)  # warm up BLAS
    for kw in ({}, {"center": "task", "tasks": tasks, "covariates": cov}):
        tic = time.perf_counter()
        S.head_scores(mass, correct, **kw)
        assert time.perf_counter() - tic < 0.5, kw  # tens of ms on 2 cores


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


# -- chance and stability ----------------------------------------------------------------------

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
    mass, correct, tasks = null_data(7)
    assert S.permutation_null(mass, correct, k=10, n_perm=200, seed=0, tasks=tasks)["p_set"] > 0.05


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


# -- matched random controls ----------------------------------------------------------------------

SPEC = [(1, 0), (1, 3), (1, 5), (4, 2), (9, 7)]


def profile(heads):
    return sorted(Counter(l for l, _ in heads).values())


def test_matched_sets_match_the_layer_profile():
    sets = S.matched_random_sets(SPEC, 12, 8, n_sets=25, seed=0)
    assert len(sets) == 25 and len({tuple(s) for s in sets}) == 25
    for s in sets:
        assert len(s) == 5 and len(set(s)) == 5
        assert profile(s) == profile(SPEC) == [1, 1, 3]
        assert {l for l, _ in s} != {1, 4, 9}
        assert not set(s) & set(SPEC)
        assert all(0 <= l < 12 and 0 <= h < 8 for l, h in s)
        assert s == sorted(s)
    assert S.matched_random_sets(SPEC, 12, 8, n_sets=25, seed=0) == sets
    assert S.matched_random_sets(SPEC, 12, 8, n_sets=5, seed=0) == sets[:5]  # prefix-stable
    assert S.matched_random_sets(SPEC, 12, 8, n_sets=25, seed=1) != sets
    # exclude=[] allows the specialist heads themselves (still never the same layer set)
    assert all({l for l, _ in s} != {1, 4, 9} for s in S.matched_random_sets(SPEC, 12, 8, 50, seed=2, exclude=[]))


def test_matched_sets_layers_are_uniform():
    spec = [(0, 0), (1, 0), (2, 0)]
    sets = S.matched_random_sets(spec, 16, 8, n_sets=320, seed=3)
    freq = np.bincount([l for s in sets for l in {l for l, _ in s}], minlength=16)
    assert freq.sum() == 960
    assert sps.chisquare(freq).pvalue > 0.001


def brute_force_matches(spec, n_layers, n_heads, exclude):
    """Every head set with spec's per-layer profile, none excluded, not on exactly spec's layers."""
    spec_layers = {l for l, _ in spec}
    allowed = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in set(exclude)]
    return {s for s in itertools.combinations(allowed, len(spec))
            if profile(s) == profile(spec) and {l for l, _ in s} != spec_layers}


@pytest.mark.parametrize("spec, n_layers, n_heads", [
    ([(0, 0), (0, 1), (2, 2)], 4, 3),
    ([(1, 1)], 3, 3),
    ([(0, 0), (1, 1), (1, 2), (3, 0)], 5, 3),
])
def test_matched_set_count_and_support_by_enumeration(spec, n_layers, n_heads):
    every = brute_force_matches(spec, n_layers, n_heads, spec)
    assert S.count_matched_sets(spec, n_layers, n_heads) == len(every)
    if len(every) <= 60:
        drawn = S.matched_random_sets(spec, n_layers, n_heads, n_sets=len(every), seed=0)
        assert {tuple(s) for s in drawn} == every
        with pytest.raises(ListenError, match=f"only {len(every)} distinct"):
            S.matched_random_sets(spec, n_layers, n_heads, n_sets=len(every) + 1)


def test_matched_sets_impossible_cases():
    with pytest.raises(ListenError, match="span all 3 layers"):
        S.matched_random_sets([(0, 0), (1, 2), (2, 1)], 3, 4)
    # 2 layers x 2 heads, one specialist head in layer 0: only layer 1 is left, with 2 heads
    assert S.matched_random_sets([(0, 0)], 2, 2, n_sets=2, seed=0) in ([[(1, 0)], [(1, 1)]], [[(1, 1)], [(1, 0)]])
    with pytest.raises(ListenError, match="only 2 distinct"):
        S.matched_random_sets([(0, 0)], 2, 2, n_sets=3)
    # 3 layers x 2 heads, profile {2, 1} on layers {0, 1}: the 2 must go to layer 2 and the 1 to
    # layer 1 (layer 0 has no free head left): exactly one set
    spec = [(0, 0), (0, 1), (1, 0)]
    assert S.matched_random_sets(spec, 3, 2, n_sets=1) == [[(1, 1), (2, 0), (2, 1)]]
    with pytest.raises(ListenError, match="only 1 distinct"):
        S.matched_random_sets(spec, 3, 2, n_sets=2)
    for bad in ([], [(0, 0), (0, 0)], [(5, 0)]):
        with pytest.raises(ListenError):
            S.matched_random_sets(bad, 3, 2)
    with pytest.raises(ListenError, match="positive integer"):
        S.matched_random_sets([(0, 0)], 3, 2, n_sets=0)


def test_empirical_p_and_control_summary():
    null = [0.1, 0.2, 0.3, 0.3, 0.5]
    assert S.empirical_p(0.6, null) == pytest.approx(1 / 6)
    assert S.empirical_p(0.3, null) == pytest.approx(4 / 6)  # ties count as at least as extreme
    assert S.empirical_p(0.0, null) == pytest.approx(1.0)
    assert S.empirical_p(0.6, null + [float("nan")]) == pytest.approx(1 / 6)
    with pytest.raises(ListenError):
        S.empirical_p(0.5, [])
    summ = S.compare_to_controls(0.04, [0.01, -0.02, 0.05, 0.0])
    assert summ["n"] == 4 and summ["empirical_p"] == pytest.approx(2 / 5) and summ["min_possible_p"] == 0.2
    assert summ["mean"] == pytest.approx(0.01) and summ["sd"] == pytest.approx(np.std([0.01, -0.02, 0.05, 0.0], ddof=1))
    assert summ["min"] == -0.02 and summ["max"] == 0.05


# -- AUC and mean difference -----------------------------------------------------------------------

def test_auc_is_mann_whitney_with_ties():
    rng = np.random.default_rng(10)
    pos, neg = rng.integers(0, 6, 37).astype(float), rng.integers(0, 5, 23).astype(float)  # many ties
    u = sps.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert S.auc(pos, neg) == pytest.approx(u / (37 * 23), abs=1e-12)
    assert S.auc([1, 2], [1, 2]) == pytest.approx(0.5)
    assert S.auc([3], [1, 2]) == 1.0
    assert math.isnan(S.auc([], [1.0]))


def test_auc_and_mean_diff_ci_cover_the_truth():
    """Positives N(mu, 1), negatives N(0, 1): AUC = Phi(mu / sqrt 2), mean difference = mu."""
    rng = np.random.default_rng(11)
    mu = 0.8
    truth = sps.norm.cdf(mu / math.sqrt(2))
    n_sim, hit_auc, hit_diff = 150, 0, 0
    for i in range(n_sim):
        pos, neg = rng.standard_normal(40) + mu, rng.standard_normal(40)
        a = S.auc_ci(pos, neg, n_boot=400, seed=i)
        d = S.mean_diff_ci(pos, neg, n_boot=400, seed=i)
        assert a["ci95"][0] <= a["auc"] <= a["ci95"][1] and not a["too_small"]
        hit_auc += a["ci95"][0] <= truth <= a["ci95"][1]
        hit_diff += d["ci95"][0] <= mu <= d["ci95"][1]
    assert 0.88 <= hit_auc / n_sim <= 0.99  # Binomial(150, 0.95): sd 0.018
    assert 0.88 <= hit_diff / n_sim <= 0.99
    big = S.auc_ci(rng.standard_normal(400) + mu, rng.standard_normal(400), seed=0)
    assert big["ci95"][0] <= truth <= big["ci95"][1] and big["ci95"][1] - big["ci95"][0] < 0.1
    assert S.auc_ci([1.0] * 20, [0.0] * 20, n_boot=50)["ci95"] == [1.0, 1.0]


def test_small_groups_get_no_interval():
    rng = np.random.default_rng(12)
    pos, neg = rng.standard_normal(9), rng.standard_normal(30)
    a = S.auc_ci(pos, neg)
    assert a["too_small"] and a["ci95"] is None and a["n_pos"] == 9 and a["n_neg"] == 30
    assert a["auc"] == pytest.approx(S.auc(pos, neg))
    assert S.auc_ci(rng.standard_normal(10), neg, n_boot=100)["ci95"] is not None  # 10 is enough
    one = S.mean_diff_ci([5.0], neg)  # the case: a group of one item
    assert one["too_small"] and one["ci95"] is None and one["difference"] == pytest.approx(5.0 - neg.mean())
    empty = S.auc_ci([], neg)
    assert empty["auc"] is None and empty["too_small"]
    assert S.mean_diff_ci([], neg)["difference"] is None
    assert S.auc_ci(pos, neg, min_group=5, n_boot=100)["ci95"] is not None


# -- paired accuracy -------------------------------------------------------------------------------

def pairs(n11, n12, n21, n22):
    """base / treat flags for a paired table: n11 both right, n12 treat right & base wrong,
    n21 treat wrong & base right, n22 both wrong."""
    treat = np.array([1] * n11 + [1] * n12 + [0] * n21 + [0] * n22, bool)
    base = np.array([1] * n11 + [0] * n12 + [1] * n21 + [0] * n22, bool)
    return base, treat


def test_mcnemar_exact_by_hand():
    # 1 vs 7 discordant: P(X <= 1) for X ~ Bin(8, 1/2), doubled
    assert S.mcnemar_exact(1, 7) == pytest.approx(2 * (math.comb(8, 0) + math.comb(8, 1)) / 2**8)
    assert S.mcnemar_exact(7, 1) == pytest.approx(18 / 256)
    assert S.mcnemar_exact(0, 0) == 1.0 and S.mcnemar_exact(4, 4) == 1.0
    assert S.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)
    res = S.paired_accuracy(*pairs(50, 7, 1, 42))
    assert res["wrong_to_right"] == 7 and res["right_to_wrong"] == 1
    assert res["mcnemar_p"] == pytest.approx(18 / 256)
    assert res["difference"] == pytest.approx(6 / 100)
    assert res["base_accuracy"] == pytest.approx(0.51) and res["treat_accuracy"] == pytest.approx(0.57)


def test_newcombe_interval_matches_published_example():
    """Cavo et al. (2012) paired table [[59, 6], [16, 80]]: Newcombe square-and-add 95% CI for the
    difference -0.0621 is (-0.1186, -0.0046) (Fagerland, Lydersen & Laake, Statistical Analysis of
    Contingency Tables, ch. 8)."""
    lo, hi = S.newcombe_paired_ci(59, 6, 16, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)
    res = S.paired_accuracy(*pairs(59, 6, 16, 80))
    assert res["difference"] == pytest.approx(-10 / 161)
    assert res["ci95"] == pytest.approx([lo, hi])


def test_paired_interval_coverage():
    """Cells (both right, wrong->right, right->wrong, both wrong) = (.45, .15, .10, .30): true gain 0.05."""
    rng = np.random.default_rng(13)
    probs = [0.45, 0.15, 0.10, 0.30]
    n_sim, hit_nc, hit_bs = 300, 0, 0
    for i in range(n_sim):
        base, treat = pairs(*rng.multinomial(150, probs))
        nc = S.paired_accuracy(base, treat)
        bs = S.paired_accuracy(base, treat, method="bootstrap", n_boot=2000, seed=i)
        hit_nc += nc["ci95"][0] <= 0.05 <= nc["ci95"][1]
        hit_bs += bs["ci95"][0] <= 0.05 <= bs["ci95"][1]
    assert 0.91 <= hit_nc / n_sim <= 0.985  # Binomial(300, 0.95): sd 0.013
    assert 0.91 <= hit_bs / n_sim <= 0.985
    # no discordant pair: Newcombe still gives an honest, non-degenerate interval around 0
    none = S.paired_accuracy(*pairs(30, 0, 0, 20))
    assert none["ci95"][0] < 0 < none["ci95"][1] and none["mcnemar_p"] == 1.0
    assert S.paired_accuracy(*pairs(30, 0, 0, 20), method="bootstrap")["ci95"] == [0.0, 0.0]


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert S.holm([0.02]) == pytest.approx([0.02])
    assert S.holm([]) == []
    with pytest.raises(ListenError):
        S.holm([0.1, 1.5])


def test_paired_accuracy_per_task_rows():
    tables = {"music": (40, 9, 1, 30), "sound": (50, 3, 3, 24), "speech": (5, 2, 0, 1)}
    base, treat, tasks = [], [], []
    for name, cells in tables.items():
        b, t = pairs(*cells)
        base.append(b)
        treat.append(t)
        tasks += [name] * len(b)
    rng = np.random.default_rng(14)
    order = rng.permutation(len(tasks))  # rows are grouped by task name, not by position
    base, treat, tasks = np.concatenate(base)[order], np.concatenate(treat)[order], np.array(tasks)[order]
    res = S.paired_accuracy(base, treat, tasks=tasks)
    assert res["n"] == len(tasks) and res["wrong_to_right"] == 14 and res["right_to_wrong"] == 4
    rows = {r["task"]: r for r in res["per_task"]}
    assert list(rows) == ["music", "sound", "speech"]
    raw = {name: S.mcnemar_exact(c[1], c[2]) for name, c in tables.items()}
    assert raw["music"] == pytest.approx(2 * 11 / 2**10)  # P(X <= 1), X ~ Bin(10, 1/2), doubled
    adj = dict(zip(raw, S.holm(list(raw.values()))))
    for name, (n11, n12, n21, n22) in tables.items():
        r = rows[name]
        assert r["n"] == n11 + n12 + n21 + n22
        assert (r["wrong_to_right"], r["right_to_wrong"]) == (n12, n21)
        assert r["difference"] == pytest.approx((n12 - n21) / r["n"])
        assert r["mcnemar_p"] == pytest.approx(raw[name]) and r["p_holm"] == pytest.approx(adj[name])
    assert rows["speech"]["too_small"] and rows["speech"]["ci95"] is None  # 8 items
    assert not rows["music"]["too_small"] and rows["music"]["ci95"][0] > 0
    with pytest.raises(ListenError):
        S.paired_accuracy(base, treat[:-1])
    with pytest.raises(ListenError):
        S.paired_accuracy(base, treat, method="wald")


# -- folds -----------------------------------------------------------------------------------------

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


def test_reports_are_strict_json():
    """Every dict result goes into a results file as it stands: no numpy types, no NaN."""
    import json

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


def test_paired_mean_diff_matches_scipy_and_covers_a_planted_shift():
    from scipy import stats as sps

    from mlx_listen.stats import paired_mean_diff

    rng = np.random.default_rng(5)
    base = rng.normal(0, 3, 200)  # the items' own spread is large; the pairing removes it
    treat = base + 0.4 + rng.normal(0, 0.5, 200)
    r = paired_mean_diff(base, treat)
    lo, hi = sps.ttest_rel(treat, base).confidence_interval(0.95)
    assert r["ci95"] == pytest.approx([lo, hi]) and r["ci95"][0] > 0
    covered = 0
    for s in range(400):  # the null: a 95% interval covers 0 about 95% of the time
        g = np.random.default_rng(100 + s)
        b = g.normal(0, 1, 30)
        lo, hi = paired_mean_diff(b, b + g.normal(0, 1, 30))["ci95"]
        covered += lo <= 0 <= hi
    assert 0.92 <= covered / 400 <= 0.98
    nan = paired_mean_diff([1.0, np.nan, 2.0], [1.5, 3.0, np.inf])
    assert nan["n"] == 1 and nan["dropped"] == 2 and nan["ci95"] is None and nan["too_small"]
    with pytest.raises(ListenError):
        paired_mean_diff([1.0, 2.0], [1.0])
