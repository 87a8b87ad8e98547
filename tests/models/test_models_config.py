"""Config reading (`models/qwen2_audio.py` with the Qwen2 and Whisper sub-configs): the hub's
sparse 4.x file and transformers 5.x files, against transformers."""

from __future__ import annotations

import json

import pytest
from support import DATA

from mlx_listen.models.qwen2_audio import ModelConfig

HUB = json.loads((DATA / "hub_config.json").read_text())


FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"]


def hf_view(d: dict):
    """What transformers makes of the same config dict."""
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(**{k: v for k, v in d.items() if k not in ("architectures", "torch_dtype")})


def assert_same_as_transformers(d: dict):
    ours, hf = ModelConfig.from_dict(d), hf_view(d)
    for f in FIELDS:
        assert getattr(ours.text_config, f) == getattr(hf.text_config, f), f
    assert ours.text_config.rope_theta == hf.text_config.rope_parameters["rope_theta"]
    for f in ["num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
              "max_source_positions"]:
        assert getattr(ours.audio_config, f) == getattr(hf.audio_config, f), f
    assert ours.audio_token_index == hf.audio_token_index
    return ours


@pytest.mark.torch
def test_hub_config_fills_qwen2_defaults():
    """The real config omits width, depth and heads: the defaults must be transformers' ones."""
    c = assert_same_as_transformers(HUB)
    t = c.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 32)
    assert t.rope_theta == 10000 and t.rms_norm_eps == 1e-5 and t.tie_word_embeddings is False
    assert t.vocab_size == 156032 and t.intermediate_size == 11008 and t.head_dim == 128
    assert c.dtype_name == "bfloat16"


@pytest.mark.torch
def test_transformers5_config_round_trip(tmp_path):
    """A config written by transformers 5 (rope_parameters, dtype, every field) reads the same."""
    hf = hf_view(HUB)
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in d["text_config"] and "rope_theta" not in d["text_config"]
    c = assert_same_as_transformers(d)
    assert c.text_config.rope_theta == 10000


@pytest.mark.torch
def test_missing_theta_defaults_to_10000():
    d = json.loads(json.dumps(HUB))
    del d["text_config"]["rope_theta"]
    assert_same_as_transformers(d)


def test_rejects_other_models_and_unsupported_rope():
    with pytest.raises(ValueError, match="qwen2_audio"):
        ModelConfig.from_dict({"model_type": "qwen2"})
    d = json.loads(json.dumps(HUB))
    d["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="RoPE"):
        ModelConfig.from_dict(d)


def test_generation_config_eos_ids_are_merged():
    d = dict(HUB, eos_token_id=[151643, 151645])
    assert ModelConfig.from_dict(d).eos_token_id == [151643, 151645]
    assert ModelConfig.from_dict(HUB).eos_token_id == [151645]
