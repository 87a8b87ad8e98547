"""The Qwen2 decoder (`language_model`), in mlx-lm's shape with HF's weight names.

It is mlx-lm's qwen2 written out so that the hook points of `hooks.py` sit inside it: the block
input and output, the post-RoPE queries with the cached keys (head-level statistics are reduced
there while the fused kernel still computes the output), the attention mask, and the per-head
attention output before `o_proj`. Every call knows its absolute position (the cache offset), and
with no hook installed the forward pass is mlx-lm's, op for op.

`Qwen2Model.blocks` runs the decoder blocks alone (optionally only the first few) and returns the
residual stream before the final norm; `LanguageModel.unembed` is the final norm and `lm_head`.
Callers that need logits at one position, or the residual at a few layers, use these two
instead of computing logits for every position.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import TextConfig
from .hooks import Hooks, decoder_point


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, index: int, hooks: Hooks):
        super().__init__()
        dim, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.rope = nn.RoPE(hd, traditional=False, base=cfg.rope_theta)
        self.hook_qk = hooks.point(decoder_point(index, "attn.hook_qk"), index, self.scale)
        self.hook_mask = hooks.point(decoder_point(index, "attn.hook_mask"), index, self.scale)
        self.hook_z = hooks.point(decoder_point(index, "attn.hook_z"), index)

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


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int, hooks: Hooks):
        super().__init__()
        self.index = index
        self.self_attn = Attention(cfg, index, hooks)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hook_resid_pre = hooks.point(decoder_point(index, "hook_resid_pre"), index)
        self.hook_resid_post = hooks.point(decoder_point(index, "hook_resid_post"), index)

    def __call__(self, x: mx.array, mask=None, cache=None, offset: int = 0) -> mx.array:
        L = x.shape[1]
        x = self.hook_resid_pre(x, offset, L)
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, offset)
        out = h + self.mlp(self.post_attention_layernorm(h))
        return self.hook_resid_post(out, offset, L)


class Qwen2Model(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig, hooks: Hooks):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i, hooks) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def blocks(self, h: mx.array, cache=None, n_layers: int | None = None) -> mx.array:
        """The residual stream after the first `n_layers` blocks (all by default), before the norm.

        Positions are absolute: a call continues where `cache` stopped."""
        layers = self.layers[:n_layers]
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
    """`language_model`: the Qwen2 causal LM (untied `lm_head`, as in Qwen2-Audio)."""

    def __init__(self, cfg: TextConfig, hooks: Hooks):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg, hooks)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self):  # what mlx-lm's cache builder looks for
        return self.model.layers

    def unembed(self, h: mx.array) -> mx.array:
        """Logits of a residual-stream value taken after the last block (final norm, then `lm_head`)."""
        h = self.model.norm(h)
        return self.model.embed_tokens.as_linear(h) if self.config.tie_word_embeddings else self.lm_head(h)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.model.embed_tokens(inputs)
        return self.unembed(self.model.blocks(h, cache))
