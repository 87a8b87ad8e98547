"""The Qwen2 decoder (`language_model`), in mlx-lm's shape with HF's weight names.

It is mlx-lm's qwen2 written out so that two kinds of interpretability hook live inside it, at
no cost when unused (see `capture.py` and `steering.py`):
- `Attention.probes`: each is called as `probe(attn, q, k, mask)` with the post-RoPE queries
  and the cached keys, so head-level statistics (attention mass on the audio span at the last
  query) are reduced inside the forward pass while the fused kernel still computes the output;
- `DecoderLayer.hooks`: each maps the block output (the residual stream) `h -> hook(layer, h)`,
  to record it or to edit it (steering), in the order they were added.
Both lists are empty by default; the forward pass then is mlx-lm's, op for op.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import TextConfig

Probe = Callable[[Any, mx.array, mx.array, Any], None]
Hook = Callable[[Any, mx.array], mx.array]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        dim, hd = cfg.hidden_size, cfg.head_dim
        self.index = index
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.rope = nn.RoPE(hd, traditional=False, base=cfg.rope_theta)
        self.probes: list[Probe] = []

    def __call__(self, x: mx.array, mask=None, cache=None, last_only: bool = False) -> mx.array:
        """`last_only`: queries (and the output) for the last position only; keys for all. The last
        row sees every key, so no mask is needed (the silence pass of steering uses this)."""
        B, L, _ = x.shape
        xq = x[:, -1:] if last_only else x
        Lq = xq.shape[1]
        q = self.q_proj(xq).reshape(B, Lq, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset + L - Lq)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        for probe in self.probes:
            probe(self, q, k, mask)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=None if last_only else mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, Lq, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index = index
        self.self_attn = Attention(cfg, index)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hooks: list[Hook] = []

    def __call__(self, x: mx.array, mask=None, cache=None, last_only: bool = False) -> mx.array:
        h = (x[:, -1:] if last_only else x) + self.self_attn(self.input_layernorm(x), mask, cache, last_only)
        out = h + self.mlp(self.post_attention_layernorm(h))
        for hook in self.hooks:
            out = hook(self, out)
        return out


class Qwen2Model(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class LanguageModel(nn.Module):
    """`language_model`: the Qwen2 causal LM (untied `lm_head`, as in Qwen2-Audio)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self):  # what mlx-lm's cache builder looks for
        return self.model.layers

    def __call__(self, inputs, cache=None, input_embeddings=None):
        out = self.model(inputs, cache, input_embeddings)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)
