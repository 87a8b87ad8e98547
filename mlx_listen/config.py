"""Qwen2-Audio configuration, read from either config format the hub and transformers write.

The hub's `config.json` (transformers 4.x era) lists only a few `text_config` fields; the rest
are transformers' `Qwen2Config` defaults, which differ from mlx-lm's qwen2 defaults (untied
head, RoPE theta 10000, 32 KV heads). A wrong default silently breaks the real model, so every
default below is the transformers one, spelled out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"


def _from_dict(cls, d: dict):
    names = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class AudioConfig:
    """`audio_config` (Qwen2AudioEncoderConfig); defaults are Qwen2AudioConfig's sub-config ones."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        return _from_dict(cls, d)


@dataclass
class TextConfig:
    """`text_config` (Qwen2Config); defaults are transformers' Qwen2Config defaults."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        d = dict(d)
        # transformers 5.x nests theta in rope_parameters; 4.x writes rope_theta at the top.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"unsupported RoPE type {rope_type!r} in text_config")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (Qwen2-Audio has it off)")
        return _from_dict(cls, d)


@dataclass
class ModelConfig:
    """The whole `Qwen2AudioForConditionalGeneration` config (mlx-lm's `ModelArgs` contract)."""

    model_type: str = "qwen2_audio"
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    eos_token_id: list[int] = field(default_factory=list)
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("model_type") != "qwen2_audio":
            raise ValueError(
                f"model_type is {d.get('model_type')!r}, expected 'qwen2_audio' "
                "(Qwen2-Audio-7B-Instruct, R1-AQA and their fine-tunes)"
            )
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
        return d.get("dtype") or d.get("torch_dtype") or self.raw.get("text_config", {}).get(
            "torch_dtype", "float32"
        )
