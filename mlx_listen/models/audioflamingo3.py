"""Audio Flamingo 3 (`AudioFlamingo3ForConditionalGeneration`; nvidia/audio-flamingo-3-hf) in MLX:
transformers' Qwen2-Audio encoder with learned positions (the same tower as Qwen2-Audio, `whisper.py`),
a two-layer GELU projector and a Qwen2 decoder.

- Front end (`frontend.Windows`): 30 s windows, each zero-padded to 30 s and transformed alone, at
  most 20 (600 s). The encoder runs on each window alone (windows never attend to each other) over
  its valid frames only: exact (the conv at the last valid frame still reads the window's padded
  frames, which the log-mel keeps), with no 30 s of attention for a 3 s window. Tokens of the
  windows are concatenated in order: ((f - 1) // 2 + 1 - 2) // 2 + 1 per window of f frames.
- Prompt: the folder's chat template writes one `<sound>` before the turn's text, with no markers
  and no newline, expanded to one per audio token (one clip per turn).
- Weights: the hub's names (`audio_tower.*`, `multi_modal_projector.linear_{1,2}.*`,
  `language_model.model.*`, `language_model.lm_head.weight`) load 1:1; conv weights are transposed.
- dtype: HF's encoder softmax is not upcast to float32 (Qwen2-Audio's and Omni's are); the fused
  kernel here accumulates in float32, so bf16 differs from HF's bf16 within its own drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..hooks import Hooks
from .base import BLOCK, AudioLM, fingerprint_blocks
from .qwen2 import LanguageModel, TextConfig, check_model_type, eos_ids
from .qwen2_audio import _IN_MEMORY_PREFIXES
from .whisper import AudioConfig, AudioEncoder

MODEL_TYPE = "audioflamingo3"


@dataclass
class ModelConfig:
    """The whole `AudioFlamingo3Config` (mlx-lm's `ModelArgs` contract)."""

    model_type: str = MODEL_TYPE
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151669
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    eos_token_id: list[int] = field(default_factory=list)
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        check_model_type(d, MODEL_TYPE)
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act {d['projector_hidden_act']!r} is not supported (gelu only)")
        # transformers never ties AF3's head (its class declares no tied weights): a separate lm_head
        text = TextConfig.from_dict({**(d.get("text_config") or {}), "tie_word_embeddings": False})
        eos = eos_ids(d, text)
        return cls(model_type=MODEL_TYPE, audio_config=AudioConfig.from_dict(d.get("audio_config") or {}),
                   text_config=text, audio_token_index=d.get("audio_token_id", d.get("audio_token_index", 151669)),
                   projector_bias=d.get("projector_bias", True), eos_token_id=eos,
                   quantization=d.get("quantization"), raw=d)

    def identity(self) -> dict:
        t, a = self.text_config, self.audio_config
        return {
            "family": MODEL_TYPE,
            "text": [t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                     t.num_key_value_heads, t.rms_norm_eps, float(t.rope_theta), t.tie_word_embeddings],
            "audio": [a.num_mel_bins, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim, a.d_model,
                      a.max_source_positions],
            "audio_token_index": self.audio_token_index, "projector_bias": self.projector_bias,
        }

    def fingerprint_slices(self) -> dict:
        return fingerprint_blocks(self.text_config, self.audio_config.encoder_layers,
                                  {"multi_modal_projector.linear_1.weight": BLOCK,
                                   "multi_modal_projector.linear_2.weight": BLOCK})

    @property
    def dtype_name(self) -> str:
        d = self.raw
        return d.get("dtype") or d.get("torch_dtype") or d.get("text_config", {}).get("torch_dtype", "float32")


class Projector(nn.Module):
    """`multi_modal_projector`: linear_1 -> exact GELU -> linear_2."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out, bias=bias)
        self.linear_2 = nn.Linear(d_out, d_out, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


class Model(AudioLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = self.args = config
        self.model_type = config.model_type
        self.hooks = Hooks()
        self.audio_tower = AudioEncoder(config.audio_config, self.hooks)
        self.multi_modal_projector = Projector(config.audio_config.d_model, config.text_config.hidden_size,
                                               config.projector_bias)
        self.language_model = LanguageModel(config.text_config, self.hooks)

    def encode_features(self, features) -> tuple[mx.array, mx.array]:
        """Each window's log-mel alone through the tower; tokens concatenated, then the projector. Windows
        are evaluated one at a time: as one lazy graph, all 20 windows' attention scores of a 600-s clip
        would be alive together (peak 1.76 GB above the weights at width 320, bench_families.py)."""
        pieces = list(features.pieces())
        enc = []
        for mel, n in pieces:
            enc.append(self.audio_tower(mel, n))
            if len(pieces) > 1:
                mx.eval(enc[-1])
        enc = enc[0] if len(enc) == 1 else mx.concatenate(enc, axis=0)
        return enc, self.multi_modal_projector(enc)

    def sanitize(self, weights: dict) -> dict:
        return self.remap(weights, _IN_MEMORY_PREFIXES)
