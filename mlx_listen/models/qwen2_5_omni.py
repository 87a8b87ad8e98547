"""Qwen2.5-Omni's thinker (`Qwen2_5OmniThinkerForConditionalGeneration`; Qwen/Qwen2.5-Omni-7B, -3B) in
MLX, for audio and text: the chunked Whisper-style audio encoder and the Qwen2 decoder.

- Front end (`frontend.Whole`): one spectrogram of the clip zero-padded to the feature extractor's
  `chunk_length` (300 s on the hub), one max; only valid frames reach the encoder.
- Encoder: the valid frames in chunks of 2·`n_window` frames (the last shorter), each convolved with
  zero padding, sinusoidal positions restarting at 0 in every chunk, attention within a chunk only;
  then the pair average over the whole clip (an odd last frame dropped), `ln_post` and `proj` (the
  projector). The chunks run as one batch, the last one padded with its padded keys masked.
- Decoder: Qwen2 with multimodal RoPE, which for audio-and-text prompts (the three position axes
  equal, 0 … L-1) is plain RoPE with `rope_theta`; `mrope_section` is checked (it sums to head_dim/2).
- Config: `model_type` "qwen2_5_omni" with a `thinker_config` (audio, text and token ids there), in
  the hub's older style (`rope_scaling.mrope_section`, `rope_theta`) or transformers 5's.
- Weights: the hub's `thinker.audio_tower.*`, `thinker.model.*` (the text model itself) and
  `thinker.lm_head.*`; `thinker.visual.*`, `talker.*`, `token2wav.*` and the unused
  `thinker.audio_tower.audio_bos_eos_token` are skipped (`dropped` says how much).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..hooks import Hooks
from .base import BLOCK, AudioLM, fingerprint_blocks
from .qwen2 import LanguageModel, TextConfig, check_model_type, eos_ids, from_dict
from .whisper import EncoderLayer

MODEL_TYPE = "qwen2_5_omni"
UNUSED = ("talker.", "token2wav.", "thinker.visual.", "thinker.audio_tower.audio_bos_eos_token.",
          "visual.", "audio_tower.audio_bos_eos_token.")
RENAMES = [
    ("thinker.audio_tower.", "audio_tower."),
    ("thinker.model.", "language_model.model."),
    ("thinker.lm_head.", "language_model.lm_head."),
    # a thinker saved on its own by transformers 5 (in-memory names)
    ("model.audio_tower.", "audio_tower."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]
# Qwen2_5OmniTextConfig's defaults (not Qwen2Config's): a sparse config must read as transformers reads it.
TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                     rms_norm_eps=1e-6)
DEFAULT_THETA = 1000000.0


@dataclass
class AudioConfig:
    """`thinker_config.audio_config` (Qwen2_5OmniAudioEncoderConfig); its defaults."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        return from_dict(cls, d)


@dataclass
class ModelConfig:
    model_type: str = MODEL_TYPE
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    eos_token_id: list[int] = field(default_factory=list)
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        check_model_type(d, MODEL_TYPE)
        th = d.get("thinker_config")
        if not isinstance(th, dict) or not isinstance(th.get("text_config"), dict) \
                or not isinstance(th.get("audio_config"), dict):
            raise ValueError("the config has no thinker_config with audio_config and text_config: a Qwen2.5-Omni "
                             "checkpoint without its thinker (mlx-listen runs the thinker)")
        t = dict(th["text_config"])
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        # the thinker's own flag decides tying (transformers reads the thinker config's, default False)
        theta = t.get("rope_theta", rope.get("rope_theta", DEFAULT_THETA))
        text = TextConfig.from_dict({**TEXT_DEFAULTS, **t, "rope_theta": theta,
                                     "tie_word_embeddings": th.get("tie_word_embeddings", False)})
        if section is not None and sum(section) != text.head_dim // 2:
            raise ValueError(f"mrope_section {section} does not sum to head_dim / 2 = {text.head_dim // 2}")
        eos = eos_ids(d, text)
        return cls(model_type=MODEL_TYPE, audio_config=AudioConfig.from_dict(th["audio_config"]), text_config=text,
                   audio_token_index=th.get("audio_token_index", th.get("audio_token_id", 151646)),
                   eos_token_id=eos, quantization=d.get("quantization"), raw=d)

    def identity(self) -> dict:
        t, a = self.text_config, self.audio_config
        return {
            "family": MODEL_TYPE,
            "text": [t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                     t.num_key_value_heads, t.rms_norm_eps, float(t.rope_theta), t.tie_word_embeddings],
            "audio": [a.num_mel_bins, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim, a.d_model,
                      a.max_source_positions, a.n_window, a.output_dim],
            "audio_token_index": self.audio_token_index,
        }

    def fingerprint_slices(self) -> dict:
        return fingerprint_blocks(self.text_config, self.audio_config.encoder_layers,
                                  {"audio_tower.proj.weight": BLOCK})

    @property
    def dtype_name(self) -> str:
        d = self.raw
        return d.get("dtype") or d.get("torch_dtype") or d.get("thinker_config", {}).get("torch_dtype", "float32")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """`SinusoidsPositionEmbedding`: float32, sin then cos, as transformers computes it."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(np.float32(-inc) * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class AudioEncoder(nn.Module):
    """`thinker.audio_tower`: valid log-mel frames (128, n) -> (after `ln_post` (n_tok, d), after `proj`)."""

    def __init__(self, cfg: AudioConfig, hooks: Hooks):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.layers = [EncoderLayer(cfg, i, hooks, prescale=False) for i in range(cfg.encoder_layers)]
        self.ln_post = nn.LayerNorm(d, eps=1e-5)
        self.proj = nn.Linear(d, cfg.output_dim)
        self._positions = mx.array(sinusoids(cfg.max_source_positions, d))  # a constant, not a parameter

    def chunks(self, n_frames: int) -> list[int]:
        size = 2 * self.config.n_window
        return [min(size, n_frames - s) for s in range(0, n_frames, size)]

    def __call__(self, mel: mx.array) -> tuple[mx.array, mx.array]:
        n = mel.shape[-1]
        lengths = self.chunks(n)
        size = max(lengths)
        x = mel.T.astype(self.conv1.weight.dtype)  # (n, mels)
        pad = len(lengths) * size - n
        x = mx.pad(x, [(0, pad), (0, 0)]) if pad else x
        x = x.reshape(len(lengths), size, -1)  # (chunks, frames, mels): MLX convs are NLC
        frame_ok = mx.arange(size)[None, :] < mx.array(lengths)[:, None]
        x = nn.gelu(self.conv1(x)) * frame_ok[..., None].astype(x.dtype)  # HF zeroes the padded frames
        x = nn.gelu(self.conv2(x))
        x = x + self._positions[: x.shape[1]].astype(x.dtype)  # positions restart in every chunk
        after = [(c - 1) // 2 + 1 for c in lengths]
        mask = None
        if after[-1] < x.shape[1]:  # the last chunk is short: its padded keys are hidden
            keep = mx.arange(x.shape[1])[None, :] < mx.array(after)[:, None]
            mask = mx.where(keep, 0.0, -mx.inf).astype(x.dtype)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        x = mx.concatenate([x[i, :a] for i, a in enumerate(after)], axis=0) if len(after) > 1 else x[0, :after[0]]
        n_tok = (x.shape[0] - 2) // 2 + 1
        x = x[: 2 * n_tok].reshape(n_tok, 2, -1).mean(axis=1)  # pairs over the whole clip
        enc = self.ln_post(x)
        return enc, self.proj(enc)


class Model(AudioLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = self.args = config
        self.model_type = config.model_type
        self.hooks = Hooks()
        self.audio_tower = AudioEncoder(config.audio_config, self.hooks)
        self.language_model = LanguageModel(config.text_config, self.hooks)

    def encode_features(self, features) -> tuple[mx.array, mx.array]:
        """The clip's valid frames (128, n) -> (after `ln_post` (n_tok, d_model), after `proj` (n_tok, hidden))."""
        return self.audio_tower(features.valid())

    def sanitize(self, weights: dict) -> dict:
        out = self.remap(weights, RENAMES, UNUSED)
        if not any(k.startswith("language_model.") for k in out):
            gone = sum(n for n, _ in self.dropped.values())
            raise ValueError(f"the checkpoint holds no thinker weights (thinker.model.*, thinker.lm_head.*): "
                             f"{gone} tensors of other parts (talker, token2wav, visual) and "
                             f"{len(out)} others; mlx-listen runs the thinker")
        return out
