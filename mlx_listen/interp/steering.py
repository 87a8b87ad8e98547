"""Audio–silence steering, the mechanism (arXiv 2603.06854; the method note's defaults).

For an input x with audio, the same prompt with equal-length digital silence gives a contrast:
    d(x) = mean over l in L* of ( h_l(audio)[T] - h_l(silence)[T] )      (float32)
where h_l is decoder block l's output, T the last prompt position and L* the layers of the
audio-specialist heads. The model then answers with α·d(x) added to the last decoder block's
output (before the final norm) at T and, by default, at every generated position. No weights
change. Because the edit is on the last block's output, it changes only the logits of the step
where it is applied; the KV cache is untouched, so the unsteered prefill serves every α
(`answers.prefill` / `decode`), and `Steerer.applied` does the same through hooks for a single
answer.

One definition of each part: `edit.direction` forms d(x), `Steerer.delta` the strength α(x)·d(x),
`edit.add` the edit itself (`h + delta` where it applies); an `edit.Row` is an edit as data, which
the batched decode (`answers.decode`), option scoring and the lens apply with `add`.

Cost: the silence pass runs only blocks 0..max(L*) and keeps no cache, and the silence clip's
encoder output depends only on its length, so it is computed once per length. The audio pass
is the answer's own prefill: L* is read and the edit applied in the same forward call.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ..answers import generate
from ..audio import HOP_LENGTH
from ..errors import ListenError
from ..headset import check_heads, listening
from ..hooks import AUDIO_MASS, RESID, Capture
from ..kvcache import views
from ..prompt import Prompt, with_audio
from .edit import add, direction

POSITIONS = ("all", "prompt")
NORMALIZE = ("none", "unit", "relative")
STRENGTHS = ("fixed", "listening")


@dataclass
class SteerConfig:
    """Every option of the method, with our defaults (the README's "The method, as implemented"). Recorded in results."""

    layers: list[int] = field(default_factory=list)  # L*: where the direction is read
    alpha: float = 1.0
    at: str = "all"  # "all": T and every generated position; "prompt": T only (the first answer token)
    normalize: str = "none"  # "unit": d/|d|; "relative": |h_final[T]| d/|d|
    apply_layer: int = -1  # the block whose output is edited (-1: the last, i.e. before the final norm)
    strength: str = "fixed"  # "listening": alpha * clip(listening_mean / L(x), 0, max_scale)
    heads: list[tuple[int, int]] = field(default_factory=list)  # for strength="listening"
    listening_mean: float | None = None
    max_scale: float = 2.0
    vector: np.ndarray | None = field(default=None, repr=False)  # a fixed direction: no silence pass
    match_norm: bool = False  # with `vector` and `layers`: the vector's direction at |d(x)| over `layers`, per input

    @property
    def reads_input(self) -> bool:
        """Whether the edit needs this input's audio-silence contrast over `layers` (a silence pass)."""
        return self.vector is None or self.match_norm

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "vector"}
        d["heads"] = [list(h) for h in self.heads]
        d["direction"] = ("fixed direction at the norm of the per-input audio - silence direction" if self.match_norm
                          else "fixed vector" if self.vector is not None else "per input (audio - silence)")
        return d

    def validate(self, n_layers: int, hidden_size: int | None = None, n_heads: int | None = None):
        """Refuse a configuration this model cannot run (ListenError, one line)."""
        if self.vector is not None and hidden_size is not None and np.shape(self.vector) != (hidden_size,):
            raise ListenError(f"the steering vector has shape {np.shape(self.vector)}; this model's hidden size "
                              f"is {hidden_size}")
        if self.at not in POSITIONS:
            raise ListenError(f"steering positions must be one of {POSITIONS}, not {self.at!r}")
        if self.normalize not in NORMALIZE:
            raise ListenError(f"normalize must be one of {NORMALIZE}, not {self.normalize!r}")
        if self.strength not in STRENGTHS:
            raise ListenError(f"strength must be one of {STRENGTHS}, not {self.strength!r}")
        if not np.isfinite(self.alpha):
            raise ListenError(f"the steering strength must be a finite number, not {self.alpha}")
        if self.vector is None and not self.layers:
            raise ListenError("steering needs read layers (from HEADS.json) or a fixed vector")
        if self.match_norm and (self.vector is None or not self.layers):
            raise ListenError("a norm-matched direction needs a fixed vector and the layers whose |d(x)| it takes")
        if not -n_layers <= self.apply_layer < n_layers:
            raise ListenError(f"steering layer {self.apply_layer} does not exist in this {n_layers}-layer model")
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ListenError(f"layers {bad} do not exist in this {n_layers}-layer model")
        if n_heads is not None and self.heads:
            check_heads(self.heads, n_layers, n_heads)
        if self.reads_input and self.apply_layer % n_layers < max(self.layers):
            raise ListenError(f"the steering layer ({self.apply_layer % n_layers}) comes before the deepest read layer "
                              f"({max(self.layers)}): d(x) is not known there yet")
        if self.strength == "listening" and (not self.heads or not self.listening_mean):
            raise ListenError("strength 'listening' needs heads and their calibration mean listening score")

    def edits_final(self, n_layers: int) -> bool:
        """True when the edit is on the last block's output, so the unsteered prefill can be shared."""
        return self.apply_layer % n_layers == n_layers - 1


class Silence:
    """The silence side of the contrast for one model: equal-length digital silence, whose projected
    audio depends only on its length (cached per length, most recent kept)."""

    def __init__(self, model, cache_size: int = 64, prefix_size: int = 2):
        self.model = model
        self._features: OrderedDict[int, mx.array] = OrderedDict()
        self._cache_size = cache_size
        # KV caches of silent prompts up to the end of their last clip, per (ids, clip lengths):
        # ~5 MB per block per 300 positions at 7B in bf16, so only a few are kept.
        self._prefixes: OrderedDict[tuple, list[KVCache]] = OrderedDict()
        self._prefix_size = prefix_size

    def features(self, clip) -> mx.array:
        """Projected audio tokens of digital silence as long as `clip` (its `AudioFeatures`, or a number of
        valid mel frames), through the model's own front end (same windows, same valid frames)."""
        key = (clip, ()) if isinstance(clip, int) else (clip.n_frames, tuple(clip.windows))
        if key not in self._features:
            front = self.model.front_end
            f = front.features(np.zeros(clip * HOP_LENGTH, np.float32), "silence") if isinstance(clip, int) \
                else front.silence(clip)
            if f.n_frames != key[0] or (key[1] and tuple(f.windows) != key[1]):
                raise ValueError(f"silence of {key} frames came out with {f.n_frames}")  # a bug, not input
            feats = self.model.encode_audio(f)
            mx.eval(feats)
            self._features[key] = feats
            if len(self._features) > self._cache_size:
                self._features.popitem(last=False)
        self._features.move_to_end(key)
        return self._features[key]

    def prompt(self, prompt: Prompt) -> Prompt:
        """The same prompt with equal-length digital silence in place of each clip."""
        return with_audio(self.model, prompt, [self.features(c) for c in prompt.clips])

    def residuals(self, prompt: Prompt, layers: Sequence[int]) -> dict[int, mx.array]:
        """h_l(silence)[T] for `layers`, through blocks 0..max(layers) only.

        The silent prompt up to the end of its last clip does not depend on the question, so its
        KV cache is kept and a later item with clips of the same lengths runs only its own text
        (MMAU: ~45 of ~350 positions for a 10 s clip). Rows before T go into the cache alone (the
        deepest block's output there is never needed); T goes through the capture."""
        sil = self.prompt(prompt)
        start = min(int(sil.audio_positions.max()) + 1, sil.last) if sil.n_audio_tokens else 0
        with self.model.hooks.suspended():
            cache = self._prefix(sil, start, max(layers) + 1)
        return read_residuals(self.model, sil, layers, cache=cache, start=start)

    def _prefix(self, sil: Prompt, end: int, depth: int) -> list[KVCache]:
        """A fresh KV cache of blocks 0..depth-1 holding the silent prompt's positions [0, end)."""
        if end == 0:
            return [KVCache() for _ in range(depth)]
        key = (tuple(sil.ids[:end]), tuple(c.n_frames for c in sil.clips))
        stored = self._prefixes.get(key)
        if stored is None or len(stored) < depth:  # the deepest one computed serves any shallower read
            stored = [KVCache() for _ in range(depth)]
            self.model.blocks(sil.embeddings[None, :end], cache=stored, n_layers=depth)
            mx.eval([c.state for c in stored])
            self._prefixes[key] = stored
        self._prefixes.move_to_end(key)
        while len(self._prefixes) > self._prefix_size:  # the least recently used go first
            self._prefixes.popitem(last=False)
        return views(stored, depth)


class Steerer:
    """Steered answers for one model and one configuration."""

    def __init__(self, model, config: SteerConfig, silence: Silence | None = None):
        config.validate(model.n_layers, model.hidden_size, model.n_heads)
        self.model, self.config = model, config
        self.silence = silence or Silence(model)

    def silence_residuals(self, prompt: Prompt) -> dict[int, mx.array]:
        return self.silence.residuals(prompt, self.config.layers)

    # -- the direction ---------------------------------------------------------------------------
    def delta(self, resid: dict[int, mx.array], silence: dict[int, mx.array] | None, final: mx.array,
              audio_mass=None) -> mx.array:
        """α(x)·d(x) (hidden,) float32 from what the answer's pass read at T: the audio run's residual
        at L* (`resid`), the silence's (`silence`), the last block's output (`final`) and, for
        strength "listening", the heads' audio mass (an array indexable as [l, h])."""
        cfg = self.config
        if cfg.vector is not None:
            d = mx.array(np.asarray(cfg.vector, np.float32))
            if cfg.match_norm:  # the fixed direction, as long as this input's own audio-silence direction
                own = direction(resid, silence, cfg.layers)
                d = d / mx.maximum(mx.linalg.norm(d), 1e-30) * mx.linalg.norm(own)
        else:
            d = direction(resid, silence, cfg.layers)
        if cfg.normalize != "none":
            d = d / mx.maximum(mx.linalg.norm(d), 1e-12)
            if cfg.normalize == "relative":
                d = d * mx.linalg.norm(final.astype(mx.float32))
        alpha = cfg.alpha
        if cfg.strength == "listening":
            m = mx.array(audio_mass) if isinstance(audio_mass, np.ndarray) else audio_mass
            L = listening(m, cfg.heads)
            alpha = alpha * mx.clip(cfg.listening_mean / mx.maximum(L, 1e-12), 0.0, cfg.max_scale)
        return alpha * d

    def direction(self, prompt: Prompt) -> mx.array:
        """d(x) alone (float32, unscaled): blocks 0..max(L*) of the audio prompt and of the silence (a
        norm-matched vector: the vector's direction at that norm)."""
        cfg = self.config
        if not cfg.reads_input:
            return mx.array(np.asarray(cfg.vector, np.float32))
        audio = read_residuals(self.model, prompt, cfg.layers)
        d = direction(audio, self.silence_residuals(prompt), cfg.layers)
        if cfg.match_norm:
            v = mx.array(np.asarray(cfg.vector, np.float32))
            d = v / mx.maximum(mx.linalg.norm(v), 1e-30) * mx.linalg.norm(d)
        mx.eval(d)
        return d

    # -- one steered answer through hooks ---------------------------------------------------------
    @contextmanager
    def applied(self, prompt: Prompt):
        """Inside, every forward call of the model is steered for this prompt, at its absolute
        positions: the call holding T reads L* and forms α·d(x); it is added at T and, with
        `at="all"`, at every later position. Generation-ready (mlx-lm's loop needs nothing else)."""
        cfg, model = self.config, self.model
        n_layers = model.n_layers
        T = prompt.last
        silence = self.silence_residuals(prompt) if cfg.reads_input else None
        layers = sorted(set(cfg.layers)) if cfg.reads_input else []
        names = [RESID.format(l) for l in layers]
        if cfg.strength == "listening":
            names += [AUDIO_MASS.format(l) for l in sorted({l for l, _ in cfg.heads})]
        read = Capture(model, names, audio_positions=prompt.audio_positions, at=T)
        state: dict[str, mx.array] = {}

        def steer(h, point):
            L, pos = h.shape[1], point.offset
            if pos + L <= T:  # entirely before T
                return None
            if "d" not in state:
                mass = _MassAtT(read, T) if cfg.strength == "listening" else None
                resid = {l: read.resid(l, T).astype(mx.float32) for l in layers}
                state["d"] = self.delta(resid, silence, h[0, T - pos], mass)
            rows = mx.arange(pos, pos + L)
            on = (rows == T) if cfg.at == "prompt" else (rows >= T)
            return add(h, state["d"], on[:, None])

        with read, model.hooks.using([(RESID.format(cfg.apply_layer % n_layers), steer)]):
            yield state

    def generate(self, processor, prompt: Prompt, **kw):
        """`answers.generate` with the steering applied (alpha 0 adds exact zeros: unchanged output)."""
        with self.applied(prompt):
            return generate(self.model, processor, prompt, **kw)


class _MassAtT:
    """`[l, h]` access to the audio mass a capture holds at T (lazy arrays of the current pass)."""

    def __init__(self, cap: Capture, T: int):
        self.cap, self.T = cap, T

    def __getitem__(self, lh):
        l, h = lh
        return self.cap.get(AUDIO_MASS.format(l), self.T)[0, h]


def read_residuals(model, prompt: Prompt, layers: Sequence[int], cache: list | None = None,
                   start: int = 0) -> dict[int, mx.array]:
    """h_l[T] (float32) for `layers`, through blocks 0..max(layers) only, every other hook held off.

    Rows [start, T) go into the KV cache alone (the deepest block's output there is never needed),
    then T through the capture; `cache` holds positions [0, start) already (`Silence`'s prefix)."""
    layers = sorted(set(layers))
    depth, T = layers[-1] + 1, prompt.last
    blocks = model.blocks
    cache = cache if cache is not None else [KVCache() for _ in range(depth)]
    with model.hooks.suspended():
        if start < T:
            blocks(prompt.embeddings[None, start:T], cache=cache, n_layers=depth)
            mx.eval([c.state for c in cache])
        with Capture(model, [RESID.format(l) for l in layers], at=T) as cap:
            blocks(prompt.embeddings[None, T:], cache=cache, n_layers=depth)
            out = {l: cap.resid(l, T).astype(mx.float32) for l in layers}
            mx.eval(out)
    return out
