"""The model interface (`models/base.py`): audio embeddings must fill the prompt's placeholders."""

from __future__ import annotations

import mlx.core as mx
import pytest
from support import tone

from mlx_listen.prompt import prepare


def test_placeholder_feature_mismatch_raises(tiny_gqa):
    from mlx_listen.errors import ListenError

    model, processor = tiny_gqa.mlx
    p = prepare(model, processor, [tone(1.0)], "q")
    with pytest.raises(ListenError, match="25 audio positions but the audio gives 3"):
        model.embed(p.ids, [mx.zeros((3, model.config.text_config.hidden_size))])
