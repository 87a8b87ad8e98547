"""The model's one hook namespace: named points in the forward pass where functions read or edit,
and `Capture`, which records any of them at chosen positions.

| point | value | edit |
|---|---|---|
| `decoder.blocks.{l}.hook_resid_pre` | block input (B, L, hidden) | yes |
| `decoder.blocks.{l}.attn.hook_mask` | the mask handed to attention (`None`, `"causal"` or an array) | yes (return a mask) |
| `decoder.blocks.{l}.attn.hook_qk` | `(q, k, mask)`: post-RoPE queries (B, heads, L, d), every cached key (B, kv_heads, S, d), the mask attention uses | read only |
| `decoder.blocks.{l}.attn.hook_z` | per-head attention output before `o_proj` (B, L, heads, d) | yes |
| `decoder.blocks.{l}.attn.hook_audio_mass` | per head, the softmax attention mass on the audio positions, at the rows asked for (B, n, heads) | derived, read only |
| `decoder.blocks.{l}.attn.hook_pattern` | the attention rows over every key, at the rows asked for (B, n, heads, S), fp32 | derived, read only |
| `decoder.blocks.{l}.hook_resid_post` | block output, the residual stream (B, L, hidden) | yes |
| `encoder.blocks.{l}.attn.hook_qk` | `(q, k, mask)` of the audio tower (q already scaled) | read only |
| `encoder.blocks.{l}.attn.hook_pattern` | the audio tower's attention pattern (1, heads, T, T) | derived, read only |
| `encoder.blocks.{l}.hook_resid_post` | audio-tower block output (1, T, d_model) | yes |

A hook is `fn(value, point) -> value | None` (None: unchanged). `point` says where it runs:
`point.name`, `point.layer`, `point.scale` (attention points) and, for the call in progress,
`point.offset` (the absolute position of the call's first row: the KV-cache offset before the
call) and `point.length` (rows in the call); a derived point also has `point.positions`, the
absolute positions of the rows its value holds. Hooks select positions by where they are in the
sequence, not by counting calls, so a prompt cache filled earlier can be reused.

Derived points cost nothing until a hook asks for them: they are computed from `attn.hook_qk`
for the requested rows only (`at`, default every row of the call): `softmax(q_p Kᵀ · scale)` over
the keys up to p, next to the fused kernel, which still produces the layer output. O(heads ×
keys × head_dim) per row, never an L×L pattern. `hook_audio_mass` needs the audio positions.

`model.hooks.add(name, fn)` returns a `Handle` (`.remove()`, or use it as a context manager);
`using([(name, fn), ...])` installs several for a block. No hook is installed by default and a
point without hooks returns its value untouched: the forward pass is then mlx-lm's, op for op.
The points are plain Python objects held outside the MLX module tree, so parameters,
`mx.compile`, saving and `deepcopy` never see them.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import mlx.core as mx
import numpy as np

Hook = Callable[[Any, "HookPoint"], Any]

RESID = "decoder.blocks.{}.hook_resid_post"
RESID_PRE = "decoder.blocks.{}.hook_resid_pre"
Z = "decoder.blocks.{}.attn.hook_z"
QK = "decoder.blocks.{}.attn.hook_qk"
MASK = "decoder.blocks.{}.attn.hook_mask"
AUDIO_MASS = "decoder.blocks.{}.attn.hook_audio_mass"
PATTERN = "decoder.blocks.{}.attn.hook_pattern"
ENC_RESID = "encoder.blocks.{}.hook_resid_post"
ENC_QK = "encoder.blocks.{}.attn.hook_qk"
ENC_PATTERN = "encoder.blocks.{}.attn.hook_pattern"


def decoder_point(layer: int, what: str) -> str:
    """`decoder_point(3, "hook_resid_post")` -> `decoder.blocks.3.hook_resid_post`."""
    return f"decoder.blocks.{layer}.{what}"


class HookPoint:
    __slots__ = ("name", "layer", "scale", "fns", "offset", "length", "positions", "source", "kind")

    def __init__(self, name: str, layer: int, scale: float | None = None, source: "HookPoint | None" = None,
                 kind: str | None = None):
        self.name, self.layer, self.scale = name, layer, scale
        self.source, self.kind = source, kind  # derived points: the qk point they are computed from
        self.fns: tuple[Hook, ...] = ()
        self.offset = self.length = 0
        self.positions = None

    @property
    def derived(self) -> bool:
        return self.source is not None

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


class Handle:
    """Installed hooks: `.remove()` takes them out (idempotent); as a context manager, on exit."""

    def __init__(self, hooks: "Hooks", installed: list[tuple[HookPoint, Hook]]):
        self._hooks, self._installed = hooks, installed

    def remove(self):
        for point, fn in reversed(self._installed):
            point.fns = tuple(f for f in point.fns if f is not fn)
        self._installed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def select_rows(at, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a call, their absolute positions) among `at`: an int, a list of positions, a
    `slice` (e.g. `slice(T, None)`: T and everything after) or None (every row of the call)."""
    if at is None:
        pos = np.arange(offset, offset + length)
    elif isinstance(at, slice):
        lo = max(offset, at.start or 0)
        hi = offset + length if at.stop is None else min(offset + length, at.stop)
        pos = np.arange(lo, max(lo, hi))
    else:
        pos = np.atleast_1d(np.asarray(at, np.int64))
        pos = pos[(pos >= offset) & (pos < offset + length)]
    return pos - offset, pos


def expand_kv(k: mx.array, n_heads: int) -> mx.array:
    """Repeat KV heads to the query heads (GQA), (B, KV, S, D) -> (B, H, S, D)."""
    rep = n_heads // k.shape[1]
    return k if rep == 1 else mx.repeat(k, rep, axis=1)


def attention_rows(q: mx.array, k: mx.array, scale: float, rows: np.ndarray, positions: np.ndarray,
                   mask=None, causal: bool = True) -> mx.array:
    """Softmax attention rows (B, H, n, S) in float32 for the call's query `rows`, which sit at
    absolute `positions`; each sees the keys up to its own position (`causal`), and an array `mask`
    (as attention received it, e.g. heads masked off the audio) applies too."""
    sel = mx.array(rows)
    qr = q[:, :, sel] if len(rows) != q.shape[2] else q
    s = (qr.astype(mx.float32) @ expand_kv(k, q.shape[1]).astype(mx.float32).swapaxes(-1, -2)) * scale
    S = k.shape[2]
    if causal and positions.min() < S - 1:  # a row before the last key: hide the future
        s = mx.where(mx.arange(S)[None] <= mx.array(positions)[:, None], s, -mx.inf)
    if isinstance(mask, mx.array):
        m = mask[..., sel, :] if mask.shape[-2] != 1 else mask
        s = mx.where(m, s, -mx.inf) if m.dtype == mx.bool_ else s + m.astype(mx.float32)
    return mx.softmax(s, axis=-1)


class Hooks:
    """Every hook point of one model, by name; `model.hooks`."""

    def __init__(self):
        self._points: dict[str, HookPoint] = {}

    # -- declaration (model construction only) ------------------------------------------------------
    def point(self, name: str, layer: int, scale: float | None = None) -> HookPoint:
        p = self._points[name] = HookPoint(name, layer, scale)
        return p

    def derive(self, name: str, source: HookPoint, kind: str) -> HookPoint:
        """A read-only point computed from an `attn.hook_qk` point: `audio_mass`, `pattern` (causal
        rows) or `encoder_pattern` (the whole unmasked pattern)."""
        p = self._points[name] = HookPoint(name, source.layer, source.scale, source, kind)
        return p

    # -- lookup -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._points)

    def match(self, pattern: str) -> list[str]:
        """Point names matching a glob pattern (`decoder.blocks.*.hook_resid_post`)."""
        return [n for n in self._points if fnmatch.fnmatchcase(n, pattern)]

    def expand(self, names) -> list[str]:
        """Names, glob patterns or a predicate -> point names; a pattern matching nothing is a ValueError."""
        if callable(names):
            return [n for n in self._points if names(n)]
        out = []
        for pat in [names] if isinstance(names, str) else list(names):
            hit = self.match(pat)
            if not hit:
                raise ValueError(f"no hook point matches {pat!r}; names look like {RESID.format(0)!r}, "
                                 f"{AUDIO_MASS.format(0)!r}, {ENC_PATTERN.format(0)!r}")
            out += [h for h in hit if h not in out]
        return out

    def __getitem__(self, name: str) -> HookPoint:
        try:
            return self._points[name]
        except KeyError:
            raise KeyError(f"no hook point {name!r}; names look like {RESID.format(0)!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._points

    def active(self) -> list[str]:
        return [n for n, p in self._points.items() if p.fns]

    # -- installing ---------------------------------------------------------------------------------
    def add(self, name: str, fn: Hook, *, at=None, audio_positions=None) -> Handle:
        """Install `fn` at point `name`; returns its `Handle`. For a derived point, `at` picks the
        rows it is computed for (default: every row of each call) and `audio_positions` (needed by
        `hook_audio_mass`) the keys whose mass is summed."""
        p = self[name]
        if p.derived:
            fn = self._derived_hook(p, fn, at, audio_positions)
            p = p.source
        elif at is not None or audio_positions is not None:
            raise ValueError(f"{name} is not a derived point: its hooks see every row (use point.offset)")
        p.fns = p.fns + (fn,)
        return Handle(self, [(p, fn)])

    def remove(self, name: str, fn: Hook):
        p = self[name]
        p.fns = tuple(f for f in p.fns if f is not fn)

    @contextmanager
    def using(self, pairs: Iterable[tuple[str, Hook]]):
        """Install `(name, fn)` pairs (or `(name, fn, options)`) for the block, in order; removed on exit."""
        handles = []
        try:
            for pair in pairs:
                name, fn, *opts = pair
                handles.append(self.add(name, fn, **(opts[0] if opts else {})))
            yield self
        finally:
            for h in reversed(handles):
                h.remove()

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

    @staticmethod
    def _derived_hook(p: HookPoint, fn: Hook, at, audio_positions) -> Hook:
        if p.kind == "audio_mass":
            if audio_positions is None:
                raise ValueError(f"{p.name} needs the audio positions (Prompt.audio_positions)")
            audio = np.asarray(audio_positions, np.int64)

        def hook(qk, source: HookPoint):
            q, k, mask = qk
            p.offset, p.length = source.offset, source.length
            if p.kind == "encoder_pattern":  # the encoder runs unmasked over a clip's valid frames
                s = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * source.scale
                p.positions = np.arange(source.length)
                fn(mx.softmax(s, axis=-1), p)
                return None
            rows, pos = select_rows(at, source.offset, source.length)
            if not rows.size:
                return None
            rows_p = attention_rows(q, k, source.scale, rows, pos, mask)  # (B, H, n, S)
            p.positions = pos
            if p.kind == "audio_mass":
                keys = audio[audio < k.shape[2]]
                m = rows_p[..., mx.array(keys)].sum(-1) if keys.size else mx.zeros(rows_p.shape[:3])
                fn(m.swapaxes(1, 2), p)  # (B, n, H)
            else:
                fn(rows_p.swapaxes(1, 2), p)  # (B, n, H, S)
            return None

        return hook


# -- recording ------------------------------------------------------------------------------------

class Capture:
    """`with Capture(model, names, audio_positions=prompt.audio_positions, at=T) as cap: ...`

    `names`: point names, glob patterns (`decoder.blocks.*.attn.hook_audio_mass`) or a predicate.
    `at`: which absolute positions to record (an int, a list, or a `slice`, e.g. `slice(T, None)`
    for T and every generated token); the encoder's points record every position. A forward call
    that contains none of those positions records nothing and costs nothing, so a capture kept on
    over a long generation stays flat. Recorded values are handed to `mx.async_eval` as they are
    produced, so no lazy graph keeps a decode step's key-cache view alive (which would make MLX
    copy the cache on every step).

    Values: `cap.values[name]` is a list with one array per recorded forward call, its rows at
    the positions listed in `cap.positions[name]` (same order); `attn.hook_qk` records the
    queries and the keys of those positions, as a pair (B, n, heads, d), (B, n, kv_heads, d)."""

    def __init__(self, model, names, *, audio_positions=None, at: int | slice | list | None = None):
        self.model = model
        self.audio_positions = None if audio_positions is None else np.asarray(audio_positions, np.int64)
        self.at = at
        self.values: dict[str, list] = defaultdict(list)
        self.positions: dict[str, list[np.ndarray]] = defaultdict(list)
        exact = set() if callable(names) else {n for n in ([names] if isinstance(names, str) else names)
                                                 if not any(c in n for c in "*?[")}
        # `attn.hook_mask` carries no per-position value (an edit point): a pattern skips it, a name is refused
        self.names = [n for n in model.hooks.expand(names) if n in exact or not n.endswith("attn.hook_mask")]
        self._pairs = [self._recorder(n) for n in self.names]
        self._ctx = None

    def _recorder(self, name: str):
        point = self.model.hooks[name]
        if name.endswith("attn.hook_mask"):
            raise ValueError(f"{name} is an edit point (the mask attention receives): install a hook to read it")
        encoder = name.startswith("encoder.")
        if self.at is None and not encoder:
            raise ValueError("say which positions to capture (at=T for the last prompt position)")
        if point.derived:
            if point.kind == "audio_mass" and self.audio_positions is None:
                raise ValueError("audio mass needs audio_positions (Prompt.audio_positions)")
            opts = {"at": None if encoder else self.at}
            if point.kind == "audio_mass":
                opts["audio_positions"] = self.audio_positions

            def derived(value, p):
                self._keep(name, value, p.positions)

            return name, derived, opts

        def hook(x, p: HookPoint):
            rows, pos = select_rows(None if encoder else self.at, p.offset, p.length)
            if not rows.size:
                return
            if isinstance(x, tuple):  # attn.hook_qk: the queries and the keys at those positions
                q, k, _ = x
                sel = mx.array(rows)
                self._keep(name, (q[:, :, sel].swapaxes(1, 2), k[:, :, mx.array(pos)].swapaxes(1, 2)), pos)
            else:
                self._keep(name, x[:, mx.array(rows)] if rows.size != x.shape[1] else x, pos)

        return name, hook, {}

    def __enter__(self):
        self._ctx = self.model.hooks.using(self._pairs)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._ctx = None

    def _keep(self, name: str, value, pos: np.ndarray):
        mx.async_eval(value)  # detach from the graph now (see the class docstring)
        self.values[name].append(value)
        self.positions[name].append(pos)

    # -- results -----------------------------------------------------------------------------------
    def get(self, name: str, position: int | None = None):
        """The value of `name` at one absolute position, batch first: (B, ...). Without a position:
        every recorded position stacked on axis 1 (B, n, ...), in recording order."""
        vals, poss = self.values.get(name), self.positions.get(name)
        if not vals:
            raise KeyError(f"nothing was captured for {name!r}")
        if isinstance(vals[0], tuple):
            return tuple(_pick([v[i] for v in vals], poss, position, name) for i in range(len(vals[0])))
        return _pick(vals, poss, position, name)

    def recorded(self, name: str) -> np.ndarray:
        """The absolute positions recorded for `name`, in order."""
        return np.concatenate(self.positions[name]) if self.positions.get(name) else np.zeros(0, np.int64)

    def audio_mass(self, position: int, row: int = 0) -> np.ndarray:
        """(n_layers, n_heads) audio mass at one position (e.g. T), for batch row `row`; NaN in the
        layers that were not captured."""
        rows = {l: np.array(self.get(AUDIO_MASS.format(l), position)[row]) for l in range(self.model.n_layers)
                if self.values.get(AUDIO_MASS.format(l))}
        if not rows:
            raise KeyError(f"no audio mass was captured at position {position}")
        first = next(iter(rows.values()))
        out = np.full((self.model.n_layers, first.shape[-1]), np.nan, first.dtype)
        for l, v in rows.items():
            out[l] = v
        return out

    def audio_mass_over(self, positions, row: int = 0) -> np.ndarray:
        """(n_positions, n_layers, n_heads) audio mass at each of `positions`."""
        return np.stack([self.audio_mass(int(p), row) for p in positions]) if len(positions) else np.zeros((0,))

    def resid(self, layer: int, position: int, row: int = 0) -> mx.array:
        """Block `layer`'s output at an absolute position (hidden,)."""
        return self.get(RESID.format(layer), position)[row]


def _pick(vals, poss, position, name):
    if position is None:
        return mx.concatenate(vals, axis=1) if len(vals) > 1 else vals[0]
    for v, p in zip(vals, poss):
        hit = np.flatnonzero(p == position)
        if hit.size:
            return v[:, int(hit[0])]
    raise KeyError(f"{name!r} was not captured at position {position}")


# -- one forward pass -------------------------------------------------------------------------------

def run_with_hooks(model, prompt, hooks: Iterable[tuple], at: int | None = None) -> mx.array:
    """One forward pass over a prepared prompt with `(name, fn[, options])` hooks installed;
    logits at `at` (default T, the last prompt position) only, (1, vocab)."""
    T = prompt.last if at is None else at
    with model.hooks.using(hooks):
        h = model.blocks(prompt.embeddings[None, :T + 1])
        logits = model.unembed(h[:, -1])
        mx.eval(logits)
    return logits


def run_with_cache(model, prompt, names, at: int | slice | list | None = None):
    """One forward pass over a prepared prompt, capturing `names` at `at` (default: T).

    Returns `(logits at T (1, vocab), Capture)`: logits for the last position only, as generation
    needs them."""
    T = prompt.last
    with Capture(model, names, audio_positions=prompt.audio_positions, at=T if at is None else at) as cap:
        h = model.blocks(prompt.embeddings[None])
        logits = model.unembed(h[:, -1])
        mx.eval(logits)
    return logits, cap
