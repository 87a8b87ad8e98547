"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`; Qwen2-Audio-7B-Instruct, R1-AQA) in MLX:
the Whisper-style audio tower, a one-Linear projector and a Qwen2 decoder.

The module tree mirrors the hub checkpoint (`audio_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`), so loading is `sanitize` (two conv
transposes and prefix renames for transformers-5 in-memory names) and a strict load.

Folders others made load too. mlx-audio's (`mlx-community/Qwen2-Audio-7B-Instruct-4bit`) keeps the
hub's key names and config, with the convs already in MLX's layout, quantised the mlx-lm way, but
without `audio_tower.embed_positions.weight`: mlx-audio recomputes Whisper's sinusoids instead of
storing the table (the hub's table is those sinusoids, Whisper-large-v3's). A folder in MLX's conv
layout that lacks the table gets the sinusoids back here, in the tower's dtype. mlx-lm-style
quantised folders (any mode, per-path entries) are read by mlx-lm's loader as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..hooks import Hooks
from .base import BLOCK, AudioLM, fingerprint_blocks
from .qwen2 import LanguageModel, TextConfig, check_model_type, eos_ids
from .qwen2_5_omni import sinusoids
from .whisper import AudioConfig, AudioEncoder

MODEL_TYPE = "qwen2_audio"

# transformers 5 renames the module tree in memory; `save_pretrained` and the hub use the right.
_IN_MEMORY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]


@dataclass
class ModelConfig:
    """The whole `Qwen2AudioForConditionalGeneration` config (mlx-lm's `ModelArgs` contract)."""

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
        text = TextConfig.from_dict(d.get("text_config") or {})
        eos = eos_ids(d, text)
        return cls(
            model_type=d["model_type"],
            audio_config=AudioConfig.from_dict(d.get("audio_config") or {}),
            text_config=text,
            audio_token_index=d.get("audio_token_index", d.get("audio_token_id", 151646)),
            eos_token_id=eos,
            quantization=d.get("quantization"),
            raw=d,
        )

    def identity(self) -> dict:
        """The architecture-defining fields `bundle.config_hash` hashes (format- and dtype-insensitive)."""
        t, a = self.text_config, self.audio_config
        return {
            "text": [t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                     t.num_key_value_heads, t.rms_norm_eps, float(t.rope_theta), t.tie_word_embeddings],
            "audio": [a.num_mel_bins, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim, a.d_model,
                      a.max_source_positions],
            "audio_token_index": self.audio_token_index,
        }

    def fingerprint_slices(self) -> dict:
        """Tensors (module-tree names, = hub names here) and blocks a bundle or head set fingerprints."""
        return fingerprint_blocks(self.text_config, self.audio_config.encoder_layers,
                                  {"multi_modal_projector.linear.weight": BLOCK})

    @property
    def dtype_name(self) -> str:
        """The checkpoint's dtype: `dtype` (5.x) or `torch_dtype` (4.x)."""
        d = self.raw
        return d.get("dtype") or d.get("torch_dtype") or d.get("text_config", {}).get("torch_dtype", "float32")


class Projector(nn.Module):
    """`multi_modal_projector`: one Linear from the encoder width to the LLM width."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class Model(AudioLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = self.args = config
        self.model_type = config.model_type
        self.hooks = Hooks()  # every hook point (hooks.py); a plain attribute, outside the MLX tree
        self.audio_tower = AudioEncoder(config.audio_config, self.hooks)
        self.multi_modal_projector = Projector(config.audio_config.d_model, config.text_config.hidden_size)
        self.language_model = LanguageModel(config.text_config, self.hooks)

    def encode_features(self, features) -> tuple[mx.array, mx.array]:
        """One clip's padded log-mel (128, 3000) -> (tower output (n_tok, d_model), tokens (n_tok, hidden))."""
        enc = self.audio_tower(features.mel, features.n_frames)
        return enc, self.multi_modal_projector(enc)

    def sanitize(self, weights: dict) -> dict:
        out = self.remap(weights, _IN_MEMORY_PREFIXES)
        conv = weights.get("audio_tower.conv1.weight")
        pos = "audio_tower.embed_positions.weight"
        if pos not in out and conv is not None and conv.ndim == 3 and conv.shape[1] == 3 != conv.shape[-1]:
            a = self.config.audio_config  # an MLX folder without the table: mlx-audio's layout
            out[pos] = mx.array(sinusoids(a.max_source_positions, a.d_model)).astype(conv.dtype)
        return out
