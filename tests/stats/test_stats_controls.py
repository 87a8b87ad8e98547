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


def layer_set(s):
    return frozenset(l for l, _ in s)


@pytest.mark.parametrize("spec, n_layers, n_heads", [
    ([(0, 0), (0, 1), (2, 2)], 4, 3),
    ([(1, 1)], 3, 3),
    ([(0, 0), (1, 1), (1, 2), (3, 0)], 5, 3),
    ([(0, 0), (0, 1), (1, 0)], 4, 2),  # a tight fit: layer 0 has no free head, layer 1 one
])
def test_matched_set_count_and_support_by_enumeration(spec, n_layers, n_heads):
    """The count is the number of distinct layer sets among every matching head set (brute force);
    the drawn sets are matching head sets, one per layer set, and cover every layer set."""
    every = brute_force_matches(spec, n_layers, n_heads, spec)
    layer_sets = {layer_set(s) for s in every}
    assert S.count_matched_sets(spec, n_layers, n_heads) == len(layer_sets)
    drawn = S.matched_random_sets(spec, n_layers, n_heads, n_sets=len(layer_sets), seed=0)
    assert all(tuple(s) in every for s in drawn)
    assert {layer_set(s) for s in drawn} == layer_sets and len(drawn) == len(layer_sets)
    with pytest.raises(ListenError, match=f"only {len(layer_sets)} distinct layer sets"):
        S.matched_random_sets(spec, n_layers, n_heads, n_sets=len(layer_sets) + 1)
    fewer = S.matched_random_sets(spec, n_layers, n_heads, n_sets=len(layer_sets) + 5, seed=0, allow_fewer=True)
    assert fewer == drawn  # all of them, the same draws


def test_matched_sets_are_distinct_interventions():
    """Steering reads only the layers: no two controls may read the same layers (the old policy let
    two "random sets" on the same layers answer identically and count twice in the p)."""
    spec = [(3, h) for h in range(4)]  # one layer: the controls are the other 31 layers, no more
    sets = S.matched_random_sets(spec, 32, 32, n_sets=99, seed=0, allow_fewer=True)
    assert len(sets) == 31 and len({layer_set(s) for s in sets}) == 31
    big = S.matched_random_sets([(l, 0) for l in range(0, 20, 2)], 32, 32, n_sets=99, seed=1)
    assert len({layer_set(s) for s in big}) == 99


def test_matched_sets_impossible_cases():
    with pytest.raises(ListenError, match="span all 3 layers"):
        S.matched_random_sets([(0, 0), (1, 2), (2, 1)], 3, 4)
    # 2 layers x 2 heads, one specialist head in layer 0: only layer 1 is left, one layer set
    assert S.matched_random_sets([(0, 0)], 2, 2, n_sets=1, seed=0) in ([[(1, 0)]], [[(1, 1)]])
    with pytest.raises(ListenError, match="only 1 distinct"):
        S.matched_random_sets([(0, 0)], 2, 2, n_sets=2)
    # 3 layers x 2 heads, profile {2, 1} on layers {0, 1}: the 2 must go to layer 2 and the 1 to
    # layer 1 (layer 0 has no free head left): exactly one set
    spec = [(0, 0), (0, 1), (1, 0)]
    assert S.matched_random_sets(spec, 3, 2, n_sets=1) == [[(1, 1), (2, 0), (2, 1)]]
    with pytest.raises(ListenError, match="only 1 distinct"):
        S.matched_random_sets(spec, 3, 2, n_sets=2)
    for bad in ([], [(0, 0), (0, 0)], [(5, 0)], [(1.5, 2)], [(True, 0)], [(0,)]):
        with pytest.raises(ListenError):
            S.matched_random_sets(bad, 3, 2)
    with pytest.raises(ListenError, match="positive integer"):
        S.matched_random_sets([(0, 0)], 3, 2, n_sets=0)


def test_control_sets_use_every_layer_set_when_fewer_exist():
    from mlx_listen.errors import ListenWarning
    from mlx_listen.headset import control_sets

    with pytest.warns(ListenWarning, match="only 3 distinct layer sets"):
        sets = control_sets([(0, 0)], 4, 2, 10, seed=0)
    assert sorted(min(layer_set(s)) for s in sets) == [1, 2, 3]
    with pytest.warns(ListenWarning, match="no layer-matched"):  # the heads span every layer
        uni = control_sets([(0, 0), (1, 0)], 2, 4, 5, seed=0)
    assert len({layer_set(s) for s in uni}) == len(uni) and all(layer_set(s) != {0, 1} for s in uni)


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
