"""The converter's output (`mlx_listen_convert.convert`) and loading of every checkpoint layout, on
the tiny checkpoints: the output folder (index, config, side files, model card, MLX conv layout),
idempotent re-conversion, dtype casts, one shard in memory at a time, sharding,
transformers-5 key names, hub-style sharded inputs, and `ModelError`s for broken folders."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.checkpoints import CONVERT, assert_same_tensors, hf_copy, last_logits, tensors

from mlx_listen.errors import ModelError
from mlx_listen.load import load
from mlx_listen_convert.convert import convert

SIDE = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
        "generation_config.json"]


def hub_name(key: str) -> str:
    """transformers-5 in-memory parameter name → the hub/save_pretrained name."""
    for live, hub in [("model.language_model.", "language_model.model."), ("model.", ""),
                      ("lm_head.", "language_model.lm_head.")]:
        if key.startswith(live):
            return hub + key[len(live):]
    return key


@pytest.mark.torch
def test_output_folder(tiny):
    out = tiny.mlx_path  # written by conftest with `convert`
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model*.safetensors"))
    assert shards and set(index["weight_map"].values()) == {s.name for s in shards}
    weights = {}
    for s in shards:
        w, meta = mx.load(str(s), return_metadata=True)
        assert meta == {"format": "mlx"}
        assert all(index["weight_map"][k] == s.name for k in w), "index points a key at the wrong shard"
        weights.update(w)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_audio"
    assert "quantization" not in config
    for f in SIDE:
        assert (out / f).read_bytes() == (tiny.hf_path / f).read_bytes(), f
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card.split("---")[1]

    # Every tensor is HF's own, the convs transposed from torch (out, in, k) to MLX (out, k, in).
    hf = {hub_name(k): v.detach().numpy() for k, v in tiny.hf_model.state_dict().items()}
    assert set(hf) == set(weights)
    for name in ("audio_tower.conv1.weight", "audio_tower.conv2.weight"):
        torch_w = hf.pop(name)
        assert weights[name].shape == (torch_w.shape[0], torch_w.shape[2], torch_w.shape[1])
        np.testing.assert_array_equal(np.array(weights[name]), torch_w.transpose(0, 2, 1))
    for k, v in hf.items():
        np.testing.assert_array_equal(np.array(weights[k]), v, err_msg=k)


def test_reconverting_an_mlx_folder_is_the_identity(tiny, tmp_path):
    """The conv transpose only applies to torch-layout weights, so MLX → MLX changes nothing."""
    again = convert(str(tiny.mlx_path), str(tmp_path / "again"), progress=False)
    assert_same_tensors(tensors(again), tensors(tiny.mlx_path))
    assert json.loads((again / "config.json").read_text()) == json.loads((tiny.mlx_path / "config.json").read_text())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast(tiny_gqa, tmp_path, dtype):
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / dtype), dtype=dtype, progress=False)
    w = tensors(out)
    floating = [v for v in w.values() if mx.issubdtype(v.dtype, mx.floating)]
    assert len(floating) == len(w) > 0
    assert {v.dtype for v in floating} == {getattr(mx, dtype)}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype and "torch_dtype" not in config
    model, processor = load(out)
    assert model.dtype == getattr(mx, dtype)
    assert np.isfinite(last_logits(model, processor)).all()


# -- memory and shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_shard", [1, 4])
@pytest.mark.parametrize("options", [{}, {"dtype": "float16"}, {"quantize": True, "q_group_size": 64}])
def test_one_shard_in_memory_at_a_time(tiny_gqa, tmp_path, monkeypatch, options, per_shard):
    """With many small shards, MLX holds one shard when it writes one, not all before it.

    (The old converter held the model, the flat weights and every written shard: at the last
    write its active memory was ~the whole model.) Peak = a shard plus one source tensor, also
    when several tensors per shard are computed ahead of the one being waited for.
    """
    import mlx_lm.utils

    def chunks(weights, max_file_size_gb):
        items = list(weights.items())
        return [dict(items[i:i + per_shard]) for i in range(0, len(items), per_shard)]

    monkeypatch.setattr(mlx_lm.utils, "make_shards", chunks)
    real, at_write, sizes = mx.save_safetensors, [], []

    def record(path, arrays, *a, **kw):
        at_write.append(mx.get_active_memory())
        sizes.append(sum(v.nbytes for v in arrays.values()))
        return real(path, arrays, *a, **kw)

    monkeypatch.setattr(mx, "save_safetensors", record)
    source = max(v.nbytes for v in mx.load(str(tiny_gqa.hf_path / "model.safetensors")).values())
    mx.eval(mx.zeros(1))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    convert(str(tiny_gqa.hf_path), str(tmp_path / "out"), progress=False, **options)
    peak = mx.get_peak_memory() - base
    assert len(sizes) > 50 / per_shard and max(sizes) < 0.6 * sum(sizes)  # (the old one held ~all)
    assert max(a - base for a in at_write) <= max(sizes) + 4096, (at_write, sizes)
    assert peak <= max(sizes) + source + 4096, (peak, max(sizes), source)
    assert mx.get_active_memory() - base <= 4096  # nothing kept after the conversion


def test_many_shards(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setattr(CONVERT, "MAX_SHARD_GB", 0)
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "sharded"), progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) == len(index["weight_map"]) > 50
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for s in shards:
        assert all(index["weight_map"][k] == s.name for k in mx.load(str(s)))
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))
    model, processor = load(out)
    ref_model, ref_processor = tiny_gqa.mlx
    np.testing.assert_array_equal(last_logits(model, processor), last_logits(ref_model, ref_processor))


# -- input layouts ---------------------------------------------------------------------------------


@pytest.mark.torch
def test_transformers5_in_memory_key_names(tiny_gqa, tmp_path):
    """A checkpoint saved from a live transformers-5 model (`model.language_model.*`, `lm_head.*`)."""
    from safetensors.torch import save_file

    sd = tiny_gqa.hf_model.state_dict()
    assert any(k.startswith("model.language_model.") for k in sd) and "lm_head.weight" in sd
    folder = hf_copy(tiny_gqa, tmp_path / "live", weights=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    hub_model, hub_proc = load(tiny_gqa.hf_path)
    ref = last_logits(hub_model, hub_proc)
    np.testing.assert_array_equal(last_logits(*load(folder)), ref)
    out = convert(str(folder), str(tmp_path / "live-mlx"), progress=False)
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))
    np.testing.assert_array_equal(last_logits(*load(out)), ref)


def test_hub_style_sharded_checkpoint(tiny_gqa, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = hf_copy(tiny_gqa, tmp_path / "sharded", weights=False)
    w = load_file(str(tiny_gqa.hf_path / "model.safetensors"))
    keys = sorted(w)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    index = {"metadata": {"total_size": sum(v.nbytes for v in w.values())}, "weight_map": {}}
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: w[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not (folder / "model.safetensors").exists()
    hub_model, hub_proc = load(tiny_gqa.hf_path)
    np.testing.assert_array_equal(last_logits(*load(folder)), last_logits(hub_model, hub_proc))
    out = convert(str(folder), str(tmp_path / "sharded-mlx"), progress=False)
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))


# -- broken folders ---------------------------------------------------------------------------------


def _edit_config(**changes):
    def fn(d: Path):
        c = json.loads((d / "config.json").read_text())
        c.update(changes)
        (d / "config.json").write_text(json.dumps(c))
    return fn


def _edit_weights(fn):
    def edit(d: Path):
        from safetensors.numpy import load_file, save_file

        w = load_file(str(d / "model.safetensors"))
        fn(w)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
RESHAPED = "language_model.model.layers.0.self_attn.q_proj.weight"
BROKEN = {
    "no-config": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
    "bad-json": (lambda d: (d / "config.json").write_text('{"model_type": "qwen2_audio",'), ["not valid JSON"]),
    "other-model": (_edit_config(model_type="llama"), ["'llama'", "qwen2_audio"]),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), ["no model*.safetensors"]),
    "missing-key": (_edit_weights(lambda w: w.pop(MISSING)), ["Missing", MISSING]),
    "wrong-shape": (_edit_weights(lambda w: w.update({RESHAPED: np.zeros((64, 32), np.float32)})),
                    [RESHAPED, "(64, 32)"]),
    "extra-key": (_edit_weights(lambda w: w.update({"audio_tower.extra.weight": np.zeros(3, np.float32)})),
                  ["audio_tower.extra.weight"]),
    "not-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"),
                        ["cannot read the weight files"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_raises_model_error(tiny_gqa, tmp_path, case):
    breaker, words = BROKEN[case]
    folder = hf_copy(tiny_gqa, tmp_path / "bad")
    breaker(folder)
    with pytest.raises(ModelError) as e:
        load(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    for word in words:
        assert word in msg, f"{case}: {word!r} not in {msg!r}"
    # convert fails the same way and writes nothing: no output, no temp folder.
    with pytest.raises(ModelError):
        convert(str(folder), str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
