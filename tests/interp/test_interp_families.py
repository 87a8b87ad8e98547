"""The mechanisms on Audio Flamingo 3 and the Qwen2.5-Omni thinker against transformers (fp32, the
PyTorch reference side's forward hooks), at Qwen2-Audio's tolerances: per-head audio mass and the
listening score, audio-silence steering (direction, logits, greedy tokens), head ablation and audio
masking, option log-probs (plain and steered), activation patching. The method code is the same for
every family; only the model differs."""

from __future__ import annotations

import numpy as np
import pytest
from support import tone
from support.checks import check_patching_matches_hf

from mlx_listen import presets
from mlx_listen.answers import generate, prefill
from mlx_listen.headset import listening
from mlx_listen.hooks import run_with_cache
from mlx_listen.interp import scoring
from mlx_listen.interp.ablation import Ablation
from mlx_listen.interp.edit import Row
from mlx_listen.interp.steering import Silence, SteerConfig, Steerer
from mlx_listen.prompt import prepare

pytestmark = [pytest.mark.torch, pytest.mark.slow]
Q = "Describe the audio."
HEADS = [(0, 1), (1, 0), (1, 3)]
ITEM = {"question": "Who is speaking?", "choices": ["Man", "A woman", "Child", "A robot, very loud"], "answer": "Man"}


def _case(tiny_root, name):
    from support.families import family_model

    from mlx_listen_convert.reference import hf as R

    t = family_model(tiny_root, name)
    return t, R.load_hf(t.hf_path, attn="eager", device="cpu")


@pytest.fixture(scope="module", params=["af3-gqa", "omni-gqa", "af3-mha", "omni-mha"])
def case(request, tiny_root):
    """(tiny checkpoint, transformers' model with eager attention and its processor)."""
    return _case(tiny_root, request.param)


@pytest.fixture(scope="module", params=["af3-gqa", "omni-gqa"])
def gqa_case(request, tiny_root):
    """The same for the GQA variants only (the costlier checks; MHA differs only in the KV heads)."""
    return _case(tiny_root, request.param)


def until_eos(model, toks):
    eos = set(model.generation_config.eos_token_id or [])
    return toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))]


def hf_logits_and_tokens(model, processor, clips, question, n):
    import torch

    from mlx_listen_convert.reference.hf import hf_inputs

    inputs = hf_inputs(processor, clips, question)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float().numpy()
        gen = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return logits, until_eos(model, gen[0, inputs["input_ids"].shape[1]:].tolist())


def last_logits(model, prompt):
    return np.array(run_with_cache(model, prompt, [])[0][0])


def test_audio_mass_and_listening(case):
    from mlx_listen_convert.reference import hf as R

    t, (hf, hp) = case
    model, processor = t.mlx
    clip = tone(2.5)
    prompt = prepare(model, processor, [clip], Q)
    _, cap = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")
    ours = cap.audio_mass(prompt.last)
    ref = R.run(hf, hp, [clip], Q)["audio_mass"]
    assert ours.shape == ref.shape == (model.n_layers, model.n_heads)
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()
    assert 0.05 < ours.mean() < 0.95  # heads split their attention: not a degenerate fixture
    assert abs(listening(ours, HEADS) - np.mean([ref[l, h] for l, h in HEADS])) <= 1e-5


def test_steering_matches_pytorch(case):
    from mlx_listen_convert.reference.hf import run_steered

    t, _ = case
    clip, layers, alpha = tone(2.5), [0, 1], 1.5
    ref = run_steered(t.hf_model, t.hf_processor, [clip], Q, layers=layers, alpha=alpha, at="all", max_new_tokens=24)
    model, processor = t.mlx
    prompt = prepare(model, processor, [clip], Q)
    st = Steerer(model, SteerConfig(layers=layers, alpha=alpha))
    d = np.array(st.direction(prompt))
    assert np.abs(d - ref["steer_direction"]).max() <= 1e-4 * max(1, np.abs(ref["steer_direction"]).max())
    with st.applied(prompt):
        logits = last_logits(model, prompt)
    assert np.abs(logits - ref["steered_logits_last"]).max() <= 1e-4
    assert np.abs(logits - last_logits(model, prompt)).max() > 0.05, "steering had no visible effect: a weak test"
    assert st.generate(processor, prompt, max_tokens=24).tokens == until_eos(t.hf_model,
                                                                            ref["steered_greedy_tokens"].tolist())
    # the silence side is the family's own front end: equal-length digital silence through the model
    silent = prepare(model, processor, [np.zeros_like(clip)], Q)
    assert np.array_equal(np.array(Silence(model).prompt(prompt).embeddings), np.array(silent.embeddings))


@pytest.mark.parametrize("kw", [dict(mode="zero"), dict(audio=True)], ids=["zero", "audio"])
def test_ablation_matches_pytorch(case, kw):
    from mlx_listen_convert.reference.ablation import ablated

    t, (hf, hp) = case
    model, processor = t.mlx
    clip = tone(2.5)
    prompt = prepare(model, processor, [clip], Q)
    with Ablation(HEADS, **kw).hooks(model, prompt):
        ours = last_logits(model, prompt)
        ours_tokens = generate(model, processor, prompt, max_tokens=16).tokens
    with ablated(hf, HEADS, mode="zero", audio_positions=prompt.audio_positions if kw.get("audio") else None):
        ref, ref_tokens = hf_logits_and_tokens(hf, hp, [clip], Q, 16)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    assert ours_tokens == ref_tokens
    assert np.abs(ours - last_logits(model, prompt)).max() > 1e-3, "the ablation changed nothing: a weak test"


@pytest.mark.parametrize("preset", ["r1-aqa", "mmau"])
def test_option_logprobs_match_transformers(gqa_case, preset):
    from mlx_listen_convert.reference.hf import option_logprobs_hf

    t, _ = gqa_case
    model, processor = t.mlx
    clip, q = tone(2.0), presets.build_prompt(ITEM, preset)
    prompt = prepare(model, processor, [clip], q)
    options = scoring.option_ids(processor, prompt, ITEM["choices"], preset)
    lp = scoring.option_logprobs(model, processor, prompt, ITEM["choices"], preset)
    ref = option_logprobs_hf(t.hf_model, t.hf_processor, [clip], q, [presets.continuation(preset, c)
                                                                       for c in ITEM["choices"]])
    assert ref["ids"] == options
    assert np.abs(lp[0] - ref["sums"]).max() <= 1e-4
    assert np.ptp(lp) > 1.0, "options score alike: a weak test"
    delta = 2.0 * Steerer(model, SteerConfig(layers=[0, 1])).direction(prompt)
    steered = scoring.score_options(model, prefill(model, prompt), options, [Row(delta, True)])
    ref = option_logprobs_hf(t.hf_model, t.hf_processor, [clip], q, options, steer=np.array(delta), at="all")
    assert np.abs(steered[0] - ref["sums"]).max() <= 1e-4
    assert np.abs(steered[0] - lp[0]).max() > 0.05, "steering had no visible effect: a weak test"


@pytest.mark.parametrize("kind", ["audio", "head"])
def test_patching_matches_pytorch(gqa_case, kind):
    t, _ = gqa_case
    check_patching_matches_hf(t, kind, Q, "<answer>dog</answer>")
