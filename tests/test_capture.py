"""Head-level capture against transformers' eager attention weights (`output_attentions`)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import tone

from mlx_listen.capture import AUDIO_MASS, ENC_PATTERN, PATTERN, Capture, run_with_cache
from mlx_listen.generate import generate, prepare


@pytest.fixture(scope="module")
def hf_eager(tiny):
    from mlx_listen.convert import reference as R

    return R.load_hf(tiny.hf_path, attn="eager", device="cpu")


def hf_attentions(hf_eager, clips, question, encoder_layer=None):
    """Decoder attention weights (and, optionally, one encoder layer's, via a forward hook)."""
    import torch
    from mlx_listen.convert.reference import hf_inputs

    model, proc = hf_eager
    inputs = hf_inputs(proc, clips, question)
    enc = []
    hook = None
    if encoder_layer is not None:
        hook = model.model.audio_tower.layers[encoder_layer].self_attn.register_forward_hook(
            lambda m, a, o: enc.append(o[1][0].float().numpy()))
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if hook:
        hook.remove()
    return inputs["input_ids"][0].numpy(), [a[0].float().numpy() for a in out.attentions], enc


def test_audio_mass_matches_hf_eager(tiny, hf_eager):
    clips, q = [tone(2.5), tone(1.2, 660.0, 3)], "Which clip is higher?"
    model, processor = tiny.mlx
    prompt = prepare(model, processor, clips, q)
    _, cap = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")
    T = len(prompt.ids) - 1
    ours = cap.audio_mass(T)
    ids, attn, _ = hf_attentions(hf_eager, clips, q)
    audio = np.flatnonzero(ids == model.config.audio_token_index)
    assert audio.tolist() == prompt.audio_positions.tolist()
    ref = np.stack([a[:, T, audio].sum(-1) for a in attn])  # (layers, heads)
    assert ours.shape == ref.shape == (len(model.layers), model.config.text_config.num_attention_heads)
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()
    assert 0.05 < ours.mean() < 0.95  # not a degenerate fixture: heads split attention


def test_full_pattern_matches_hf_eager(tiny, hf_eager):
    clips, q = [tone(1.0)], "What?"
    model, processor = tiny.mlx
    with Capture(model, ENC_PATTERN.format(0)) as enc_cap:  # the encoder runs in prepare()
        prompt = prepare(model, processor, clips, q)
    _, cap = run_with_cache(model, prompt, [PATTERN.format(1)])
    _, attn, hf_enc = hf_attentions(hf_eager, clips, q, encoder_layer=0)
    ours = np.array(cap.cache[PATTERN.format(1)][0][0])
    assert np.abs(ours - attn[1]).max() <= 1e-5
    enc = np.array(enc_cap.cache[ENC_PATTERN.format(0)][0][0])
    T = enc.shape[-1]
    assert enc.shape == (model.config.audio_config.encoder_attention_heads, T, T)
    # HF runs 1500 positions and masks keys past the clip: its valid block equals our pattern.
    assert np.abs(enc - hf_enc[0][:, :T, :T]).max() <= 1e-5
    assert np.abs(hf_enc[0][:, :T, T:]).max() == 0
    assert PATTERN.format(0) not in cap.cache  # only what was named


def test_capture_leaves_logits_bit_identical(tiny_gqa):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], "q")
    run = lambda: np.array(model(mx.array(prompt.ids)[None], input_embeddings=prompt.embeddings[None]))  # noqa: E731
    before = run()
    logits, cap = run_with_cache(model, prompt, ["decoder.blocks.*", "encoder.blocks.*"])
    assert np.array_equal(np.array(logits), before)
    assert np.array_equal(run(), before)
    assert all(not l.hooks and not l.self_attn.probes for l in model.layers), "hooks left installed"


def test_audio_mass_during_generation(tiny_gqa):
    """mlx-lm feeds T alone after the prefill: the probe sees T and every generated position."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], "Describe the audio.")
    T = len(prompt.ids) - 1
    with Capture(model, "decoder.blocks.*.attn.hook_audio_mass", prompt.audio_positions) as cap:
        ans = generate(model, processor, prompt, max_tokens=6)
    _, single = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")
    assert np.abs(cap.audio_mass(T) - single.audio_mass(T)).max() <= 1e-6
    gen = cap.audio_mass_generated(after=T)
    assert gen.shape[0] >= len(ans.tokens) - 1 and gen.shape[1:] == single.audio_mass(T).shape


def test_unknown_hook_name_is_refused(tiny_gqa):
    model, _ = tiny_gqa.mlx
    with pytest.raises(ValueError, match="no hook matches"):
        Capture(model, "decoder.blocks.0.hook_nonsense")
    assert AUDIO_MASS.format(3) == "decoder.blocks.3.attn.hook_audio_mass"
