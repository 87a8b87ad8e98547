"""KV caches for work that continues one prefilled prompt: the one place a prompt's cache is forked.

- `repeat(cache, n)`: n independent rows, each an mlx-lm `KVCache` (a batched decode: every row
  grows step by step, written in place).
- `keep_rows(cache, rows)`: drop finished rows of such a batch.
- `views(cache)`: fresh caches that read a stored one up to its offset and never write it (the
  first update of a view allocates a new buffer, as mlx-lm's `KVCache` grows by concatenation).
- `SharedPrefix`: a batch of rows that share a prefix, kept once and broadcast to the rows at
  each call, the rows' own keys after it (one-shot batched forwards: option scoring, patching).
  Nothing of the prefix is copied per row.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache, create_attention_mask


def repeat(cache: list, n: int) -> list[KVCache]:
    """n independent copies of a batch-1 KV cache (the rows of a batch)."""
    out = []
    for c in cache:
        f = KVCache()
        f.keys, f.values, f.offset = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0), c.offset
        out.append(f)
    return out


def keep_rows(cache: list, rows: mx.array):
    """Keep only batch `rows` (an index array) of every layer's cache, in place."""
    for c in cache:
        c.keys, c.values = c.keys[rows], c.values[rows]


def views(cache: list, depth: int | None = None, upto: int | None = None) -> list[KVCache]:
    """Caches of the first `depth` layers reading `cache` up to its offset (or `upto` positions);
    `cache` is never written."""
    out = []
    for c in cache[:depth]:
        f = KVCache()
        if c.keys is not None:
            n = c.offset if upto is None else min(upto, c.offset)
            f.keys, f.values, f.offset = c.keys[..., :n, :], c.values[..., :n, :], n
        out.append(f)
    return out


class SharedPrefix:
    """One layer's KV cache for a batch whose rows share a prefix: the prefix (1, kv, P, d) is kept
    once and broadcast to the rows at each call; the rows' own keys and values follow it."""

    def __init__(self, keys, values, own_k=None, own_v=None):
        self.pk, self.pv, self.ok, self.ov = keys, values, own_k, own_v
        self.offset = keys.shape[2] + (0 if own_k is None else own_k.shape[2])

    @classmethod
    def of(cls, cache: list, n: int | None = None, start: int = 0) -> list["SharedPrefix"]:
        """The first `n` positions (default: all it holds) of a batch-1 mlx-lm cache, from layer `start` on."""
        return [cls(c.keys[..., :c.offset if n is None else n, :], c.values[..., :c.offset if n is None else n, :])
                for c in cache[start:]]

    def update_and_fetch(self, k, v):
        self.ok = k if self.ok is None else mx.concatenate([self.ok, k], axis=2)
        self.ov = v if self.ov is None else mx.concatenate([self.ov, v], axis=2)
        self.offset += k.shape[2]
        if self.pk.shape[2] == 0:
            return self.ok, self.ov
        R = self.ok.shape[0]
        pk = mx.broadcast_to(self.pk, (R,) + self.pk.shape[1:])
        pv = mx.broadcast_to(self.pv, (R,) + self.pv.shape[1:])
        return mx.concatenate([pk, self.ok], axis=2), mx.concatenate([pv, self.ov], axis=2)

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return create_attention_mask(N, self.offset, return_array, window_size)

    def fork(self, k: int) -> "SharedPrefix":
        """Each row repeated k times (row r becomes rows r*k .. r*k + k-1)."""
        return SharedPrefix(self.pk, self.pv, mx.repeat(self.ok, k, axis=0), mx.repeat(self.ov, k, axis=0))
