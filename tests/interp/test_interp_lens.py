"""The logit lens (`interp/lens.py`) and the per-layer audio-silence contrast against the PyTorch
reference (`mlx_listen_convert.reference.lens`: forward hooks, autograd for the Jacobian) on the
tiny models. Their final-norm weight is all ones, which would hide a wrong `w ⊙`: the lens tests
run with a random positive weight written into both models (`support.lens.norm_weight`)."""

from __future__ import annotations

import numpy as np
import pytest
from support import tone
from support.checks import close
from support.lens import norm_weight

from mlx_listen.interp.lens import LENSES, lens_vectors
from mlx_listen.interp.steering import Silence, read_residuals
from mlx_listen.prompt import prepare


@pytest.mark.torch
@pytest.mark.slow
def test_layer_differences_match_pytorch(tiny):
    from mlx_listen_convert.reference.lens import layer_differences

    clip, q = tone(1.4, 520.0, 7), "What is this?"
    ref = layer_differences(tiny.hf_model, tiny.hf_processor, [clip], q)
    model, processor = tiny.mlx
    prompt = prepare(model, processor, [clip], q)
    layers = list(range(len(model.layers)))
    a = read_residuals(model, prompt, layers)
    s = read_residuals(model, Silence(model).prompt(prompt), layers)
    close(np.stack([np.array(a[l] - s[l]) for l in layers]), ref["diff"])
    close(np.array(a[layers[-1]]), ref["final"])
    assert np.abs(ref["diff"]).max() > 1e-2, "audio and silence agree: a weak test"


@pytest.mark.torch
def test_lens_vectors_match_pytorch(tiny_gqa):
    from mlx_listen_convert.reference import lens as R

    model, _ = tiny_gqa.mlx
    rng = np.random.default_rng(3)
    hidden = model.config.text_config.hidden_size
    d = rng.standard_normal(hidden).astype(np.float32)
    h = (3 * rng.standard_normal(hidden) + 0.5 * d).astype(np.float32)  # not orthogonal to d
    with norm_weight(tiny_gqa):
        got = lens_vectors(model, d, h, alpha=1.5)
        ref = R.lens_vectors(tiny_gqa.hf_model, d, h, alpha=1.5)
        errs = {k: close(got[k], ref[k]) for k in LENSES}
        # the h-term matters here, so a lens that dropped it would fail
        assert np.abs(ref["jacobian"] - ref["direct"] / np.sqrt(np.mean(h**2) + 1e-6)).max() > 1e-2
    print("lens parity max |error|:", errs)


def test_jacobian_is_the_small_alpha_limit_of_exact(tiny_gqa):
    model, _ = tiny_gqa.mlx
    rng = np.random.default_rng(4)
    hidden = model.config.text_config.hidden_size
    d, h = rng.standard_normal(hidden), 2 * rng.standard_normal(hidden)
    v = lens_vectors(model, d, h, alpha=1e-2)
    assert np.abs(v["exact"] / 1e-2 - v["jacobian"]).max() <= 2e-2 * np.abs(v["jacobian"]).max()
