"""The model's one hook registry: named points in the forward pass where functions read or edit.

| point | value | edit |
|---|---|---|
| `decoder.blocks.{l}.hook_resid_pre` | block input (B, L, hidden) | yes |
| `decoder.blocks.{l}.attn.hook_mask` | the mask handed to attention (`None`, `"causal"` or an array) | yes (return a mask) |
| `decoder.blocks.{l}.attn.hook_qk` | `(q, k, mask)`: post-RoPE queries (B, heads, L, d), every cached key (B, kv_heads, S, d), the mask attention uses | read only |
| `decoder.blocks.{l}.attn.hook_z` | per-head attention output before `o_proj` (B, L, heads, d) | yes |
| `decoder.blocks.{l}.hook_resid_post` | block output, the residual stream (B, L, hidden) | yes |
| `encoder.blocks.{l}.attn.hook_qk` | `(q, k, mask)` of the audio tower (q already scaled) | read only |
| `encoder.blocks.{l}.hook_resid_post` | audio-tower block output (1, T, d_model) | yes |

A hook is `fn(value, point) -> value | None` (None: unchanged). `point` says where it runs:
`point.name`, `point.layer`, `point.scale` (attention points) and, for the call in progress,
`point.offset` (the absolute position of the call's first row: the KV-cache offset before the
call) and `point.length` (rows in the call). Hooks select positions by where they are in the
sequence, not by counting calls, so a prompt cache filled earlier can be reused.

No hook is installed by default, and a point without hooks returns its value untouched: the
forward pass is then mlx-lm's, op for op. The points are plain Python objects held outside the
MLX module tree, so parameters, `mx.compile`, saving and `deepcopy` never see them.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Any, Callable, Iterable

Hook = Callable[[Any, "HookPoint"], Any]


class HookPoint:
    __slots__ = ("name", "layer", "scale", "fns", "offset", "length")

    def __init__(self, name: str, layer: int, scale: float | None = None):
        self.name, self.layer, self.scale = name, layer, scale
        self.fns: tuple[Hook, ...] = ()
        self.offset = self.length = 0

    def __call__(self, value, offset: int = 0, length: int = 0):
        if not self.fns:
            return value
        self.offset, self.length = offset, length
        for fn in self.fns:
            out = fn(value, self)
            if out is not None:
                value = out
        return value

    def __repr__(self):
        return f"HookPoint({self.name!r})"


class Hooks:
    """Every hook point of one model, by name; `model.hooks`."""

    def __init__(self):
        self._points: dict[str, HookPoint] = {}

    def point(self, name: str, layer: int, scale: float | None = None) -> HookPoint:
        """Declare a point (model construction only)."""
        p = self._points[name] = HookPoint(name, layer, scale)
        return p

    def names(self) -> list[str]:
        return list(self._points)

    def match(self, pattern: str) -> list[str]:
        """Point names matching a glob pattern (`decoder.blocks.*.hook_resid_post`)."""
        return [n for n in self._points if fnmatch.fnmatchcase(n, pattern)]

    def __getitem__(self, name: str) -> HookPoint:
        try:
            return self._points[name]
        except KeyError:
            raise KeyError(f"no hook point {name!r}; names look like {next(iter(self._points), '')!r}") from None

    def add(self, name: str, fn: Hook):
        p = self[name]
        p.fns = p.fns + (fn,)

    def remove(self, name: str, fn: Hook):
        p = self[name]
        p.fns = tuple(f for f in p.fns if f is not fn)

    def active(self) -> list[str]:
        return [n for n, p in self._points.items() if p.fns]

    @contextmanager
    def using(self, pairs: Iterable[tuple[str, Hook]]):
        """Install `(name, fn)` pairs for the duration of the block, in order; removed on exit."""
        pairs = list(pairs)
        done = []
        try:
            for name, fn in pairs:
                self.add(name, fn)
                done.append((name, fn))
            yield self
        finally:
            for name, fn in reversed(done):
                self.remove(name, fn)


    @contextmanager
    def suspended(self):
        """Hold every installed hook off for the block (an auxiliary pass, e.g. the silence run of
        steering, must not be captured or steered); hooks added inside run as usual."""
        saved = {n: p.fns for n, p in self._points.items() if p.fns}
        for n in saved:
            self._points[n].fns = ()
        try:
            yield self
        finally:
            for n, fns in saved.items():
                self._points[n].fns = fns + self._points[n].fns


def decoder_point(layer: int, what: str) -> str:
    """`decoder_point(3, "hook_resid_post")` -> `decoder.blocks.3.hook_resid_post`."""
    return f"decoder.blocks.{layer}.{what}"
