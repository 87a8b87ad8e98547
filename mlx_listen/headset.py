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
    """`n` random head sets matched to `heads` (same heads per layer, in other layers; seeded,
    distinct, prefix-stable). When no matched set exists (e.g. the heads span every layer), uniform
    random sets of the same size, with a ListenWarning: those controls are weaker."""
    try:
        return stats.matched_random_sets(heads, n_layers, n_heads, n_sets=n, seed=seed)
    except ListenError as e:
        warnings.warn(f"no layer-matched random head sets ({e}); using uniform random sets of {len(heads)} heads",
                      ListenWarning, stacklevel=2)
        return [random_heads(n_layers, n_heads, len(heads), seed + i) for i in range(n)]


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
            heads = [(int(l), int(h)) for l, h in data["heads"]]
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ListenError(f"{path} is not a HEADS.json file ({type(e).__name__}: {e})") from None
        if not heads:
            raise ListenError(f"{path} selects no heads")
        if any(l < 0 or h < 0 for l, h in heads):
            raise ListenError(f"{path} lists negative layer or head indices")
        if len(set(heads)) != len(heads):
            dup = sorted({h for h in heads if heads.count(h) > 1})
            raise ListenError(f"{path} lists heads {dup} more than once")
        scores = _read_scores(path, data.get("scores")) if "scores" in data else None
        return cls(heads, scores, {k: v for k, v in data.items() if k not in ("heads", "scores", "k")}, Path(path))


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
