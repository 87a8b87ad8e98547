"""Every quantisation mlx-lm has (`mlx_listen_convert.quantize`): affine 2-8 bits, mxfp4, nvfp4, mxfp8,
the mixed recipes (per-path entries in config.json that mlx-lm's own loader reads), the audio tower on
request, `--dequantize`; refusals before any work; bits per weight per part.

Each mode's logit error is held to a bound from its own measured weight error: ρ_i = ‖Ŵ_i − W_i‖ / ‖W_i‖
per quantised matrix, errors adding in quadrature along the path (test_convert_quantise.py derives
it for affine; it uses nothing affine-specific), so the relative RMS logit error ≤ 2·√(Σ ρ_i²)."""

from __future__ import annotations

import json
import math
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from support import invoke, tone
from support.checkpoints import last_logits, tensors
from support.cli import user_error

from mlx_listen.answers import generate
from mlx_listen.errors import ModelError
from mlx_listen.load import load
from mlx_listen.prompt import prepare
from mlx_listen_convert.convert import convert

# name -> convert() keyword arguments; the tiny model's widths (64, 128; tower 32, 64) divide 16/32/64
MODES = {
    "affine2": dict(q_bits=2), "affine3": dict(q_bits=3), "affine5": dict(q_bits=5), "affine6": dict(q_bits=6),
    "mxfp4": dict(q_mode="mxfp4"), "nvfp4": dict(q_mode="nvfp4"), "mxfp8": dict(q_mode="mxfp8"),
    "mixed_2_6": dict(quant_predicate="mixed_2_6"), "mixed_3_4": dict(quant_predicate="mixed_3_4"),
    "mixed_3_6": dict(quant_predicate="mixed_3_6"), "mixed_4_6": dict(quant_predicate="mixed_4_6"),
}
EXPECT = {  # (mode, group, set of bits) each mode must write
    "affine2": ("affine", 64, {2}), "affine3": ("affine", 64, {3}), "affine5": ("affine", 64, {5}),
    "affine6": ("affine", 64, {6}), "mxfp4": ("mxfp4", 32, {4}), "nvfp4": ("nvfp4", 16, {4}),
    "mxfp8": ("mxfp8", 32, {8}), "mixed_2_6": ("affine", 64, {2, 6}), "mixed_3_4": ("affine", 64, {3, 4}),
    "mixed_3_6": ("affine", 64, {3, 6}), "mixed_4_6": ("affine", 64, {4, 6}),
}


@pytest.fixture(scope="module")
def folders(tiny_gqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {n: convert(str(tiny_gqa.hf_path), str(root / n), quantize=True, progress=False, **kw)
            for n, kw in MODES.items()}


def decoder_paths(model) -> list[str]:
    return [p for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
            if p.startswith("language_model.") and hasattr(m, "to_quantized")]


def weight_errors(fp32_model, qmodel) -> dict[str, float]:
    """ρ per quantised matrix: the loaded (dequantised) weight against the fp32 one."""
    ref = dict(tree_flatten(fp32_model.parameters()))
    mods = dict(tree_flatten(qmodel.leaf_modules(), is_leaf=nn.Module.is_module))
    out = {}
    for p, m in mods.items():
        if "scales" in m:
            deq = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)
            w = np.array(ref[f"{p}.weight"], np.float64)
            out[p] = float(np.linalg.norm(np.array(deq.astype(mx.float32), np.float64) - w) / np.linalg.norm(w))
    return out


@pytest.mark.parametrize("name", list(MODES))
def test_mode_converts_loads_and_answers(tiny_gqa, folders, name):
    out = folders[name]
    mode, group, bits = EXPECT[name]
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert config["quantization_config"] == q and q["mode"] == mode and q["group_size"] == group
    per = {k: v for k, v in q.items() if isinstance(v, dict)}
    fp32, processor = tiny_gqa.mlx
    paths = decoder_paths(fp32)
    if name.startswith("mixed"):  # every decoder layer has its own entry, mlx-lm's recipe decides the bits
        assert sorted(per) == sorted(paths) and {v["bits"] for v in per.values()} == bits
        assert per["language_model.lm_head"]["bits"] == max(bits)
        assert per["language_model.model.layers.1.mlp.down_proj"]["bits"] == max(bits)  # the last eighth
        assert per["language_model.model.layers.0.mlp.down_proj"]["bits"] == min(bits)
    else:
        assert not per and q["bits"] == next(iter(bits))
    w = tensors(out)
    assert sorted(k.removesuffix(".scales") for k in w if k.endswith(".scales")) == sorted(paths)
    assert ("language_model.model.layers.0.mlp.up_proj.biases" in w) == (mode == "affine")
    assert all(v.dtype == mx.float32 for k, v in w.items() if k.startswith(("audio_tower.", "multi_modal_projector.")))

    qmodel, qproc = load(out)  # the loader builds each layer with its own mode, group and bits
    mods = dict(tree_flatten(qmodel.leaf_modules(), is_leaf=nn.Module.is_module))
    for p in paths:
        m = mods[p]
        assert isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.mode == mode and m.group_size == group
        assert m.bits == (per[p]["bits"] if per else next(iter(bits))), p
    rho = weight_errors(fp32, qmodel)
    assert set(rho) == set(paths)
    bound = 2 * math.sqrt(sum(r * r for r in rho.values()))
    ref = last_logits(fp32, processor)
    err = float(np.linalg.norm(last_logits(qmodel, qproc) - ref) / np.linalg.norm(ref))
    assert 0 < err <= bound, f"{name}: relative logit error {err:.4g}, bound {bound:.4g}"
    ans = generate(qmodel, qproc, prepare(qmodel, qproc, [tone(1.0)], "q"), max_tokens=3)
    assert ans.tokens and all(0 <= t < qmodel.vocab_size for t in ans.tokens)


def test_more_bits_less_error(tiny_gqa, folders):
    fp32, _ = tiny_gqa.mlx
    mean = {n: np.mean(list(weight_errors(fp32, load(folders[n])[0]).values())) for n in ("affine2", "affine3",
                                                                                         "affine5", "affine6")}
    assert mean["affine2"] > mean["affine3"] > mean["affine5"] > mean["affine6"]
    mixed = {n: np.mean(list(weight_errors(fp32, load(folders[n])[0]).values())) for n in ("mixed_2_6", "mixed_4_6")}
    assert mixed["mixed_2_6"] > mixed["mixed_4_6"]


def test_audio_tower_on_request(tiny_gqa, tmp_path, capsys):
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "tower"), quantize=True, q_mode="mxfp4",
                  quantize_audio_tower=True, progress=True)
    err = capsys.readouterr().err
    m = re.search(r"^\[INFO\] Bits per weight: audio tower (\S+), projector (\S+), language model (\S+)$", err, re.M)
    assert m, err
    tower, projector, lm = map(float, m.groups())
    assert projector == 32.0 and lm < 8 and tower < 32  # projector float, tower's linears mxfp4, convs float
    w = tensors(out)
    q = {k.removesuffix(".scales") for k in w if k.endswith(".scales")}
    assert {p for p in q if p.startswith("audio_tower.")} == {
        f"audio_tower.layers.{i}.{p}" for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")}
    assert w["audio_tower.embed_positions.weight"].dtype == mx.float32 and w["audio_tower.conv1.weight"].ndim == 3
    model, proc = load(out)
    assert isinstance(model.audio_tower.layers[0].fc1, nn.QuantizedLinear)
    ref = last_logits(*tiny_gqa.mlx)
    assert np.isfinite(last_logits(model, proc)).all() and last_logits(model, proc).shape == ref.shape


def test_recipe_with_audio_tower_records_its_bits(tiny_gqa, tmp_path):
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "mixed-tower"), quantize=True, quant_predicate="mixed_3_6",
                  q_group_size=32, quantize_audio_tower=True, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["audio_tower.layers.0.fc1"] == {"group_size": 32, "bits": 6, "mode": "affine"}
    load(out)


def test_dequantize_round_trip(tiny_gqa, folders, tmp_path, capsys):
    """-d writes float weights equal to the quantised ones dequantised: the same answers, in float."""
    src = folders["mxfp8"]
    out = convert(str(src), str(tmp_path / "deq"), dequantize=True, progress=True)
    assert "Dequantized model with 32.000 bits per weight" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    w = tensors(out)
    assert not [k for k in w if k.endswith((".scales", ".biases")) and "proj" in k and w[k].dtype == mx.uint8]
    assert all(v.dtype == mx.float32 for v in w.values())
    qmodel, qproc = load(src)
    model, proc = load(out)
    np.testing.assert_allclose(last_logits(model, proc), last_logits(qmodel, qproc), rtol=0, atol=2e-2)
    with pytest.raises(ModelError, match="not quantised"):
        convert(str(out), str(tmp_path / "again"), dequantize=True, progress=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(q_mode="mxfp4", q_group_size=64), ["--q-mode mxfp4", "groups of 32", "--q-group-size 64", "affine"]),
    (dict(q_mode="nvfp4", q_bits=8), ["--q-mode nvfp4", "groups of 16", "--q-bits 8"]),
    (dict(q_mode="mxfp8", q_bits=4, q_group_size=16), ["--q-bits 4", "--q-group-size 16", "drop them"]),
    (dict(q_group_size=16), ["32/64/128", "not 16", "--q-mode nvfp4"]),
    (dict(q_bits=7), ["2/3/4/5/6/8", "not 7"]),
    (dict(quant_predicate="mixed_3_6", q_mode="mxfp4"), ["affine recipe", "--q-mode mxfp4"]),
    (dict(quant_predicate="mixed_3_6", q_bits=4), ["sets the bits", "--q-bits 4"]),
    (dict(q_group_size=128), ["does not divide", "use --q-group-size 32 or 64"]),
    (dict(q_group_size=64, quantize_audio_tower=True), ["does not divide", "audio_tower.", "32",
                                                          "leave out --quantize-audio-tower"]),
    (dict(quantize=False, q_mode="mxfp4"), ["--q-mode", "only applies with -q"]),
    (dict(dequantize=True), ["-d/--dequantize", "choose one"]),
    (dict(quantize=False, dequantize=True), ["not quantised"]),
])
def test_refusals_before_any_work(tiny_gqa, tmp_path, kwargs, words):
    kw = dict(quantize=True, progress=False) | kwargs
    with pytest.raises(ModelError) as e:
        convert(str(tiny_gqa.hf_path), str(tmp_path / "out"), **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert list(tmp_path.iterdir()) == []


def test_command_modes_and_refusals(tiny_gqa, tmp_path):
    out = tmp_path / "nv"
    r = invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out, "-q", "--q-mode", "nvfp4")
    assert r.exit_code == 0, r.output
    assert "Bits per weight: audio tower 32.000, projector 32.000, language model" in r.stderr and r.stdout == ""
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == "nvfp4"
    bad = invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", tmp_path / "x", "-q", "--q-mode", "mxfp8",
                 "--q-group-size", "64")
    user_error(bad, "--q-mode mxfp8", "groups of 32")
    bad = invoke("convert", "--hf-path", out, "--mlx-path", tmp_path / "y", "-q", "-d")
    user_error(bad, "choose one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nv"]
    r = invoke("convert", "--hf-path", out, "--mlx-path", tmp_path / "deq", "-d")
    assert r.exit_code == 0, r.output
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())


def test_fp4_in_row_blocks_is_identical(tiny_gqa, folders, tmp_path, monkeypatch):
    """MLX's CPU fp4 kernels are quantised a block of rows at a time (their memory): the same bytes."""
    from support.checkpoints import assert_same_tensors

    from mlx_listen_convert import quantize as Q

    monkeypatch.setattr(Q, "CHUNK", 1000)  # every decoder matrix of the tiny model in several blocks
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "nv"), quantize=True, q_mode="nvfp4", progress=False)
    assert not Q.BLOCKS
    assert_same_tensors(tensors(out), tensors(folders["nvfp4"]))
