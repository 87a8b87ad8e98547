"""The Whisper-style audio tower (Whisper-large-v3 encoder + average pool), in MLX.

Attribute names follow transformers' `Qwen2AudioEncoder` (also Audio Flamingo 3's tower), so
checkpoint keys load 1:1.

HF always runs 1500 encoder positions with a key-padding mask past the clip's valid length, then
keeps the first `n_tok` pooled features. Keys past the valid length are masked for every query
and conv2 output j only reads mel frames up to 2j + 2, so running the convs on the first
2*conv_len + 2 mel frames and the blocks on the first conv_len positions, unmasked, gives the
kept features exactly, without paying 30 s of compute for a 3 s clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..hooks import Hooks
from .qwen2 import from_dict


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
        # Audio Flamingo 3's encoder config uses transformers-5 names for the same fields.
        d = {ALIASES.get(k, k): v for k, v in d.items() if not (k in ALIASES and ALIASES[k] in d)}
        return from_dict(cls, d)


ALIASES = {"hidden_size": "d_model", "num_hidden_layers": "encoder_layers",
           "num_attention_heads": "encoder_attention_heads", "intermediate_size": "encoder_ffn_dim"}


def conv_length(n_frames: int) -> int:
    """Valid encoder positions after conv2 (stride 2) for `n_frames` valid mel frames."""
    return (n_frames - 1) // 2 + 1


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, index: int, hooks: Hooks, prescale: bool = True):
        super().__init__()
        self.n_heads, self.prescale = n_heads, prescale
        self.scaling = (dim // n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # q arrives scaled (Qwen2-Audio, AF3), or the scale is the kernel's (Qwen2.5-Omni)
        self.hook_qk = hooks.point(f"encoder.blocks.{index}.attn.hook_qk", index, 1.0 if prescale else self.scaling)
        hooks.derive(f"encoder.blocks.{index}.attn.hook_pattern", self.hook_qk, "encoder_pattern")

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        B, L, D = x.shape
        # Qwen2-Audio and AF3 scale q before attention and call it with scale 1; Omni scales the
        # scores. Doing each the same keeps the rounding identical for any head size.
        q = self.q_proj(x) * self.scaling if self.prescale else self.q_proj(x)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        self.hook_qk((q, k, mask), 0, L)
        scale = 1.0 if self.prescale else self.scaling
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig, index: int, hooks: Hooks, prescale: bool = True):
        super().__init__()
        d = cfg.d_model
        self.self_attn = EncoderAttention(d, cfg.encoder_attention_heads, index, hooks, prescale)
        self.hook_resid_post = hooks.point(f"encoder.blocks.{index}.hook_resid_post", index)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-5)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == mx.float16:  # HF's fp16-only overflow guard
            c = float(mx.finfo(mx.float16).max) - 1000
            x = mx.clip(x, -c, c)
        return self.hook_resid_post(x, 0, x.shape[1])


class AudioEncoder(nn.Module):
    """`audio_tower`: log-mel (128, 3000) → pooled, normed features (n_tok, d_model)."""

    def __init__(self, cfg: AudioConfig, hooks: Hooks):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = [EncoderLayer(cfg, i, hooks) for i in range(cfg.encoder_layers)]
        self.layer_norm = nn.LayerNorm(d, eps=1e-5)

    def __call__(self, mel: mx.array, n_frames: int | None = None, *, padded: bool = False):
        """Encode one clip's 30 s-padded log-mel `mel` (128, 3000) with `n_frames` valid frames.

        `padded=True` runs HF's way (all 1500 positions, key-padding mask) for benchmarks and
        checks; the default runs the valid positions only, which is exact (module docstring).
        """
        n_frames = mel.shape[-1] if n_frames is None else n_frames
        max_pos = self.config.max_source_positions
        conv_len = min(conv_length(n_frames), max_pos)
        n_tok = (conv_len - 2) // 2 + 1
        if not padded:
            # Always slice the 30 s-padded mel: the last valid conv2 position reads one padded
            # frame, and the log-mel clamp used the max over the padded clip.
            mel = mel[:, : 2 * conv_len + 2]
        x = mel.T[None].astype(self.conv1.weight.dtype)  # (1, frames, mels): MLX convs are NLC
        x = nn.gelu(self.conv1(x))
        x = nn.gelu(self.conv2(x))
        if padded:
            x = x + self.embed_positions.weight[: x.shape[1]]
            keep = mx.arange(x.shape[1]) < conv_len
            mask = mx.where(keep, 0.0, -mx.inf).astype(x.dtype)[None, None, None, :]
            for layer in self.layers:
                x = layer(x, mask if conv_len < x.shape[1] else None)
        else:
            x = x[:, :conv_len] + self.embed_positions.weight[:conv_len]
            for layer in self.layers:
                x = layer(x)
        # AvgPool1d(2, 2) over time, then the final norm (HF pools before the norm).
        L = (x.shape[1] // 2) * 2
        x = x[:, :L].reshape(1, L // 2, 2, -1).mean(axis=2)
        x = self.layer_norm(x)
        return x[0, :n_tok]
