"""Capture: TransformerLens-style hook names over the MLX model, computing only what is asked.

| name | value (one entry per forward call) |
|---|---|
| `decoder.blocks.{l}.hook_resid_post` | block output (B, L, hidden) |
| `decoder.blocks.{l}.attn.hook_audio_mass` | per head, the softmax attention mass on the audio positions at the call's last query row (B, heads) |
| `decoder.blocks.{l}.attn.hook_pattern` | full attention pattern (B, heads, L, S), fp32; large, opt-in by name |
| `encoder.blocks.{l}.hook_resid_post` | encoder block output (1, T, d_model) |
| `encoder.blocks.{l}.attn.hook_pattern` | encoder attention pattern (1, heads, T, T) |

`names` takes exact names, glob patterns (`decoder.blocks.*.attn.hook_audio_mass`) or a
callable. Audio mass needs only the last query row, `softmax(q_T Kᵀ · scale)`, computed next to
the fused kernel (which still produces the layer output), so it costs O(heads × keys × head_dim)
per layer and never materialises an L×L pattern. With nothing captured, no hook is installed and
the forward pass is unchanged.

In a generation loop (mlx-lm's `generate_step` feeds the last prompt token alone) each call's
last row is one position; `Capture.positions[name]` records which, so `audio_mass(T)` picks the
last prompt token and `audio_mass_generated()` the answer's tokens.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

RESID = "decoder.blocks.{}.hook_resid_post"
AUDIO_MASS = "decoder.blocks.{}.attn.hook_audio_mass"
PATTERN = "decoder.blocks.{}.attn.hook_pattern"
ENC_RESID = "encoder.blocks.{}.hook_resid_post"
ENC_PATTERN = "encoder.blocks.{}.attn.hook_pattern"


def hook_names(model) -> list[str]:
    n_dec, n_enc = len(model.language_model.model.layers), len(model.audio_tower.layers)
    names = []
    for l in range(n_dec):
        names += [RESID.format(l), AUDIO_MASS.format(l), PATTERN.format(l)]
    for l in range(n_enc):
        names += [ENC_RESID.format(l), ENC_PATTERN.format(l)]
    return names


def _matcher(names) -> Callable[[str], bool]:
    if callable(names):
        return names
    pats = [names] if isinstance(names, str) else list(names)
    return lambda n: any(fnmatch.fnmatchcase(n, p) for p in pats)


def _expand_kv(attn, k):
    """Repeat KV heads to the query heads (GQA), (B, KV, S, D) -> (B, H, S, D)."""
    rep = attn.n_heads // k.shape[1]
    return k if rep == 1 else mx.repeat(k, rep, axis=1)


class Capture:
    """`with Capture(model, names, audio_positions=...) as cap: model(...)`; then `cap.cache`."""

    def __init__(self, model, names, audio_positions: Sequence[int] | np.ndarray | None = None):
        self.model = model
        self.match = _matcher(names)
        self.audio_positions = None if audio_positions is None else np.asarray(audio_positions, np.int64)
        self.cache: dict[str, list[mx.array]] = defaultdict(list)
        self.positions: dict[str, list[int]] = defaultdict(list)
        self._installed: list[tuple[list, Callable]] = []
        unknown = [] if callable(names) else [p for p in ([names] if isinstance(names, str) else names)
                                              if not any(fnmatch.fnmatchcase(n, p) for n in hook_names(model))]
        if unknown:
            raise ValueError(f"no hook matches {unknown}; names look like {RESID.format(0)!r}, "
                             f"{AUDIO_MASS.format(0)!r}, {ENC_PATTERN.format(0)!r}")

    # -- install / remove -------------------------------------------------------------------------
    def __enter__(self):
        for i, layer in enumerate(self.model.language_model.model.layers):
            if self.match(RESID.format(i)):
                self._add(layer.hooks, self._resid(RESID.format(i)))
            if self.match(AUDIO_MASS.format(i)):
                if self.audio_positions is None:
                    raise ValueError("audio mass needs audio_positions (Prompt.audio_positions)")
                self._add(layer.self_attn.probes, self._audio_mass(AUDIO_MASS.format(i)))
            if self.match(PATTERN.format(i)):
                self._add(layer.self_attn.probes, self._pattern(PATTERN.format(i), causal=True))
        for i, layer in enumerate(self.model.audio_tower.layers):
            if self.match(ENC_RESID.format(i)):
                self._add(layer.hooks, self._resid(ENC_RESID.format(i)))
            if self.match(ENC_PATTERN.format(i)):
                self._add(layer.self_attn.probes, self._pattern(ENC_PATTERN.format(i), causal=False))
        return self

    def __exit__(self, *exc):
        for lst, fn in reversed(self._installed):
            lst.remove(fn)
        self._installed.clear()

    def _add(self, lst: list, fn):
        lst.append(fn)
        self._installed.append((lst, fn))

    # -- recorders ---------------------------------------------------------------------------------
    def _resid(self, name):
        def hook(layer, h):
            self.cache[name].append(h)
            return h

        return hook

    def _audio_mass(self, name):
        def probe(attn, q, k, mask):
            S = k.shape[-2]
            scores = (q[:, :, -1:, :].astype(mx.float32) @ _expand_kv(attn, k).astype(mx.float32).swapaxes(-1, -2))
            p = mx.softmax(scores * attn.scale, axis=-1)[:, :, 0]  # (B, H, S): the last row sees every key
            pos = self.audio_positions[self.audio_positions < S]
            self.cache[name].append(p[..., mx.array(pos)].sum(-1) if pos.size else mx.zeros(p.shape[:2]))
            self.positions[name].append(S - 1)

        return probe

    def _pattern(self, name, causal: bool):
        def probe(attn, q, k, mask):
            L, S = q.shape[-2], k.shape[-2]
            scale = getattr(attn, "scale", 1.0)  # the encoder's q arrives pre-scaled
            scores = (q.astype(mx.float32) @ _expand_kv(attn, k).astype(mx.float32).swapaxes(-1, -2)) * scale
            if causal and L > 1:
                qpos = mx.arange(S - L, S)[:, None]
                scores = mx.where(mx.arange(S)[None] <= qpos, scores, -mx.inf)
            self.cache[name].append(mx.softmax(scores, axis=-1))
            self.positions[name].append(S - 1)

        return probe

    # -- results -----------------------------------------------------------------------------------
    def audio_mass(self, position: int) -> np.ndarray:
        """(n_layers, n_heads) audio mass at one query position (e.g. T, the last prompt token)."""
        rows = []
        for i in range(len(self.model.language_model.model.layers)):
            name = AUDIO_MASS.format(i)
            if name in self.cache:
                k = self.positions[name].index(position)
                rows.append(np.array(self.cache[name][k][0]))
        if not rows:
            raise KeyError(f"no audio mass was captured at position {position}")
        return np.stack(rows)

    def audio_mass_generated(self, after: int) -> np.ndarray:
        """(n_steps, n_layers, n_heads) audio mass at each position after `after` (the answer)."""
        name0 = AUDIO_MASS.format(0)
        steps = [p for p in self.positions[name0] if p > after]
        return np.stack([self.audio_mass(p) for p in steps]) if steps else np.zeros((0,))

    def resid(self, layer: int, position: int = -1) -> mx.array:
        """Block `layer`'s output at `position` of the (single) captured call."""
        return self.cache[RESID.format(layer)][0][0, position]


def run_with_cache(model, prompt, names):
    """One forward pass over a prepared prompt, capturing `names`: returns `(logits, Capture)`."""
    with Capture(model, names, prompt.audio_positions) as cap:
        logits = model(mx.array(prompt.ids)[None], input_embeddings=prompt.embeddings[None])
        mx.eval(logits, dict(cap.cache))
    return logits, cap
