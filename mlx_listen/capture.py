"""Capture: TransformerLens-style names over the hook points, recording only what is asked.

| name | value per recorded position |
|---|---|
| `decoder.blocks.{l}.hook_resid_pre` / `hook_resid_post` | block input / output (B, hidden) |
| `decoder.blocks.{l}.attn.hook_z` | per-head attention output before `o_proj` (B, heads, head_dim) |
| `decoder.blocks.{l}.attn.hook_audio_mass` | per head, the softmax attention mass on the audio positions (B, heads) |
| `decoder.blocks.{l}.attn.hook_pattern` | the attention row over every key (B, heads, S), fp32; opt-in by name |
| `encoder.blocks.{l}.hook_resid_post` | audio-tower block output, every position (1, T, d_model) |
| `encoder.blocks.{l}.attn.hook_pattern` | audio-tower attention pattern (1, heads, T, T) |

`names` takes exact names, glob patterns (`decoder.blocks.*.attn.hook_audio_mass`) or a
callable. `at` says which absolute positions to record (an int, a list, or a `slice`, e.g.
`slice(T, None)` for T and every generated token); by default only T, the last prompt position,
which predicts the first answer token. A forward call that contains none of those positions
records nothing and costs nothing, so a capture kept on over a long generation stays flat.

Audio mass needs only the recorded query rows, `softmax(q_p Kᵀ · scale)` over the keys up to p,
computed next to the fused kernel (which still produces the layer output): O(heads × keys ×
head_dim) per row, never an L×L pattern. Recorded values are handed to `mx.async_eval` as they
are produced, so no lazy graph keeps a decode step's key-cache view alive (which would make MLX
copy the cache on every step).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Callable

import mlx.core as mx
import numpy as np

from .hooks import HookPoint

RESID = "decoder.blocks.{}.hook_resid_post"
RESID_PRE = "decoder.blocks.{}.hook_resid_pre"
Z = "decoder.blocks.{}.attn.hook_z"
AUDIO_MASS = "decoder.blocks.{}.attn.hook_audio_mass"
PATTERN = "decoder.blocks.{}.attn.hook_pattern"
ENC_RESID = "encoder.blocks.{}.hook_resid_post"
ENC_PATTERN = "encoder.blocks.{}.attn.hook_pattern"
QK = "decoder.blocks.{}.attn.hook_qk"
ENC_QK = "encoder.blocks.{}.attn.hook_qk"


def hook_names(model) -> list[str]:
    """Every name a capture accepts."""
    names = []
    for l in range(len(model.layers)):
        names += [RESID_PRE.format(l), RESID.format(l), Z.format(l), AUDIO_MASS.format(l), PATTERN.format(l)]
    for l in range(len(model.audio_tower.layers)):
        names += [ENC_RESID.format(l), ENC_PATTERN.format(l)]
    return names


def _matcher(names) -> Callable[[str], bool]:
    if callable(names):
        return names
    pats = [names] if isinstance(names, str) else list(names)
    return lambda n: any(fnmatch.fnmatchcase(n, p) for p in pats)


def expand_kv(k: mx.array, n_heads: int) -> mx.array:
    """Repeat KV heads to the query heads (GQA), (B, KV, S, D) -> (B, H, S, D)."""
    rep = n_heads // k.shape[1]
    return k if rep == 1 else mx.repeat(k, rep, axis=1)


def attention_rows(q: mx.array, k: mx.array, scale: float, rows: np.ndarray, positions: np.ndarray,
                   mask=None) -> mx.array:
    """Softmax attention rows (B, H, n, S) in float32 for the call's query `rows`, which sit at
    absolute `positions`; each sees the keys up to its own position (causal), and an array `mask`
    (as attention received it, e.g. heads masked off the audio) applies too."""
    sel = mx.array(rows)
    qr = q[:, :, sel] if len(rows) != q.shape[2] else q
    s = (qr.astype(mx.float32) @ expand_kv(k, q.shape[1]).astype(mx.float32).swapaxes(-1, -2)) * scale
    S = k.shape[2]
    if positions.min() < S - 1:  # a row before the last key: hide the future
        s = mx.where(mx.arange(S)[None] <= mx.array(positions)[:, None], s, -mx.inf)
    if isinstance(mask, mx.array):
        m = mask[..., sel, :] if mask.shape[-2] != 1 else mask
        s = mx.where(m, s, -mx.inf) if m.dtype == mx.bool_ else s + m.astype(mx.float32)
    return mx.softmax(s, axis=-1)


class Capture:
    """`with Capture(model, names, audio_positions=prompt.audio_positions, at=T) as cap: ...`

    Values: `cap.values[name]` is a list with one array per recorded forward call, its rows at
    the positions listed in `cap.positions[name]` (same order)."""

    def __init__(self, model, names, *, audio_positions=None, at: int | slice | list | None = None):
        self.model = model
        self.match = _matcher(names)
        self.audio_positions = None if audio_positions is None else np.asarray(audio_positions, np.int64)
        self.at = at
        self.values: dict[str, list[mx.array]] = defaultdict(list)
        self.positions: dict[str, list[np.ndarray]] = defaultdict(list)
        if not callable(names):
            known = hook_names(model)
            unknown = [p for p in ([names] if isinstance(names, str) else names)
                       if not any(fnmatch.fnmatchcase(n, p) for n in known)]
            if unknown:
                raise ValueError(f"no hook matches {unknown}; names look like {RESID.format(0)!r}, "
                                 f"{AUDIO_MASS.format(0)!r}, {ENC_PATTERN.format(0)!r}")
        self._pairs = self._hooks()
        self._ctx = None

    # -- which rows of a call ------------------------------------------------------------------
    def rows(self, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the call, their absolute positions) that this capture records."""
        at = self.at
        if at is None:
            raise ValueError("say which positions to capture (at=T for the last prompt position)")
        if isinstance(at, slice):
            lo = max(offset, at.start or 0)
            hi = offset + length if at.stop is None else min(offset + length, at.stop)
            pos = np.arange(lo, max(lo, hi))
        else:
            pos = np.atleast_1d(np.asarray(at, np.int64))
            pos = pos[(pos >= offset) & (pos < offset + length)]
        return pos - offset, pos

    # -- install / remove ------------------------------------------------------------------------
    def _hooks(self) -> list[tuple[str, Callable]]:
        pairs = []
        for l in range(len(self.model.layers)):
            for name in (RESID_PRE.format(l), RESID.format(l), Z.format(l)):
                if self.match(name):
                    pairs.append((name, self._rows_of(name)))
            want_mass, want_pat = self.match(AUDIO_MASS.format(l)), self.match(PATTERN.format(l))
            if want_mass and self.audio_positions is None:
                raise ValueError("audio mass needs audio_positions (Prompt.audio_positions)")
            if want_mass or want_pat:
                pairs.append((QK.format(l), self._attention(l, want_mass, want_pat)))
        for l in range(len(self.model.audio_tower.layers)):
            if self.match(ENC_RESID.format(l)):
                pairs.append((ENC_RESID.format(l), self._whole(ENC_RESID.format(l))))
            if self.match(ENC_PATTERN.format(l)):
                pairs.append((ENC_QK.format(l), self._enc_pattern(ENC_PATTERN.format(l))))
        return pairs

    def __enter__(self):
        self._ctx = self.model.hooks.using(self._pairs)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._ctx = None

    def _keep(self, name: str, value: mx.array, pos: np.ndarray):
        mx.async_eval(value)  # detach from the graph now (see the module docstring)
        self.values[name].append(value)
        self.positions[name].append(pos)

    # -- recorders ---------------------------------------------------------------------------------
    def _rows_of(self, name):
        def hook(x, point: HookPoint):
            rows, pos = self.rows(point.offset, point.length)
            if rows.size:
                self._keep(name, x[:, mx.array(rows)] if rows.size != x.shape[1] else x, pos)

        return hook

    def _attention(self, layer: int, mass: bool, pattern: bool):
        mass_name, pat_name = AUDIO_MASS.format(layer), PATTERN.format(layer)

        def hook(qk, point: HookPoint):
            rows, pos = self.rows(point.offset, point.length)
            if not rows.size:
                return
            q, k, mask = qk
            p = attention_rows(q, k, point.scale, rows, pos, mask)  # (B, H, n, S)
            if mass:
                audio = self.audio_positions[self.audio_positions < k.shape[2]]
                m = p[..., mx.array(audio)].sum(-1) if audio.size else mx.zeros(p.shape[:3])
                self._keep(mass_name, m.swapaxes(1, 2), pos)  # (B, n, H)
            if pattern:
                self._keep(pat_name, p.swapaxes(1, 2), pos)  # (B, n, H, S)

        return hook

    def _whole(self, name):
        def hook(x, point):
            self._keep(name, x, np.arange(point.length))

        return hook

    def _enc_pattern(self, name):
        def hook(qk, point):
            q, k, _ = qk  # the encoder runs unmasked over a clip's valid frames
            s = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * point.scale
            self._keep(name, mx.softmax(s, axis=-1), np.arange(point.length))

        return hook

    # -- results -----------------------------------------------------------------------------------
    def get(self, name: str, position: int | None = None) -> mx.array:
        """The value of `name` at one absolute position, batch first: (B, ...). Without a position:
        every recorded position stacked on axis 1 (B, n, ...), in recording order."""
        vals, poss = self.values.get(name), self.positions.get(name)
        if not vals:
            raise KeyError(f"nothing was captured for {name!r}")
        if position is None:
            return mx.concatenate(vals, axis=1) if len(vals) > 1 else vals[0]
        for v, p in zip(vals, poss):
            hit = np.flatnonzero(p == position)
            if hit.size:
                return v[:, int(hit[0])]
        raise KeyError(f"{name!r} was not captured at position {position}")

    def recorded(self, name: str) -> np.ndarray:
        """The absolute positions recorded for `name`, in order."""
        return np.concatenate(self.positions[name]) if self.positions.get(name) else np.zeros(0, np.int64)

    def audio_mass(self, position: int, row: int = 0) -> np.ndarray:
        """(n_layers, n_heads) audio mass at one position (e.g. T), for batch row `row`."""
        rows = [np.array(self.get(AUDIO_MASS.format(l), position)[row]) for l in range(len(self.model.layers))
                if self.values.get(AUDIO_MASS.format(l))]
        if not rows:
            raise KeyError(f"no audio mass was captured at position {position}")
        return np.stack(rows)

    def audio_mass_over(self, positions, row: int = 0) -> np.ndarray:
        """(n_positions, n_layers, n_heads) audio mass at each of `positions`."""
        return np.stack([self.audio_mass(int(p), row) for p in positions]) if len(positions) else np.zeros((0,))

    def resid(self, layer: int, position: int, row: int = 0) -> mx.array:
        """Block `layer`'s output at an absolute position (hidden,)."""
        return self.get(RESID.format(layer), position)[row]


def run_with_cache(model, prompt, names, at: int | slice | list | None = None):
    """One forward pass over a prepared prompt, capturing `names` at `at` (default: T).

    Returns `(logits at T (1, vocab), Capture)`: logits for the last position only, as generation
    needs them."""
    T = len(prompt.ids) - 1
    lm = model.language_model
    with Capture(model, names, audio_positions=prompt.audio_positions, at=T if at is None else at) as cap:
        h = lm.model.blocks(prompt.embeddings[None])
        logits = lm.unembed(h[:, -1])
        mx.eval(logits)
    return logits, cap
