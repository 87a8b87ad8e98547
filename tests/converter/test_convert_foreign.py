"""MLX folders others made load and answer exactly like ours (the family's `sanitize` does the key surgery).

- mlx-audio's Qwen2-Audio layout (what `mlx-community/Qwen2-Audio-7B-Instruct-4bit` is): the hub's key
  names and config.json plus mlx-lm's `quantization` block, convs in MLX's layout, one
  `model.safetensors`, and no `audio_tower.embed_positions.weight` (mlx-audio recomputes Whisper's
  sinusoids). Built here from the tiny checkpoint, its position table set to those sinusoids first,
  since the layout cannot carry any other table.
- mlx-lm-style: quantised by mlx-lm's own `quantize_model` with its mixed recipe and written by its
  `save_model` / `save_config` (per-path entries, indent 4, its shard naming).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from support import tone
from support.checkpoints import last_logits, tensors

from mlx_listen.answers import generate
from mlx_listen.load import load
from mlx_listen.models.qwen2_5_omni import sinusoids
from mlx_listen.prompt import prepare
from mlx_listen_convert.convert import SIDE_FILES, convert

POS = "audio_tower.embed_positions.weight"


def answers(folder):
    model, proc = load(folder)
    tokens = generate(model, proc, prepare(model, proc, [tone(1.0)], "q"), max_tokens=6).tokens
    return last_logits(model, proc), tokens, model


def side_files(src, dst):
    for f in SIDE_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


@pytest.fixture(scope="module")
def with_sinusoids(tiny_gqa, tmp_path_factory):
    """Our float folder of the tiny checkpoint with Whisper's sinusoidal position table, and its 4-bit copy."""
    root = tmp_path_factory.mktemp("foreign")
    ours = root / "ours"
    shutil.copytree(tiny_gqa.mlx_path, ours)
    w = tensors(ours)
    a = json.loads((ours / "config.json").read_text())["audio_config"]
    w[POS] = mx.array(sinusoids(a["max_source_positions"], a["d_model"]))
    for f in ours.glob("model*.safetensors"):
        f.unlink()
    (ours / "model.safetensors.index.json").unlink(missing_ok=True)
    mx.save_safetensors(str(ours / "model.safetensors"), w, metadata={"format": "mlx"})
    q4 = convert(str(ours), str(root / "ours-q4"), quantize=True, progress=False)
    return root, ours, q4


@pytest.mark.parametrize("quantised", [False, True])
def test_mlx_audio_layout(tiny_gqa, with_sinusoids, quantised):
    root, ours, q4 = with_sinusoids
    src = q4 if quantised else ours
    theirs = root / f"mlx-audio-{'q4' if quantised else 'fp'}"
    theirs.mkdir()
    w = {k: v for k, v in tensors(src).items() if k != POS}  # mlx-audio stores no position table
    assert w["audio_tower.conv1.weight"].shape[1] == 3  # convs in MLX's (out, k, in) layout
    mx.save_safetensors(str(theirs / "model.safetensors"), w, metadata={"format": "mlx"})
    config = json.loads((tiny_gqa.hf_path / "config.json").read_text())  # the source's config as it was
    config["audio_token_id"] = config.pop("audio_token_index")  # the name mlx-audio's ModelConfig reads
    if quantised:
        config["quantization"] = config["quantization_config"] = {"group_size": 64, "bits": 4}
    (theirs / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    side_files(tiny_gqa.hf_path, theirs)

    logits, tokens, model = answers(theirs)
    ref_logits, ref_tokens, _ = answers(src)
    assert np.array_equal(logits, ref_logits) and tokens == ref_tokens
    assert model.audio_tower.embed_positions.weight.dtype == mx.float32
    if quantised:
        assert isinstance(model.language_model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)


def test_broken_hf_folder_still_refused(tiny_gqa, tmp_path):
    """Only an MLX-layout folder gets the table back: a hub-layout folder without it is an incomplete download."""
    from mlx_listen.errors import ModelError

    bad = tmp_path / "bad"
    bad.mkdir()
    w = {k: v for k, v in tensors(tiny_gqa.hf_path).items() if "embed_positions" not in k}
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    shutil.copy2(tiny_gqa.hf_path / "config.json", bad / "config.json")
    with pytest.raises(ModelError, match="embed_positions"):
        load(bad)


def test_mlx_lm_style_folder(tiny_gqa, with_sinusoids, tmp_path):
    """mlx-lm's quantize_model + mixed recipe + save_model/save_config: the same answers as our converter's."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model, save_config, save_model

    from mlx_listen.load import load_model

    _, ours, _ = with_sinusoids
    model, config = load_model(ours, lazy=True)
    mixed = mixed_quant_predicate_builder("mixed_3_6", model, 32)
    model, config = quantize_model(model, config, 32, 3, quant_predicate=lambda p, m: p.startswith(
        "language_model.") and mixed(p, m))
    theirs = tmp_path / "mlx-lm"
    theirs.mkdir()
    save_model(theirs, model, donate_model=True)
    save_config(config, theirs / "config.json")
    side_files(tiny_gqa.hf_path, theirs)
    mine = convert(str(ours), str(tmp_path / "mine"), quantize=True, quant_predicate="mixed_3_6", q_group_size=32,
                   progress=False)
    got, want = json.loads((theirs / "config.json").read_text()), json.loads((mine / "config.json").read_text())
    assert got["quantization"] == want["quantization"]
    logits, tokens, m = answers(theirs)
    ref_logits, ref_tokens, _ = answers(mine)
    assert np.array_equal(logits, ref_logits) and tokens == ref_tokens
    bits = {p: x.bits for p, x in tree_flatten(m.leaf_modules(), is_leaf=nn.Module.is_module) if "scales" in x}
    assert set(bits.values()) == {3, 6}
