"""The Qwen2 decoder with hook points: mlx-lm's qwen2 blocks, subclassed so the points sit inside.

Attention and the block are mlx-lm's classes (same parameters, MLP, norms and RoPE); only their
`__call__` is ours, to pass the hook points of `hooks.py`: the block input and output, the
post-RoPE queries with the cached keys (head-level statistics are reduced there while the fused
kernel still computes the output), the attention mask, and the per-head attention output before
`o_proj`. Every call knows its absolute position (the cache offset). With no hook installed the
forward pass is mlx-lm's, op for op.

`TextConfig` reads transformers' `Qwen2Config` with transformers' defaults, which differ from
mlx-lm's (untied head, RoPE theta 10000, 32 KV heads): a wrong default silently breaks a real model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2 as mlx_qwen2
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from ..hooks import Hooks, decoder_point


def from_dict(cls, d: dict):
    """A config dataclass from a dict, unknown keys ignored (mlx-lm's `ModelArgs` contract)."""
    names = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in d.items() if k in names})


def check_model_type(d: dict, expected: str) -> None:
    if d.get("model_type") != expected:
        raise ValueError(f"model_type is {d.get('model_type')!r}, expected {expected!r}")


def eos_ids(d: dict, text: "TextConfig") -> list[int]:
    """The top level's eos ids (mlx-lm's load_config merges generation_config's there), else the text config's."""
    eos = d.get("eos_token_id", text.eos_token_id)
    return [eos] if isinstance(eos, int) else list(eos or [])


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
            raise ValueError("sliding-window attention is not supported")
        return from_dict(cls, d)

    def mlx_lm_args(self) -> mlx_qwen2.ModelArgs:
        """The same decoder as mlx-lm's qwen2 arguments (explicit: its defaults are not ours)."""
        return mlx_qwen2.ModelArgs(
            model_type="qwen2", hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size, num_attention_heads=self.num_attention_heads,
            rms_norm_eps=self.rms_norm_eps, vocab_size=self.vocab_size, num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta, rope_traditional=False,
            rope_scaling=None, tie_word_embeddings=self.tie_word_embeddings)


class Attention(mlx_qwen2.Attention):
    def __init__(self, args: mlx_qwen2.ModelArgs, index: int, hooks: Hooks):
        super().__init__(args)
        self.hook_qk = hooks.point(decoder_point(index, "attn.hook_qk"), index, self.scale)
        self.hook_mask = hooks.point(decoder_point(index, "attn.hook_mask"), index, self.scale)
        self.hook_z = hooks.point(decoder_point(index, "attn.hook_z"), index)
        hooks.derive(decoder_point(index, "attn.hook_audio_mass"), self.hook_qk, "audio_mass")
        hooks.derive(decoder_point(index, "attn.hook_pattern"), self.hook_qk, "pattern")

    def __call__(self, x: mx.array, mask=None, cache=None, offset: int = 0) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        mask = self.hook_mask(mask, offset, L)
        self.hook_qk((q, k, mask), offset, L)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        z = self.hook_z(o.transpose(0, 2, 1, 3), offset, L)  # (B, L, heads, head_dim)
        return self.o_proj(z.reshape(B, L, -1))


class DecoderLayer(mlx_qwen2.TransformerBlock):
    def __init__(self, args: mlx_qwen2.ModelArgs, index: int, hooks: Hooks):
        super().__init__(args)
        self.index = index
        self.self_attn = Attention(args, index, hooks)
        self.hook_resid_pre = hooks.point(decoder_point(index, "hook_resid_pre"), index)
        self.hook_resid_post = hooks.point(decoder_point(index, "hook_resid_post"), index)

    def __call__(self, x: mx.array, mask=None, cache=None, offset: int = 0) -> mx.array:
        L = x.shape[1]
        x = self.hook_resid_pre(x, offset, L)
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, offset)
        out = h + self.mlp(self.post_attention_layernorm(h))
        return self.hook_resid_post(out, offset, L)


class Qwen2Model(nn.Module):
    """`…language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig, hooks: Hooks):
        super().__init__()
        args = cfg.mlx_lm_args()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(args, i, hooks) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def blocks(self, h: mx.array, cache=None, n_layers: int | None = None, start: int = 0) -> mx.array:
        """The residual stream after blocks `start`..`n_layers`-1 (all by default), before the norm.

        Positions are absolute: a call continues where `cache` (one entry per block run) stopped."""
        layers = self.layers[start:n_layers]
        cache = [None] * len(layers) if cache is None else cache
        offset = cache[0].offset if cache[0] is not None else 0
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(layers, cache):
            h = layer(h, mask, c, offset)
        return h

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        return self.norm(self.blocks(h, cache))


class LanguageModel(nn.Module):
    """A Qwen2 causal LM (`Qwen2ForCausalLM`): the decoder and its head (tied or not)."""

    def __init__(self, cfg: TextConfig, hooks: Hooks):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg, hooks)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self):  # what mlx-lm's cache builder looks for
        return self.model.layers

    def head(self, x: mx.array) -> mx.array:
        """`lm_head` alone (no final norm)."""
        return self.model.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)

    def unembed(self, h: mx.array) -> mx.array:
        """Logits of a residual-stream value taken after the last block (final norm, then `lm_head`)."""
        return self.head(self.model.norm(h))

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.model.embed_tokens(inputs)
        return self.unembed(self.model.blocks(h, cache))
