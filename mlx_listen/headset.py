"""Head sets, the listening score and the random-head control policy: the one definition of each.

- `HeadSet`: selected (layer, head) pairs, the score matrix they were ranked by and what they are
  bound to (HEADS.json, written by `mlx-listen heads`).
- `check_heads(heads, n_layers, n_heads)`: the one range and duplicate check of a head list.
- `listening(mass, heads)`: the listening score L(x), the mean audio mass of the heads at one
  position (arXiv 2603.06854), from a (layers, heads) matrix.
- `control_sets(heads, n_layers, n_heads, n, seed)`: the random-head controls every command uses
  (steer sweep, experiment, validate-heads, ablation controls): matched to the heads' layer
  profile (`stats.matched_random_sets`), because steering reads only the heads' layers.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from . import stats
from .errors import ListenError, ListenWarning
from .records import write_json

check_heads = stats.check_heads  # the one head check (stats owns it: it needs no model)


def listening(mass, heads: Sequence[tuple[int, int]]):
    """L(x): the mean audio mass of `heads` in one (layers, heads) matrix at one position.

    A numpy matrix gives a float; an `mx.array` (or anything indexable as `[l, h]` that yields
    mx arrays, e.g. lazy captured values) gives a float32 `mx.array` scalar, still in the graph."""
    ls, hs = [l for l, _ in heads], [h for _, h in heads]
    if isinstance(mass, np.ndarray):
        return float(mass[ls, hs].mean())
    if isinstance(mass, mx.array):
        return mass[mx.array(ls), mx.array(hs)].astype(mx.float32).mean()
    return mx.stack([mass[l, h] for l, h in heads]).astype(mx.float32).mean()


def control_sets(heads, n_layers: int, n_heads: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    """`n` random head sets matched to `heads` (same heads per layer, in other layers; distinct by
    layer set, since steering reads only the layers; seeded, prefix-stable): the one policy of every
    command (`stats.matched_random_sets`). When fewer than `n` distinct layer sets exist, all of them,
    with a ListenWarning (the caller reports how many it got). When none exists (the heads span every
    layer), uniform random sets of the same size on distinct layer sets, with a ListenWarning: those
    controls are weaker."""
    try:
        sets = stats.matched_random_sets(heads, n_layers, n_heads, n_sets=n, seed=seed, allow_fewer=True)
    except ListenError as e:
        warnings.warn(f"no layer-matched random head sets ({e}); using uniform random sets of {len(heads)} heads",
                      ListenWarning, stacklevel=2)
        return uniform_sets(heads, n_layers, n_heads, n, seed)
    if len(sets) < n:
        warnings.warn(f"only {len(sets)} distinct layer sets match the heads' layer profile; using all {len(sets)} "
                      f"instead of {n} random sets", ListenWarning, stacklevel=2)
    return sets


def uniform_sets(heads, n_layers: int, n_heads: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    """Up to `n` sets of len(heads) heads drawn uniformly, on distinct layer sets other than the heads'."""
    own = frozenset(l for l, _ in heads)
    out, seen = [], {own}
    for i in range(50 * n + 100):
        s = sorted(random_heads(n_layers, n_heads, len(heads), seed + i))
        layers = frozenset(l for l, _ in s)
        if layers not in seen:
            seen.add(layers)
            out.append(s)
            if len(out) == n:
                break
    return out


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """k heads uniformly over all of them, without replacement."""
    idx = np.random.default_rng(seed).choice(n_layers * n_heads, size=k, replace=False)
    return [(int(i // n_heads), int(i % n_heads)) for i in idx]


def parse_heads(spec: str, option: str = "--ablate") -> list[tuple[int, int]]:
    """A HEADS.json path, or heads written `L.H,L.H` (e.g. `3.7,12.0`)."""
    if re.fullmatch(r"\s*\d+\.\d+(\s*,\s*\d+\.\d+)*\s*", spec):
        return [(int(l), int(h)) for l, h in (p.strip().split(".") for p in spec.split(","))]
    if not Path(spec).is_file():
        raise ListenError(f"{option} takes a HEADS.json file or heads written L.H,L.H (e.g. 3.7,12.0); "
                          f"{spec!r} is neither")
    return list(HeadSet.load(spec).heads)


@dataclass
class HeadSet:
    heads: list[tuple[int, int]]
    scores: np.ndarray | None = None  # (layers, heads) Pearson r, when known
    meta: dict | None = None
    path: Path | None = None  # the file it was read from

    @property
    def layers(self) -> list[int]:
        """L*: the distinct layers of the selected heads (steering reads the residual there)."""
        return sorted({l for l, _ in self.heads})

    def listening(self, mass: np.ndarray) -> float:
        """L(x) for one (layers, heads) audio-mass matrix."""
        return listening(mass, self.heads)

    def check(self, n_layers: int, n_heads: int):
        check_heads(self.heads, n_layers, n_heads)

    def save(self, path: Path):
        data = {"heads": [list(map(int, h)) for h in self.heads], "k": len(self.heads), **(self.meta or {})}
        if self.scores is not None:
            data["scores"] = {f"{l},{h}": round(float(self.scores[l, h]), 6)
                              for l in range(self.scores.shape[0]) for h in range(self.scores.shape[1])}
        write_json(Path(path), data)

    @classmethod
    def load(cls, path) -> "HeadSet":
        try:
            data = json.loads(Path(path).read_text())
            raw = data["heads"]
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ListenError(f"{path} is not a HEADS.json file ({type(e).__name__}: {e})") from None
        if not isinstance(raw, list) or not raw:
            raise ListenError(f"{path} selects no heads" if raw == [] else f"{path}: 'heads' must be a list of "
                              "[layer, head] pairs")
        if any(isinstance(x, (list, tuple)) and any(isinstance(v, int) and v < 0 for v in x) for x in raw):
            raise ListenError(f"{path} lists negative layer or head indices")
        try:  # the model's own range is checked on use
            heads = check_heads(raw, 1 << 62, 1 << 62, "heads")
        except ListenError as e:
            raise ListenError(f"{path} is not a HEADS.json file ({e})") from None
        _check_meta_types(path, data)
        scores = _read_scores(path, data.get("scores")) if "scores" in data else None
        return cls(heads, scores, {k: v for k, v in data.items() if k not in ("heads", "scores", "k")}, Path(path))


_META_TYPES = {"model_signature": dict, "calibration_ids": list, "prompt": str, "listening_mean": (int, float),
               "center": str}


def _check_meta_types(path, data: dict):
    """What other commands read from a HEADS.json must have its type (a damaged or hand-edited file
    is one clear error, not a traceback later)."""
    for key, typ in _META_TYPES.items():
        if key in data and data[key] is not None and (not isinstance(data[key], typ) or isinstance(data[key], bool)):
            raise ListenError(f"{path}: its {key!r} is damaged (a {type(data[key]).__name__}, not a "
                              f"{typ.__name__ if isinstance(typ, type) else 'number'})")
    ids = data.get("calibration_ids")
    if isinstance(ids, list) and not all(isinstance(i, str) for i in ids):
        raise ListenError(f"{path}: its 'calibration_ids' are damaged (not a list of item ids)")


def _read_scores(path, raw) -> np.ndarray:
    """The `"layer,head": r` map of HEADS.json as a (layers, heads) array; refuses a damaged one."""
    try:
        if not isinstance(raw, dict) or not raw:
            raise ValueError("expected a non-empty object of 'layer,head': r")
        cells = {tuple(int(x) for x in k.split(",")): float(v) for k, v in raw.items()}
        if any(len(k) != 2 or min(k) < 0 for k in cells) or not all(math.isfinite(v) for v in cells.values()):
            raise ValueError("keys must be 'layer,head' and values finite numbers")
    except (ValueError, TypeError, AttributeError) as e:
        raise ListenError(f"{path}: its 'scores' are damaged ({e})") from None
    L, H = 1 + max(l for l, _ in cells), 1 + max(h for _, h in cells)
    if L * H != len(cells):  # HEADS.json holds the dense grid it was written with
        raise ListenError(f"{path}: its 'scores' are damaged ({len(cells)} entries for a {L} x {H} grid)")
    scores = np.zeros((L, H))
    for (l, h), v in cells.items():
        scores[l, h] = v
    return scores
