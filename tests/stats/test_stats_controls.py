"""`mlx_listen.stats` matched random-head controls: layer profiles, uniform layers, the number and
support of the matched sets by brute-force enumeration, impossible cases, empirical p-values.

No expected number here is copied from the code under test. Every simulation has a fixed seed,
and where a property only holds with high probability the test checks it across many draws with
a wide margin, so it is not flaky.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from scipy import stats as sps

from mlx_listen import stats as S
from mlx_listen.errors import ListenError

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
