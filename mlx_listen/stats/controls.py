"""Random-head controls matched to a head set's layer profile, and where a value sits among controls."""

from __future__ import annotations

import itertools
from collections import Counter
from math import comb

import numpy as np

from ..errors import ListenError
from ._common import _TIE

# -- matched random-head controls ---------------------------------------------------------------

def _is_index(v) -> bool:
    """An integer (Python or numpy), not a bool or a float: `[1.5, 2]` is no head, not head (1, 2)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_heads(heads, n_layers: int, n_heads: int, what: str = "heads", allow_empty: bool = False) -> list:
    """`heads` as (layer, head) int pairs; refuses a malformed, empty (unless `allow_empty`) or
    repeated list and heads a model of `n_layers` x `n_heads` does not have. The one head check."""
    try:
        pairs = [tuple(x) for x in heads]
    except TypeError:
        raise ListenError(f"{what} must be (layer, head) pairs") from None
    if any(len(x) != 2 or not all(_is_index(v) for v in x) for x in pairs):
        bad = next(list(x) for x in pairs if len(x) != 2 or not all(_is_index(v) for v in x))
        raise ListenError(f"{what} must be (layer, head) pairs of whole numbers, not {bad}")
    hs = [(int(l), int(h)) for l, h in pairs]
    if not hs and not allow_empty:
        raise ListenError(f"{what}: no heads")
    if len(set(hs)) != len(hs):
        dup = sorted({h for h in hs if hs.count(h) > 1})
        raise ListenError(f"{what} list {dup} more than once")
    bad = [x for x in hs if not (0 <= x[0] < n_layers and 0 <= x[1] < n_heads)]
    if bad:
        raise ListenError(f"{what} {bad} do not exist in this model ({n_layers} layers x {n_heads} heads)")
    return hs


def _profile(heads, n_layers, n_heads, exclude):
    hs = check_heads(heads, n_layers, n_heads, "specialist heads")
    ex = set(hs) if exclude is None else set(check_heads(exclude, n_layers, n_heads, "excluded heads", True))
    per_layer = Counter(l for l, _ in hs)
    cap = [n_heads - sum(1 for l, _ in ex if l == layer) for layer in range(n_layers)]
    return hs, ex, per_layer, cap


def _fits(layers, cap, counts_desc) -> bool:
    """Whether the per-layer counts can go to distinct `layers` (each with cap[l] free heads): the
    largest count to the roomiest layer, and so on (Hall's condition for this threshold structure)."""
    caps = sorted((cap[l] for l in layers), reverse=True)
    return len(caps) == len(counts_desc) and all(k >= c for k, c in zip(caps, counts_desc))


def _count_layer_sets(cap, counts_desc) -> int:
    """Number of layer sets of size len(counts) the counts fit into (exact DP over the layers in
    decreasing capacity: the j-th layer chosen must hold the j-th largest count)."""
    m = len(counts_desc)
    dp = [1] + [0] * m
    for l in sorted(range(len(cap)), key=lambda x: -cap[x]):
        for j in range(m - 1, -1, -1):
            if dp[j] and cap[l] >= counts_desc[j]:
                dp[j + 1] += dp[j]
    return dp[m]


def count_matched_sets(heads, n_layers: int, n_heads: int, exclude=None) -> int:
    """Number of distinct *layer sets* a control matched to `heads` can read: sets of as many layers
    as `heads` spans that its per-layer head counts fit into, avoiding the heads of `exclude`
    (default: `heads`), other than the specialist layer set itself. Steering reads only the
    layers, so this is the number of distinct steering interventions a matched control can be."""
    _, _, per_layer, cap = _profile(heads, n_layers, n_heads, exclude)
    counts = sorted(per_layer.values(), reverse=True)
    return _count_layer_sets(cap, counts) - int(_fits(sorted(per_layer), cap, counts))


ENUMERATE_LIMIT = 20_000  # up to this many candidate layer sets, all are listed and drawn from without redraws


def matched_random_sets(heads, n_layers: int, n_heads: int, n_sets: int = 10, seed: int = 0,
                        exclude=None, allow_fewer: bool = False) -> list[list[tuple[int, int]]]:
    """Random-head controls matched to `heads`, **distinct by layer set**: same head count, same
    number of distinct layers, same per-layer head counts (assigned to the set's layers in random
    order among the assignments that fit; heads uniform within a layer), never a head of `exclude`
    (default: `heads`), never the specialist layer set, and no two sets on the same layers (steering
    reads the layers only, so two sets on the same layers would be one intervention counted twice).
    The layer sets are uniform over the distinct ones that fit.

    Seeded; prefix-stable (the first j sets do not depend on n_sets). Each set is sorted by
    (layer, head). When fewer than n_sets distinct layer sets exist: every one of them (in a seeded
    random order) with `allow_fewer`, else ListenError (e.g. the specialist heads span every layer)."""
    hs, ex, per_layer, cap = _profile(heads, n_layers, n_heads, exclude)
    if isinstance(n_sets, bool) or int(n_sets) < 1:
        raise ListenError(f"n_sets must be a positive integer, got {n_sets!r}")
    n_sets = int(n_sets)
    m = len(per_layer)
    if m == n_layers:
        raise ListenError(f"the specialist heads span all {n_layers} layers: a layer-matched random set would "
                          "steer with the same layers, so no matched control exists")
    total = count_matched_sets(hs, n_layers, n_heads, list(ex))
    if total < n_sets and not (allow_fewer and total):
        raise ListenError(f"only {total} distinct layer sets match the specialist layer profile "
                          f"{dict(sorted(per_layer.items()))} (excluding {len(ex)} heads); {n_sets} were asked for")
    n_sets = min(n_sets, total)
    spec_layers = tuple(sorted(per_layer))
    counts = sorted(per_layer.values(), reverse=True)
    free = {l: [h for h in range(n_heads) if (l, h) not in ex] for l in range(n_layers)}
    rng = np.random.default_rng(seed)

    def heads_on(layers) -> list[tuple[int, int]]:
        for _ in range(1000):  # a random assignment of the counts to the layers, among those that fit
            cs = rng.permutation(counts)
            if all(cap[l] >= c for l, c in zip(layers, cs)):
                break
        else:  # a tight fit: the largest count to the roomiest layer
            layers = sorted(layers, key=lambda l: -cap[l])
            cs = counts
        return sorted((int(l), free[l][j]) for l, c in zip(layers, cs)
                      for j in rng.choice(len(free[l]), int(c), replace=False))

    if comb(n_layers, m) <= ENUMERATE_LIMIT:  # list every layer set that fits, in a seeded random order
        every = [ls for ls in itertools.combinations(range(n_layers), m) if ls != spec_layers and _fits(ls, cap, counts)]
        order = rng.permutation(len(every))
        return [heads_on(list(every[i])) for i in order[:n_sets]]
    out, seen, tries = [], set(), 0
    max_tries = 10_000 + 1_000 * n_sets
    while len(out) < n_sets:
        tries += 1
        if tries > max_tries:
            raise ListenError(f"could not draw {n_sets} matched random head sets on distinct layer sets in "
                              f"{max_tries} tries ({total} exist); ask for fewer")
        layers = tuple(sorted(int(l) for l in rng.choice(n_layers, m, replace=False)))
        if layers == spec_layers or layers in seen or not _fits(layers, cap, counts):
            continue
        seen.add(layers)
        out.append(heads_on(list(rng.permutation(layers))))
    return out


def empirical_p(observed: float, null_values) -> float:
    """(1 + #{null >= observed}) / (1 + n): the p of `observed` within a null / control sample
    (NaNs dropped; values within 1e-12 relative of `observed` count as ties, so two gains that
    differ only by float rounding are not ranked). Never 0; its floor is 1 / (n + 1)."""
    x = np.asarray(null_values, np.float64).ravel()
    x = x[~np.isnan(x)]
    if not x.size:
        raise ListenError("empirical p-value: no null values")
    if observed is None or np.isnan(observed):
        raise ListenError("empirical p-value: the observed value is undefined")
    return float((1 + (x >= observed - _TIE * max(1.0, abs(observed))).sum()) / (1 + x.size))


def compare_to_controls(specialist: float, controls) -> dict:
    """The control distribution (e.g. test gains of matched random sets) and the empirical p of
    the specialist value in it (one-sided: are the specialist heads better than the controls?)."""
    x = np.asarray(controls, np.float64).ravel()
    x = x[~np.isnan(x)]
    if not x.size:
        raise ListenError("no control values")
    return {"specialist": float(specialist), "n": int(x.size), "values": x.tolist(), "mean": float(x.mean()),
            "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0, "min": float(x.min()),
            "median": float(np.median(x)), "max": float(x.max()),
            "empirical_p": empirical_p(specialist, x), "min_possible_p": 1.0 / (1 + x.size)}




def combine_fold_p(pvals) -> dict:
    """One claim tested in several folds (or repeats): `some` = Bonferroni, min(1, m * min p), the p
    of "it holds in at least one fold"; `every` = max p, the p of "it holds in every fold" (an
    intersection-union test). Both are valid whatever the dependence between the folds (their
    calibration sets overlap when there are more than two)."""
    p = np.asarray([x for x in pvals if x is not None], np.float64)
    if not p.size:
        return {"m": 0, "some": None, "every": None, "values": []}
    return {"m": int(p.size), "some": float(min(1.0, p.size * p.min())), "every": float(p.max()),
            "values": p.tolist()}
