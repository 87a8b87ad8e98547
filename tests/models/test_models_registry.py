"""The family registry and each family's config, identity and key surgery: configs read as transformers
reads them (both config styles), one `Error:` per unusable checkpoint, what identifies a model (config
hash, fingerprint) per family, and Omni's unused parts left out with a count."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_listen.bundle import config_hash, fingerprint_slices
from mlx_listen.errors import ListenError, ModelError
from mlx_listen.identity import check_binding, model_signature, weight
from mlx_listen.load import load, load_model
from mlx_listen.models import FAMILIES, model_config

pytestmark = pytest.mark.torch


def hf_config(t):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(t.hf_path)
    return cfg.thinker_config if cfg.model_type == "qwen2_5_omni" else cfg


def test_configs_read_as_transformers_reads_them(fam):
    ours = model_config(json.loads((fam.hf_path / "config.json").read_text()))
    hf = hf_config(fam)
    t, ht = ours.text_config, hf.text_config
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(t, f) == getattr(ht, f), f
    assert t.rope_theta == ht.rope_parameters["rope_theta"]
    assert t.tie_word_embeddings == getattr(hf, "tie_word_embeddings", False) is False  # what transformers ties by
    a, ha = ours.audio_config, hf.audio_config
    for f in ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
              "max_source_positions"):
        assert getattr(a, f) == getattr(ha, f), f
    assert ours.audio_token_index == hf.audio_token_id
    if fam.kind == "omni":
        assert a.n_window == ha.n_window and a.output_dim == ha.output_dim
        assert ht.rope_parameters["mrope_section"] and sum(ht.rope_parameters["mrope_section"]) == t.head_dim // 2


def test_unusable_configs_say_why(omni):
    base = json.loads((omni.hf_path / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type is 'whisper'; mlx-listen runs 'qwen2_audio'.*'audioflamingo3'.*'qwen2_5_omni'"):
        model_config({"model_type": "whisper"})
    no_thinker = {k: v for k, v in base.items() if k != "thinker_config"}
    with pytest.raises(ValueError, match="no thinker_config"):
        model_config(no_thinker)
    bad = json.loads(json.dumps(base))
    bad["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"] = [1, 1, 1]
    with pytest.raises(ValueError, match=r"mrope_section \[1, 1, 1\] does not sum to head_dim / 2 = 8"):
        model_config(bad)


def test_each_family_has_its_own_config_hash_and_fingerprint(every_family, af3, omni, tiny_gqa):
    model, _ = every_family.mlx
    config = model.config.raw
    hashes = {config_hash(t.mlx[0].config.raw) for t in (af3, omni, tiny_gqa)}
    assert len(hashes) == 3
    sig = model_signature(model)
    assert sig["family"] == model.family == config["model_type"]
    assert set(sig["fingerprint"]) == set(fingerprint_slices(config))
    assert any("projector" in n or "proj.weight" in n for n in sig["fingerprint"])
    for name, idx in fingerprint_slices(config).items():  # every block is a real, non-constant tensor block
        block = np.array(weight(model, name)[idx].astype(mx.float32))
        assert block.size and block.std() > 0, name


def test_head_sets_never_cross_families(af3, omni):
    a, o = af3.mlx[0], omni.mlx[0]
    meta = {"model_signature": model_signature(a)}
    assert check_binding(meta, "HEADS.json", model=a) == []
    for force in (False, True):
        with pytest.raises(ListenError, match="HEADS.json was found on a Audio Flamingo 3 model \\(audioflamingo3\\); "
                                              "this model is a Qwen2.5-Omni model"):
            check_binding(meta, "HEADS.json", model=o, force=force)


def test_omni_keeps_the_thinker_only(omni, tmp_path, capsys):
    from support.checkpoints import tensors

    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.run import weight_fingerprint

    out = convert(str(omni.hf_path), str(tmp_path / "m"))
    err = capsys.readouterr().err
    assert "[INFO] Left out 136 tensors" in err and "talker.* (17)" in err and "token2wav.* (96)" in err
    assert "thinker.visual.* (22)" in err and "thinker.audio_tower.audio_bos_eos_token.* (1)" in err
    keys = set(tensors(out))
    assert not {k for k in keys if k.startswith(("talker", "token2wav", "thinker", "visual"))}
    assert {k.split(".")[0] for k in keys} == {"audio_tower", "language_model"}
    cfg = json.loads((out / "config.json").read_text())
    assert "talker_config" not in cfg and "token2wav_config" not in cfg and cfg["enable_audio_output"] is False
    model, _ = load(out)
    values, _ = weight_fingerprint(omni.hf_model, cfg)  # the reference side's names map onto the thinker
    sig = model_signature(model)
    for name, v in values.items():
        np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(sig["fingerprint"][name], np.float32))


def test_checkpoints_without_a_thinker_are_refused(omni, tmp_path):
    from safetensors.numpy import load_file, save_file

    only_talker = tmp_path / "talker-only"
    shutil.copytree(omni.hf_path, only_talker)
    for f in only_talker.glob("model*.safetensors"):
        save_file({k: v for k, v in load_file(f).items() if k.startswith(("talker.", "token2wav."))}, f)
    with pytest.raises(ModelError, match="holds no thinker weights.*113 tensors of other parts"):
        load_model(only_talker)
    cfg = json.loads((omni.hf_path / "config.json").read_text())
    cfg.pop("thinker_config")
    no_thinker = tmp_path / "no-thinker"
    shutil.copytree(omni.hf_path, no_thinker)
    (no_thinker / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no thinker_config"):
        load(no_thinker)


def test_registry_is_model_free():
    assert set(FAMILIES) == {"qwen2_audio", "audioflamingo3", "qwen2_5_omni"}
    assert FAMILIES["audioflamingo3"].placeholder == "<sound>"
