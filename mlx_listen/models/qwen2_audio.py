"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`; Qwen2-Audio-7B-Instruct, R1-AQA) in MLX:
the Whisper-style audio tower, a one-Linear projector and a Qwen2 decoder.

The module tree mirrors the hub checkpoint (`audio_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`), so loading is `sanitize` (two conv
transposes and prefix renames for transformers-5 in-memory names) and a strict load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..hooks import Hooks
from .base import AudioLM
from .qwen2 import LanguageModel, TextConfig
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
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        text = TextConfig.from_dict(d.get("text_config") or {})
        # mlx-lm's load_config merges generation_config's eos ids into the top level.
        eos = d.get("eos_token_id", text.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            model_type=d["model_type"],
            audio_config=AudioConfig.from_dict(d.get("audio_config") or {}),
            text_config=text,
            audio_token_index=d.get("audio_token_index", d.get("audio_token_id", 151646)),
            eos_token_id=eos,
            quantization=d.get("quantization"),
            raw=d,
        )

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

    def encode(self, mel: mx.array, n_frames: int) -> tuple[mx.array, mx.array]:
        """One clip's padded log-mel (128, 3000) -> (tower output (n_tok, d_model), tokens (n_tok, hidden))."""
        enc = self.audio_tower(mel, n_frames)
        return enc, self.multi_modal_projector(enc)

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            for old, new in _IN_MEMORY_PREFIXES:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            if "rotary_emb.inv_freq" in k:
                continue
            # torch Conv1d is (out, in, k); MLX is (out, k, in). Transpose only what is still in
            # torch layout, so an already converted folder loads unchanged.
            if k.startswith("audio_tower.conv") and k.endswith(".weight") and v.ndim == 3:
                if v.shape[-1] == 3 and v.shape[1] != 3:
                    v = v.transpose(0, 2, 1)
            out[k] = v
        if self.config.text_config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out
