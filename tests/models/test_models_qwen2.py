"""The Qwen2 decoder (`models/qwen2.py`): a cached one-token step equals the full forward."""

from __future__ import annotations

import mlx.core as mx
from support import tone
from support.checks import assert_close

from mlx_listen.prompt import prepare


def test_kv_cache_decode_equals_full_forward(tiny_gqa):
    """Logits of a cached one-token step equal the no-cache forward over the whole sequence."""
    from mlx_lm.models.cache import make_prompt_cache

    model, processor = tiny_gqa.mlx
    p = prepare(model, processor, [tone(1.0)], "q")
    nxt = 65
    cache = make_prompt_cache(model)
    model(mx.array(p.ids)[None], cache=cache, input_embeddings=p.embeddings[None])
    step = model(mx.array([[nxt]]), cache=cache)[0, -1]
    emb = mx.concatenate([p.embeddings, model.language_model.model.embed_tokens(mx.array([nxt]))])
    full = model(mx.array(p.ids + [nxt])[None], input_embeddings=emb[None])[0, -1]
    assert_close(step, full, 1e-5, "cached step")
