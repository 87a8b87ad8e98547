"""Audio–silence steering (arXiv 2603.06854; shared/design/method.md §3.3–3.4, §4.2).

For an input x with audio, the same prompt with equal-length digital silence gives a contrast:
    d(x) = mean over l in L* of ( h_l(audio)[T] - h_l(silence)[T] )      (float32)
where h_l is decoder block l's output, T the last prompt position and L* the layers of the
audio-specialist heads. The model then answers with α·d(x) added to the last decoder block's
output (before the final norm) at T and, by default, at every generated position. No weights
change. Because the edit is on the last block's output, it changes only the logits of the step
where it is applied; the KV cache is untouched.

Cost: the silence pass stops after layer max(L*) and keeps no cache, and the silence clip's
encoder output depends only on its length, so it is computed once per length. The audio pass
is the answer's own prefill: L* is read and the edit applied in the same forward call.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .errors import ListenError

POSITIONS = ("all", "prompt")
NORMALIZE = ("none", "unit", "relative")


@dataclass
class SteerConfig:
    """Every option of the method, with our defaults (method.md §4.2). Recorded in results."""

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

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "vector"}
        d["heads"] = [list(h) for h in self.heads]
        d["direction"] = "fixed vector" if self.vector is not None else "per input (audio - silence)"
        return d

    def validate(self, n_layers: int, hidden_size: int | None = None):
        if self.vector is not None and hidden_size is not None and np.shape(self.vector) != (hidden_size,):
            raise ListenError(f"the steering vector has shape {np.shape(self.vector)}; this model's hidden size "
                              f"is {hidden_size}")
        if self.at not in POSITIONS:
            raise ListenError(f"--steer-at must be one of {POSITIONS}")
        if self.normalize not in NORMALIZE:
            raise ListenError(f"normalize must be one of {NORMALIZE}")
        if self.vector is None and not self.layers:
            raise ListenError("steering needs read layers (from HEADS.json) or a fixed vector")
        if not -n_layers <= self.apply_layer < n_layers:
            raise ListenError(f"steering layer {self.apply_layer} does not exist in this {n_layers}-layer model")
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ListenError(f"layers {bad} do not exist in this {n_layers}-layer model")
        if self.vector is None and self.apply_layer % n_layers < max(self.layers):
            raise ListenError(f"the steering layer ({self.apply_layer % n_layers}) comes before the deepest read layer "
                              f"({max(self.layers)}): d(x) is not known there yet")
        if self.strength == "listening" and (not self.heads or not self.listening_mean):
            raise ListenError("strength 'listening' needs heads and their calibration mean listening score")


class Steerer:
    """Steered answers for one model; caches the silence encoding per clip length."""

    def __init__(self, model, config: SteerConfig, cache_size: int = 64):
        config.validate(len(model.layers), model.config.text_config.hidden_size)
        self.model, self.config = model, config
        self._silence: OrderedDict[int, mx.array] = OrderedDict()
        self._cache_size = cache_size

    # -- the silence side ----------------------------------------------------------------------
    def silence_features(self, n_frames: int) -> mx.array:
        """Projected audio tokens of digital silence with `n_frames` valid mel frames (cached)."""
        from .audio import HOP_LENGTH, audio_features

        if n_frames not in self._silence:
            f = audio_features(np.zeros(n_frames * HOP_LENGTH, np.float32), "silence")
            assert f.n_frames == n_frames
            feats = self.model.encode_audio(f.mel, n_frames)
            mx.eval(feats)
            self._silence[n_frames] = feats
            if len(self._silence) > self._cache_size:
                self._silence.popitem(last=False)
        self._silence.move_to_end(n_frames)
        return self._silence[n_frames]

    def silence_residuals(self, prompt) -> dict[int, mx.array]:
        """h_l(silence)[T] for l in L*: the same prompt with silence, run only to layer max(L*), whose
        output is computed for the last position alone (its keys still cover every position)."""
        from mlx_lm.models.base import create_attention_mask

        key = ("silence", id(self.model), tuple(sorted(self.config.layers)))
        if key in prompt.cache:  # the same prompt answered again (another alpha, another condition)
            return prompt.cache[key]
        emb = self.model.embed(prompt.ids, [self.silence_features(c.n_frames) for c in prompt.clips])[None]
        layers = self.model.language_model.model.layers
        want, out, deepest = set(self.config.layers), {}, max(self.config.layers)
        mask = create_attention_mask(emb, None)
        h = emb
        for i in range(deepest + 1):
            h = layers[i](h, mask, None, last_only=i == deepest)
            if i in want:
                out[i] = h[0, -1].astype(mx.float32)
        mx.eval(out)
        prompt.cache[key] = out
        return out

    # -- the intervention ------------------------------------------------------------------------
    @contextmanager
    def applied(self, prompt):
        """Inside, every forward call of the model is steered for this prompt (generation-ready)."""
        from .capture import AUDIO_MASS, Capture

        cfg, model = self.config, self.model
        layers = model.language_model.model.layers
        T = len(prompt.ids) - 1
        target = layers[cfg.apply_layer]
        state = {"pos": 0, "d": None}
        silence = self.silence_residuals(prompt) if cfg.vector is None else None
        read: dict[int, mx.array] = {}

        def reader(layer, h):  # h_l(audio)[T] for l in L*, during the answer's own prefill
            pos = state["pos"]
            if pos <= T < pos + h.shape[1]:
                read[layer.index] = h[0, T - pos].astype(mx.float32)
            return h

        cap = Capture(model, AUDIO_MASS.format("*"), prompt.audio_positions) if cfg.strength == "listening" else None

        def steer(layer, h):
            pos, L = state["pos"], h.shape[1]
            state["pos"] = pos + L
            if not pos <= T < pos + L and not (cfg.at == "all" and pos > T):
                return h
            if state["d"] is None:
                state["d"] = self._direction(read, silence, h[0, T - pos], cap, T)
            rows = mx.arange(pos, pos + L)
            on = (rows == T) if cfg.at == "prompt" else (rows >= T)
            return h + mx.where(on[:, None], state["d"], 0.0).astype(h.dtype)[None]

        hooks = [] if cfg.vector is not None else [(layers[l].hooks, reader) for l in cfg.layers]
        hooks.append((target.hooks, steer))
        for lst, fn in hooks:
            lst.append(fn)
        try:
            if cap is not None:
                with cap:
                    yield state
            else:
                yield state
        finally:
            for lst, fn in hooks:
                lst.remove(fn)

    def _direction(self, read, silence, h_final_T, cap, T) -> mx.array:
        """α(x)·d(x), fixed for the rest of this answer."""
        cfg = self.config
        if cfg.vector is not None:
            d = mx.array(np.asarray(cfg.vector, np.float32))
        else:
            d = mx.stack([read[l] - silence[l] for l in cfg.layers]).mean(0)
        if cfg.normalize != "none":
            d = d / mx.maximum(mx.linalg.norm(d), 1e-12)
            if cfg.normalize == "relative":
                d = d * mx.linalg.norm(h_final_T.astype(mx.float32))
        alpha = cfg.alpha
        if cfg.strength == "listening":
            mass = [cap.cache[f"decoder.blocks.{l}.attn.hook_audio_mass"][-1][0, h] for l, h in cfg.heads]
            listening = mx.stack(mass).mean()
            alpha = alpha * mx.clip(cfg.listening_mean / mx.maximum(listening, 1e-12), 0.0, cfg.max_scale)
        return alpha * d

    def direction(self, prompt) -> mx.array:
        """d(x) alone (float32, unscaled): one plain prefill of the audio prompt plus the silence pass."""
        from .capture import RESID, run_with_cache

        _, cap = run_with_cache(self.model, prompt, [RESID.format(l) for l in self.config.layers])
        silence = self.silence_residuals(prompt)
        d = mx.stack([cap.resid(l).astype(mx.float32) - silence[l] for l in self.config.layers]).mean(0)
        mx.eval(d)
        return d

    def generate(self, processor, prompt, **kw):
        """`generate.generate` with the steering applied (alpha 0 adds exact zeros: unchanged output)."""
        from .generate import generate

        with self.applied(prompt):
            return generate(self.model, processor, prompt, **kw)


def config_from(heads_path=None, vector_path=None, **kw) -> SteerConfig:
    """The CLI's steering options: HEADS.json (per-input direction over its heads' layers), or a
    fixed vector file (then HEADS.json, if also given, only serves strength="listening")."""
    if not heads_path and not vector_path:
        raise ListenError("steering needs --steer HEADS.json or --vector FILE")
    cfg = from_heads(heads_path, **kw) if heads_path else SteerConfig(**kw)
    if vector_path:  # the file says which block it was made for
        cfg.vector, cfg.apply_layer, _ = load_vector(vector_path)
        cfg.layers = []
    return cfg


def from_heads(path, alpha: float = 1.0, at: str = "all", **kw) -> SteerConfig:
    """A steering config from HEADS.json: L* = the distinct layers of the selected heads."""
    from .heads import HeadSet

    hs = HeadSet.load(path)
    return SteerConfig(layers=hs.layers, alpha=alpha, at=at, heads=hs.heads,
                       listening_mean=(hs.meta or {}).get("listening_mean"), **kw)


# -- fixed vectors on disk (repeng / llama.cpp naming: tensor `direction.{layer}`) --------------

def save_vector(path, vector: np.ndarray, *, apply_layer: int, hidden_size: int, meta: dict):
    from . import __version__

    md = {"model_type": "qwen2_audio", "hidden_size": str(hidden_size), "apply_at": "pre_final_norm",
          "mlx_listen_version": __version__}
    md.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    mx.save_safetensors(str(path), {f"direction.{apply_layer}": mx.array(np.asarray(vector, np.float32))},
                        metadata=md)


def load_vector(path, hidden_size: int | None = None, n_layers: int | None = None) -> tuple[np.ndarray, int, dict]:
    """(vector, layer it applies to, metadata); refuses a vector made for another width."""
    try:
        tensors, md = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ListenError(f"{path} is not a steering vector file ({e})") from None
    keys = [k for k in tensors if k.startswith("direction.")]
    if len(keys) != 1:
        raise ListenError(f"{path}: expected one tensor named direction.<layer>, found {sorted(tensors)}")
    layer = int(keys[0].split(".")[1])
    vec = np.array(tensors[keys[0]].astype(mx.float32))
    if hidden_size is not None and (vec.shape != (hidden_size,) or md.get("hidden_size") not in (None, str(hidden_size))):
        raise ListenError(f"{path} was made for hidden size {md.get('hidden_size', vec.shape)}; "
                          f"this model's is {hidden_size}")
    if n_layers is not None and not -n_layers <= layer < n_layers:
        raise ListenError(f"{path} applies at layer {layer}; this model has {n_layers}")
    return vec, layer, md
