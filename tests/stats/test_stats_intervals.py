"""`mlx_listen.stats` intervals and tests: AUC (Mann-Whitney, scipy), bootstrap coverage, Wilson,
exact McNemar (binomial sums by hand), Newcombe's paired interval (a published worked example),
Holm, paired accuracy per task, the paired mean difference (scipy's paired t).

No expected number here is copied from the code under test. Every simulation has a fixed seed,
and where a property only holds with high probability the test checks it across many draws with
a wide margin, so it is not flaky.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from support.stats_data import pairs

from mlx_listen import stats as S
from mlx_listen.errors import ListenError
from mlx_listen.stats import mcnemar_exact, wilson


def test_auc_is_mann_whitney_with_ties():
    rng = np.random.default_rng(10)
    pos, neg = rng.integers(0, 6, 37).astype(float), rng.integers(0, 5, 23).astype(float)  # many ties
    u = sps.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert S.auc(pos, neg) == pytest.approx(u / (37 * 23), abs=1e-12)
    assert S.auc([1, 2], [1, 2]) == pytest.approx(0.5)
    assert S.auc([3], [1, 2]) == 1.0
    assert math.isnan(S.auc([], [1.0]))


@pytest.mark.slow
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


def test_wilson():
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and math.isclose(lo + hi, 1.0)
    assert math.isclose(lo, 0.4038, abs_tol=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and 0 < wilson(0, 10)[1] < 0.35
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_symmetric_and_extreme_cases():
    assert mcnemar_exact(0, 5) == mcnemar_exact(5, 0) == 0.0625
    assert mcnemar_exact(3, 3) == mcnemar_exact(0, 0) == 1.0
    assert math.isclose(mcnemar_exact(1, 9), 22 / 1024)
    assert 0 < mcnemar_exact(100, 160) < 0.001


def test_mcnemar_exact_by_hand():
    # 1 vs 7 discordant: P(X <= 1) for X ~ Bin(8, 1/2), doubled
    assert S.mcnemar_exact(1, 7) == pytest.approx(2 * (math.comb(8, 0) + math.comb(8, 1)) / 2**8)
    assert S.mcnemar_exact(7, 1) == pytest.approx(18 / 256)
    assert S.mcnemar_exact(0, 0) == 1.0 and S.mcnemar_exact(4, 4) == 1.0
    assert S.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)
    res = S.paired_accuracy(*pairs(50, 7, 1, 42))
    assert res["wrong_to_right"] == 7 and res["right_to_wrong"] == 1
    assert res["mcnemar_exact_p"] == pytest.approx(18 / 256)
    assert res["p"] == pytest.approx(math.erfc(6 / math.sqrt(8) / math.sqrt(2)))  # the score test: z = 6 / sqrt 8
    assert res["difference"] == pytest.approx(6 / 100)
    assert res["base_accuracy"] == pytest.approx(0.51) and res["treat_accuracy"] == pytest.approx(0.57)


def test_newcombe_interval_matches_published_example():
    """Cavo et al. (2012) paired table [[59, 6], [16, 80]]: Newcombe square-and-add 95% CI for the
    difference -0.0621 is (-0.1186, -0.0046) (Fagerland, Lydersen & Laake, Statistical Analysis of
    Contingency Tables, ch. 8)."""
    lo, hi = S.newcombe_paired_ci(59, 6, 16, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)
    res = S.paired_accuracy(*pairs(59, 6, 16, 80), method="newcombe")
    assert res["difference"] == pytest.approx(-10 / 161)
    assert res["ci95"] == pytest.approx([lo, hi]) and res["p"] == res["mcnemar_exact_p"]


def test_paired_interval_coverage():
    """Cells (both right, wrong->right, right->wrong, both wrong) = (.45, .15, .10, .30): true gain 0.05."""
    rng = np.random.default_rng(13)
    probs = [0.45, 0.15, 0.10, 0.30]
    n_sim, hit_sc, hit_nc, hit_bs = 300, 0, 0, 0
    for i in range(n_sim):
        base, treat = pairs(*rng.multinomial(150, probs))
        sc = S.paired_accuracy(base, treat)
        nc = S.paired_accuracy(base, treat, method="newcombe")
        bs = S.paired_accuracy(base, treat, method="bootstrap", n_boot=2000, seed=i)
        hit_sc += sc["ci95"][0] <= 0.05 <= sc["ci95"][1]
        hit_nc += nc["ci95"][0] <= 0.05 <= nc["ci95"][1]
        hit_bs += bs["ci95"][0] <= 0.05 <= bs["ci95"][1]
    assert 0.91 <= hit_sc / n_sim <= 0.985  # Binomial(300, 0.95): sd 0.013
    assert 0.91 <= hit_nc / n_sim <= 0.985
    assert 0.91 <= hit_bs / n_sim <= 0.985
    # no discordant pair: the score and Newcombe intervals stay honest, non-degenerate, around 0
    none = S.paired_accuracy(*pairs(30, 0, 0, 20))
    assert none["ci95"][0] < 0 < none["ci95"][1] and none["p"] == 1.0
    assert S.paired_accuracy(*pairs(30, 0, 0, 20), method="newcombe")["ci95"][0] < 0
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
    exact = {name: S.mcnemar_exact(c[1], c[2]) for name, c in tables.items()}
    assert exact["music"] == pytest.approx(2 * 11 / 2**10)  # P(X <= 1), X ~ Bin(10, 1/2), doubled
    raw = {name: (1.0 if c[1] + c[2] == 0 else 2 * sps.norm.sf(abs(c[1] - c[2]) / math.sqrt(c[1] + c[2])))
           for name, c in tables.items()}  # the score test, by hand
    adj = dict(zip(raw, S.holm(list(raw.values()))))
    for name, (n11, n12, n21, n22) in tables.items():
        r = rows[name]
        assert r["n"] == n11 + n12 + n21 + n22
        assert (r["wrong_to_right"], r["right_to_wrong"]) == (n12, n21)
        assert r["difference"] == pytest.approx((n12 - n21) / r["n"])
        assert r["mcnemar_exact_p"] == pytest.approx(exact[name])
        assert r["p"] == pytest.approx(raw[name]) and r["p_holm"] == pytest.approx(adj[name])
    assert rows["speech"]["too_small"] and rows["speech"]["ci95"] is None  # 8 items
    assert not rows["music"]["too_small"] and rows["music"]["ci95"][0] > 0
    with pytest.raises(ListenError):
        S.paired_accuracy(base, treat[:-1])
    with pytest.raises(ListenError):
        S.paired_accuracy(base, treat, method="wald")


def test_paired_mean_diff_matches_scipy_and_covers_a_planted_shift():
    from scipy import stats as sps

    from mlx_listen.stats import paired_mean_diff

    rng = np.random.default_rng(5)
    base = rng.normal(0, 3, 200)  # the items' own spread is large; the pairing removes it
    treat = base + 0.4 + rng.normal(0, 0.5, 200)
    r = paired_mean_diff(base, treat)
    tt = sps.ttest_rel(treat, base)
    lo, hi = tt.confidence_interval(0.95)
    assert r["ci95"] == pytest.approx([lo, hi]) and r["ci95"][0] > 0 and r["p"] == pytest.approx(tt.pvalue)
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
