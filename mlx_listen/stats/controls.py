"""Random-head controls matched to a head set's layer profile, and where a value sits among controls."""

from __future__ import annotations

from collections import Counter, defaultdict
from math import comb

import numpy as np

from ..errors import ListenError
from ._common import _TIE

# -- matched random-head controls ---------------------------------------------------------------

def check_heads(heads, n_layers: int, n_heads: int, what: str = "heads", allow_empty: bool = False) -> list:
    """`heads` as (layer, head) int pairs; refuses a malformed, empty (unless `allow_empty`) or
    repeated list and heads a model of `n_layers` x `n_heads` does not have. The one head check."""
    try:
        hs = [(int(l), int(h)) for l, h in heads]
    except (TypeError, ValueError):
        raise ListenError(f"{what} must be (layer, head) pairs") from None
    if not hs and not allow_empty:
        raise ListenError(f"{what}: no heads")
    if len(set(hs)) != len(hs):
        dup = sorted({h for h in hs if hs.count(h) > 1})
        raise ListenError(f"{what} list {dup} more than once")
    bad = [x for x in hs if not (0 <= x[0] < n_layers and 0 <= x[1] < n_heads)]
    if bad:
        raise ListenError(f"{what} {bad} do not exist in this model ({n_layers} layers x {n_heads} heads)")
    return hs


def _count_fills(layers, cap, counts, every_layer: bool) -> int:
    """Head sets that give each of `counts` to a distinct layer of `layers` (capacity cap[l]),
    leaving the other layers empty (every_layer: none may stay empty). Exact DP over layers."""
    values = sorted(set(counts))
    dp = {tuple(counts.count(v) for v in values): 1}
    for l in layers:
        nxt: dict = defaultdict(int)
        for state, ways in dp.items():
            if not every_layer:
                nxt[state] += ways
            for i, v in enumerate(values):
                if state[i] and cap[l] >= v:
                    s = list(state)
                    s[i] -= 1
                    nxt[tuple(s)] += ways * comb(cap[l], v)
        dp = nxt
    return dp.get((0,) * len(values), 0)


def _profile(heads, n_layers, n_heads, exclude):
    hs = check_heads(heads, n_layers, n_heads, "specialist heads")
    ex = set(hs) if exclude is None else set(check_heads(exclude, n_layers, n_heads, "excluded heads", True))
    per_layer = Counter(l for l, _ in hs)
    cap = [n_heads - sum(1 for l, _ in ex if l == layer) for layer in range(n_layers)]
    return hs, ex, per_layer, cap


def count_matched_sets(heads, n_layers: int, n_heads: int, exclude=None) -> int:
    """Number of distinct head sets matching `heads`' layer profile, avoiding `exclude` (default:
    `heads`) and not reading exactly the same layers."""
    _, _, per_layer, cap = _profile(heads, n_layers, n_heads, exclude)
    counts = sorted(per_layer.values())
    return (_count_fills(range(n_layers), cap, counts, False)
            - _count_fills(sorted(per_layer), cap, counts, True))


def matched_random_sets(heads, n_layers: int, n_heads: int, n_sets: int = 10, seed: int = 0,
                        exclude=None) -> list[list[tuple[int, int]]]:
    """Random-head controls matched to `heads`: same head count, same number of distinct layers,
    same per-layer head counts (the counts go to uniformly drawn layers in random order; heads
    uniform within a layer), never a head of `exclude` (default: `heads`) and never exactly the
    specialist layer set (steering reads layers only, so that set would be no control).

    Seeded; distinct sets; prefix-stable (the first j sets do not depend on n_sets). Each set is
    sorted by (layer, head). Raises ListenError when fewer than n_sets such sets exist (e.g. the
    specialist heads span every layer)."""
    hs, ex, per_layer, cap = _profile(heads, n_layers, n_heads, exclude)
    if isinstance(n_sets, bool) or int(n_sets) < 1:
        raise ListenError(f"n_sets must be a positive integer, got {n_sets!r}")
    n_sets = int(n_sets)
    m = len(per_layer)
    if m == n_layers:
        raise ListenError(f"the specialist heads span all {n_layers} layers: a layer-matched random set would "
                          "steer with the same layers, so no matched control exists")
    total = count_matched_sets(hs, n_layers, n_heads, list(ex))
    if total < n_sets:
        raise ListenError(f"only {total} distinct random head sets match the specialist layer profile "
                          f"{dict(sorted(per_layer.items()))} (excluding {len(ex)} heads); {n_sets} were asked for")
    spec_layers = frozenset(per_layer)
    counts = np.array(sorted(per_layer.values()))
    free = {l: [h for h in range(n_heads) if (l, h) not in ex] for l in range(n_layers)}
    rng = np.random.default_rng(seed)
    out, seen, tries = [], set(), 0
    max_tries = 10_000 + 1_000 * n_sets
    while len(out) < n_sets:
        tries += 1
        if tries > max_tries:
            raise ListenError(f"could not draw {n_sets} distinct matched random head sets in {max_tries} tries "
                              f"({total} exist); ask for fewer")
        layers = rng.choice(n_layers, m, replace=False)
        cs = rng.permutation(counts)
        if frozenset(layers.tolist()) == spec_layers or any(cap[l] < c for l, c in zip(layers, cs)):
            continue
        chosen = sorted((int(l), free[l][j]) for l, c in zip(layers, cs)
                        for j in rng.choice(len(free[l]), int(c), replace=False))
        key = tuple(chosen)
        if key in seen:
            continue
        seen.add(key)
        out.append(chosen)
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


