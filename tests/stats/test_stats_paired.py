"""`mlx_listen.stats` paired tests that agree with their intervals (Tango's score interval and the
McNemar score test), the minimum detectable effect, the within-strata AUC, combined fold p-values
and the null reference of bootstrap stability.

No expected number here is copied from the code under test: the constrained MLE behind Tango's
statistic is checked against a numerical maximiser of the multinomial likelihood, the interval
against a grid inversion of that statistic, the minimum detectable effect against simulated
power, the stratified AUC against counting pairs by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps
from support.stats_data import pairs, planted_data

from mlx_listen import stats as S


def constrained_score(b, c, n, delta):
    """Tango's statistic from first principles: maximise the multinomial likelihood of the
    discordant cells (p12 = p21 + delta) numerically, then (b - c - n delta) / sqrt(n Var)."""
    rest = n - b - c

    def nll(p21):
        p12 = p21 + delta
        q = 1 - p12 - p21
        if p21 <= 0 or p12 <= 0 or q <= 0:
            return 1e300
        return -(b * math.log(p12) + c * math.log(p21) + rest * math.log(q))

    lo, hi = max(1e-12, -delta + 1e-12), (1 - delta) / 2 - 1e-12
    p21 = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).x
    return (b - c - n * delta) / math.sqrt(n * (2 * p21 + delta - delta**2))


@pytest.mark.parametrize("b, c, n", [(7, 1, 100), (6, 16, 161), (30, 12, 200), (3, 0, 40)])
def test_tango_statistic_is_the_score_statistic(b, c, n):
    for delta in (-0.05, 0.0, 0.02, 0.1):
        if (b - c) / n - delta == 0:
            continue
        assert S.tango_statistic(b, c, n, delta) == pytest.approx(constrained_score(b, c, n, delta), rel=1e-5)
    assert S.tango_statistic(b, c, n, 0.0) == pytest.approx((b - c) / math.sqrt(b + c))  # McNemar's z


@pytest.mark.parametrize("b, c, n", [(7, 1, 100), (6, 16, 161), (0, 0, 50), (12, 0, 12)])
def test_tango_interval_is_the_inverted_test(b, c, n):
    """Every delta on a fine grid inside the interval is accepted by the score test, every one
    outside rejected."""
    lo, hi = S.tango_ci(b, c, n)
    z = sps.norm.ppf(0.975)
    grid = np.linspace(-1 + 1e-6, 1 - 1e-6, 4001)
    accepted = np.array([abs(S.tango_statistic(b, c, n, d)) <= z for d in grid])
    assert grid[accepted].min() == pytest.approx(lo, abs=1e-3) and grid[accepted].max() == pytest.approx(hi, abs=1e-3)
    assert lo <= (b - c) / n <= hi


def test_interval_and_p_agree_on_every_table():
    """The bug: a Newcombe interval excluding 0 beside an exact McNemar p = 0.065. With one method
    the interval excludes 0 exactly when p < 0.05, over every table of these sizes."""
    disagree_old = 0
    for n in (40, 200):
        for b in range(0, 25):
            for c in range(0, 25):
                base, treat = pairs(n - b - c - (n - b - c) // 2, b, c, (n - b - c) // 2)
                r = S.paired_accuracy(base, treat)
                excludes = r["ci95"][0] > 0 or r["ci95"][1] < 0
                assert excludes == (r["p"] < 0.05), (n, b, c, r["ci95"], r["p"])
                old = S.paired_accuracy(base, treat, method="newcombe")
                disagree_old += (old["ci95"][0] > 0 or old["ci95"][1] < 0) != (old["p"] < 0.05)
    assert disagree_old > 0  # the old pairing did disagree somewhere: the check above can fail


def test_score_test_size_under_the_null():
    """No effect, 200 items, 15% discordant: the score test rejects about 5% of the time."""
    rng = np.random.default_rng(3)
    rejections = sum(S.paired_accuracy(*pairs(*rng.multinomial(200, [0.5, 0.075, 0.075, 0.35])))["p"] < 0.05
                     for _ in range(600))
    assert 0.025 <= rejections / 600 <= 0.075  # Binomial(600, 0.05): sd 0.009


def test_mde_has_the_stated_power():
    """Simulated at the minimum detectable effect, the test rejects about 80% of the time."""
    rng = np.random.default_rng(4)
    n, disc = 400, 0.2
    d = S.accuracy_mde(n, int(disc * n))
    assert d == pytest.approx((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * math.sqrt(disc / n))
    probs = [0.45, disc / 2 + d / 2, disc / 2 - d / 2, 0.35]
    power = np.mean([S.paired_accuracy(*pairs(*rng.multinomial(n, probs)))["p"] < 0.05 for _ in range(500)])
    assert 0.72 <= power <= 0.88
    assert S.paired_accuracy(*pairs(50, 7, 1, 42))["mde80"] == pytest.approx(S.accuracy_mde(100, 8))
    assert S.mde(1, 1.0) is None and S.mde(100, 2.0) == pytest.approx(2 * S.mde(100, 1.0))


def test_stratified_auc_counts_pairs_within_strata():
    rng = np.random.default_rng(5)
    x = rng.normal(size=60)
    y = rng.random(60) < 0.5
    st = np.array(["a", "b", "c"])[rng.integers(0, 3, 60)]
    num = den = 0.0
    for s in "abc":
        P, N = x[(st == s) & y], x[(st == s) & ~y]
        num += sum((p > q) + 0.5 * (p == q) for p in P for q in N)
        den += P.size * N.size
    r = S.stratified_auc_ci(x, y, st, n_boot=200)
    assert r["auc"] == pytest.approx(num / den)
    one = S.stratified_auc_ci(x, y, ["all"] * 60, n_boot=200)
    assert one["auc"] == pytest.approx(S.auc(x[y], x[~y]))
    assert r["ci95"][0] <= r["auc"] <= r["ci95"][1]


def test_stratified_auc_ignores_a_score_that_only_tracks_the_strata():
    """The circular case: the score tracks correctness, and correctness predicts the label. Pooled,
    the AUC is far above 0.5; within right and within wrong answers it is 0.5 (its CI covers it)."""
    rng = np.random.default_rng(6)
    n = 600
    correct = rng.random(n) < 0.5
    label = rng.random(n) < np.where(correct, 0.6, 0.2)  # "audio changed the answer"
    score = 0.2 + 0.1 * correct + rng.normal(0, 0.03, n)
    pooled = S.auc_ci(score[label], score[~label], n_boot=500)
    within = S.stratified_auc_ci(score, label, np.where(correct, "right", "wrong"), n_boot=500)
    assert pooled["ci95"][0] > 0.6
    assert within["ci95"][0] < 0.5 < within["ci95"][1]
    small = S.stratified_auc_ci(score[:15], label[:15], np.where(correct[:15], "r", "w"))
    assert small["too_small"] and small["ci95"] is None


def test_combined_fold_p():
    r = S.combine_fold_p([0.01, 0.3, None])
    assert r == {"m": 2, "some": 0.02, "every": 0.3, "values": [0.01, 0.3]}
    assert S.combine_fold_p([0.4, 0.9])["some"] == 0.8 and S.combine_fold_p([0.6, 0.9])["some"] == 1.0
    assert S.combine_fold_p([])["some"] is None


def test_null_stability_is_below_a_real_signal():
    mass, correct, tasks, _ = planted_data(16, n=200)
    kw = dict(k=3, n_boot=60, tasks=tasks)
    freq = S.bootstrap_stability(mass, correct, **kw)
    top = S.top_k(S.head_scores(mass, correct), 3).heads
    real = float(np.mean([freq[l, h] for l, h in top]))
    null = S.null_stability(mass, correct, n_shuffles=3, **kw)
    assert null["n_shuffles"] == 3 and len(null["values"]) == 3
    assert null["mean"] < real - 0.2
