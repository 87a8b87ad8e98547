"""Steering vectors on disk (`method/directions.py`): the file round trip, the width check, the
stored strength, and a fixed vector steering without any silence pass."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from support import tone

from mlx_listen.errors import ListenError
from mlx_listen.hooks import RESID, run_with_cache
from mlx_listen.interp.steering import Steerer
from mlx_listen.method.directions import load_vector, save_vector, steer_config
from mlx_listen.prompt import prepare

Q = "Describe the audio."


def last_logits(model, prompt) -> np.ndarray:
    return np.array(run_with_cache(model, prompt, [])[0][0])


def test_vector_file_round_trip_and_width_check(tiny_gqa, tmp_path):
    model, processor = tiny_gqa.mlx
    hidden = model.config.text_config.hidden_size
    v = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    path = tmp_path / "v.safetensors"
    save_vector(path, v, apply_layer=len(model.layers) - 1, hidden_size=hidden,
                meta={"layers": [0, 1], "coeff": 0.5, "source": "dataset_mean"})
    back, layer, md = load_vector(path, hidden, len(model.layers))
    assert np.array_equal(back, v) and layer == len(model.layers) - 1
    assert md["hidden_size"] == str(hidden) and json.loads(md["layers"]) == [0, 1]
    with pytest.raises(ListenError, match="hidden size"):
        load_vector(path, hidden * 2, len(model.layers))
    # the file's stored strength is what --vector uses without --alpha
    cfg, settings = steer_config(None, path)
    assert cfg.alpha == 0.5 and cfg.layers == [] and settings["vector_sha256"]
    assert steer_config(None, path, alpha=2.0)[0].alpha == 2.0
    # a fixed vector steers without any silence pass
    prompt = prepare(model, processor, [tone(1.0)], Q)
    st = Steerer(model, cfg)
    with st.applied(prompt):
        steered = last_logits(model, prompt)
    h = run_with_cache(model, prompt, RESID.format(len(model.layers) - 1))[1].resid(len(model.layers) - 1, prompt.last)
    lm = model.language_model
    expect = lm.lm_head(lm.model.norm(h + 0.5 * mx.array(v)))
    assert np.abs(steered - np.array(expect)).max() <= 1e-5
