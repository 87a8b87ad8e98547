"""Language-only quantisation (`mlx_listen_convert.convert -q`): which layers, a refused indivisible
group size, bits per weight, never twice, weights on their grid, and a logit error within a
bound derived from the weights' group ranges."""

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
from support.cli import user_error, warnings_of

from mlx_listen.answers import generate
from mlx_listen.errors import ModelError
from mlx_listen.load import load
from mlx_listen.prompt import prepare
from mlx_listen_convert.convert import convert

GROUP = 64  # the tiny model's hidden (64) and intermediate (128) sizes are multiples of it


@pytest.fixture(scope="module")
def quantised(tiny_gqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantised")
    return {bits: convert(str(tiny_gqa.hf_path), str(root / f"q{bits}"), quantize=True, q_bits=bits,
                          q_group_size=GROUP, progress=False) for bits in (4, 8)}


def quantisable(model, group: int) -> dict[str, bool]:
    """Every Linear/Embedding of the fp32 model → whether the converter must quantise it."""
    out = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            out[path] = path.startswith("language_model.") and m.weight.shape[-1] % group == 0
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_folder(tiny_gqa, quantised, bits):
    out = quantised[bits]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": GROUP, "bits": bits, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    w = tensors(out)
    expected = quantisable(tiny_gqa.mlx[0], GROUP)
    assert sum(expected.values()) == 16  # embedding, 7 per layer × 2, lm_head: all of the decoder
    for path, q in expected.items():
        assert (f"{path}.scales" in w) == q, path
    assert not [k for k in w if k.endswith((".scales", ".biases")) and not k.startswith("language_model.")]
    assert all(v.dtype == mx.float32 for k, v in w.items()
               if k.startswith(("audio_tower.", "multi_modal_projector.")))
    assert f"{bits}-bit" in (out / "README.md").read_text()


def test_group_size_must_divide_every_width(tiny_gqa, tmp_path):
    """g = 128 divides only down_proj's input (128): refuse, rather than leave 14 of 16 layers in float."""
    with pytest.raises(ModelError) as e:
        convert(str(tiny_gqa.hf_path), str(tmp_path / "g128"), quantize=True, q_bits=4, q_group_size=128,
                progress=False)
    msg = str(e.value)
    bad = sorted(p for p, q in quantisable(tiny_gqa.mlx[0], 128).items() if p.startswith("language_model.") and not q)
    assert len(bad) == 14 and "14 of the 16 layers" in msg and "\n" not in msg
    assert "language_model.model.embed_tokens has 64" in msg
    # the message names some of the layers and counts the rest: together, every layer left out
    named = re.findall(r"(language_model\.\S+) has \d+", msg)
    assert named and set(named) <= set(bad) and f"; {len(bad) - len(named)} more" in msg
    assert msg.endswith("use --q-group-size 32 or 64")
    assert list(tmp_path.iterdir()) == []
    for g in (32, 64):  # what it suggests works, and quantises every decoder layer
        out = convert(str(tiny_gqa.hf_path), str(tmp_path / f"g{g}"), quantize=True, q_group_size=g, progress=False)
        assert sum(k.endswith(".scales") for k in tensors(out)) == 16


def test_command_group_size_that_does_not_divide_is_not_silent(tiny_gqa, tmp_path):
    out = tmp_path / "g128"
    res = invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out, "-q", "--q-group-size", "128")
    if res.exit_code == 0:
        assert any("128" in w for w in warnings_of(res)), res.stderr
    else:
        user_error(res, "128")
        assert list(tmp_path.iterdir()) == []


def test_bits_per_weight_on_stderr(tiny_gqa, tmp_path, capsys):
    convert(str(tiny_gqa.hf_path), str(tmp_path / "quiet"), quantize=True, progress=False)
    assert capsys.readouterr() == ("", "")
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "loud"), quantize=True, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    m = re.search(r"^\[INFO\] Quantized model with (\d+\.\d{3}) bits per weight\.$", captured.err, re.M)
    assert m, captured.err
    w = tensors(out)  # bits per weight = stored bits / parameters (a quantised weight holds 32/bits per uint32)
    params = sum(v.size * (32 // 4 if v.dtype == mx.uint32 else 1) for k, v in w.items()
                 if not k.endswith((".scales", ".biases")))
    assert float(m.group(1)) == pytest.approx(8 * sum(v.nbytes for v in w.values()) / params, abs=1e-3)


def test_refuses_to_quantise_twice(quantised, tmp_path):
    with pytest.raises(ModelError, match="already quantised"):
        convert(str(quantised[4]), str(tmp_path / "again"), quantize=True, progress=False)
    assert list(tmp_path.iterdir()) == []


# Error model (first principles). Affine b-bit quantisation of a group of g weights uses the grid
# bias + s·{0..2^b-1}, s = (max - min)/(2^b - 1). Rounding to the nearest grid point errs by at
# most s/2; MLX also shifts the grid so that 0 is exact (s' = edge/round(edge/s), edge the
# larger-magnitude extreme, |edge| >= (max - min)/2), which moves the far end of the grid by at
# most (2^b - 1)·|s' - s| <= s/2 more, so |Δw| < s per weight. Rounding errors behave as
# independent uniform noise of variance s²/12. For y = W x with W's entries of RMS σ_W (the
# random init), E[Δy_j²] = ‖x‖²·s_rms²/12 and E[y_j²] = ‖x‖²·σ_W², so each quantised matrix adds a
# relative error ρ = s_rms / (√12·σ_W). For N(0, σ²) weights the expected range of 64 samples is
# ≈ 4.7σ, so ρ ≈ 4.7 / (√12·(2^b - 1)): ≈ 0.09 at 4 bits, ≈ 0.005 at 8 bits; we compute ρ from
# the fp32 weights' actual group ranges. The K quantised matrices on the way to the logits
# (embedding, 7 per decoder layer, lm_head) inject independent errors that add in quadrature, and
# RMSNorm keeps the residual stream's relative error from growing, so the relative RMS logit error
# is ≈ √K·ρ. The bound allows 2× that for the nonlinearities (softmax, SiLU gate) and the
# finite-sample scatter. 8-bit error should be ≈ (2^8-1)/(2^4-1) = 17× smaller than 4-bit;
# we require > 8×.
def predicted_rho(model, paths, bits, group=GROUP) -> float:
    """Mean per-matrix relative noise ρ from the fp32 weights' group ranges (see above)."""
    params = dict(tree_flatten(model.parameters()))
    rhos = []
    for p in paths:
        w = np.array(params[f"{p}.weight"], dtype=np.float64)
        g = w.reshape(w.shape[0], -1, group)
        s = (g.max(-1) - g.min(-1)) / (2**bits - 1)
        rhos.append(math.sqrt((s**2).mean() / 12) / math.sqrt((w**2).mean()))
    return float(np.mean(rhos))


def test_quantised_weights_stay_on_their_grid(tiny_gqa, quantised):
    """Dequantised stored weights are within s = (max - min)/(2^b - 1) of the fp32 weights."""
    fp32 = dict(tree_flatten(tiny_gqa.mlx[0].parameters()))
    for bits, out in quantised.items():
        w = tensors(out)
        paths = [k.removesuffix(".scales") for k in w if k.endswith(".scales")]
        for p in paths:
            deq = np.array(mx.dequantize(w[f"{p}.weight"], w[f"{p}.scales"], w[f"{p}.biases"],
                                         group_size=GROUP, bits=bits))
            ref = np.array(fp32[f"{p}.weight"])
            g = ref.reshape(ref.shape[0], -1, GROUP)
            s = (g.max(-1) - g.min(-1)) / (2**bits - 1)
            err = np.abs(deq - ref).reshape(g.shape)
            assert (err <= s[..., None] * (1 + 1e-5) + 1e-7).all(), f"{bits}-bit {p}"


def test_quantised_logits_error_is_bounded(tiny_gqa, quantised):
    model, processor = tiny_gqa.mlx
    ref = last_logits(model, processor)  # tone(1.0), "q": a prompt whose top-1 margin is clear
    errs, maxabs, first = {}, {}, {}
    for bits, out in quantised.items():
        qmodel, qproc = load(out)
        paths = [p for p, q in quantisable(model, GROUP).items() if q]
        rho = predicted_rho(model, paths, bits)
        bound = 2 * math.sqrt(len(paths)) * rho
        d = last_logits(qmodel, qproc) - ref
        errs[bits] = float(np.linalg.norm(d) / np.linalg.norm(ref))
        maxabs[bits] = float(np.abs(d).max())
        print(f"{bits}-bit: rel RMS logit error {errs[bits]:.4f} (rho {rho:.4f}, bound {bound:.4f}), "
              f"max abs {maxabs[bits]:.4f}")
        assert rho / 2 < errs[bits] <= bound, f"{bits}-bit relative logit error {errs[bits]:.4g}, bound {bound:.4g}"
        ans = generate(qmodel, qproc, prepare(qmodel, qproc, [tone(1.0)], "q"), max_tokens=6)
        assert len(ans.tokens) >= 1 and all(0 <= t < qmodel.config.text_config.vocab_size for t in ans.tokens)
        first[bits] = ans.tokens[0]
    assert errs[8] < errs[4] / 8
    # Greedy: if every logit moves by less than half the top-1 margin, the argmax cannot change.
    top2 = np.sort(ref)[-2:]
    assert top2[1] - top2[0] > 2 * maxabs[8], "fixture prompt's top-1 margin is too small for this check"
    fp32_first = generate(model, processor, prepare(model, processor, [tone(1.0)], "q"), max_tokens=1).tokens[0]
    assert first[8] == fp32_first == int(ref.argmax())
