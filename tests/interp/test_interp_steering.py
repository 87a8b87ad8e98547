"""Audio-silence steering (`interp/steering.py`) against the PyTorch implementation (forward hooks)
on the tiny models; zero strength bit for bit; the silence pass and its prefix cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support import tone

from mlx_listen.answers import generate
from mlx_listen.errors import ListenError
from mlx_listen.hooks import RESID, run_with_cache
from mlx_listen.interp.steering import Silence, SteerConfig, Steerer
from mlx_listen.prompt import prepare

Q = "Describe the audio."


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("at", ["all", "prompt"])
def test_steered_logits_and_tokens_match_pytorch(tiny, at):
    from mlx_listen_convert.reference.hf import run_steered

    clip, layers, alpha = tone(2.5), [0, 1], 1.5
    ref = run_steered(tiny.hf_model, tiny.hf_processor, [clip], Q, layers=layers, alpha=alpha, at=at,
                      max_new_tokens=24)
    model, processor = tiny.mlx
    prompt = prepare(model, processor, [clip], Q)
    st = Steerer(model, SteerConfig(layers=layers, alpha=alpha, at=at))
    d = np.array(st.direction(prompt))
    assert np.abs(d - ref["steer_direction"]).max() <= 1e-4 * max(1, np.abs(ref["steer_direction"]).max())
    with st.applied(prompt):
        logits = last_logits(model, prompt)
    assert np.abs(logits - ref["steered_logits_last"]).max() <= 1e-4
    unsteered = tiny.reference("greedy-steer", [clip], Q)["logits"][-1]
    assert np.abs(logits - unsteered).max() > 0.05, "steering had no visible effect: a weak test"
    eos = set(processor.tokenizer.eos_token_ids)
    hf = ref["steered_greedy_tokens"].tolist()
    hf = hf[: next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert st.generate(processor, prompt, max_tokens=24).tokens == hf


def last_logits(model, prompt) -> np.ndarray:
    return np.array(run_with_cache(model, prompt, [])[0][0])


def test_alpha_zero_is_bit_identical(tiny_gqa):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], Q)
    base = last_logits(model, prompt)
    st = Steerer(model, SteerConfig(layers=[0, 1], alpha=0.0))
    with st.applied(prompt):
        steered = last_logits(model, prompt)
    assert np.array_equal(base, steered)
    assert st.generate(processor, prompt, max_tokens=16).tokens == generate(model, processor, prompt, max_tokens=16).tokens
    assert model.hooks.active() == []


@pytest.mark.parametrize("n", [321, 16001, 40003, 77777])
def test_equal_length_silence_gives_same_tokens_for_odd_lengths(tiny_gqa, n):
    model, processor = tiny_gqa.mlx
    audio = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    a = prepare(model, processor, [audio], Q)
    s = prepare(model, processor, [np.zeros(n, np.float32)], Q)
    assert a.ids == s.ids and a.n_audio_tokens == s.n_audio_tokens
    silence = Silence(model)
    cached = silence.features(a.clips[0].n_frames)
    assert np.array_equal(np.array(cached), np.array(model.encode_audio(s.clips[0].mel, s.clips[0].n_frames)))
    assert np.array_equal(np.array(silence.prompt(a).embeddings), np.array(s.embeddings))


def test_short_silence_pass_equals_full_pass(tiny_gqa):
    """The silence pass runs only blocks 0..max(L*): the same residuals as the whole model's run."""
    model, processor = tiny_gqa.mlx
    clip = tone(3.1)
    prompt = prepare(model, processor, [clip], Q)
    silent = prepare(model, processor, [np.zeros_like(clip)], Q)
    _, cap = run_with_cache(model, silent, [RESID.format(0), RESID.format(1)])
    for layers in ([0], [0, 1], [1]):
        short = Steerer(model, SteerConfig(layers=layers)).silence_residuals(prompt)
        for l in layers:
            full = np.array(cap.resid(l, silent.last).astype(mx.float32))
            assert np.array_equal(np.array(short[l]), full)


@pytest.mark.slow
def test_silence_prefix_cache_gives_the_full_passes_residuals(tiny_gqa):
    """The silent prompt's KV up to the end of its clips is kept per (ids, clip lengths) and reused
    by other questions: every read, hit or miss, shallower or deeper, equals a full run's."""
    model, processor = tiny_gqa.mlx
    silence = Silence(model, prefix_size=2)

    def check(clips, question, layers):
        prompt = prepare(model, processor, clips, question)
        silent = prepare(model, processor, [np.zeros_like(c) for c in clips], question)
        _, cap = run_with_cache(model, silent, [RESID.format(l) for l in layers])
        got = silence.residuals(prompt, layers)
        for l in layers:
            full = np.array(cap.resid(l, silent.last).astype(mx.float32))
            np.testing.assert_allclose(np.array(got[l]), full, rtol=1e-5, atol=1e-5)

    a, b = tone(2.0), tone(3.3, 330)
    check([a], Q, [0])                                   # miss, depth 1
    assert len(silence._prefixes) == 1
    check([a], "Which instrument plays, and how fast?", [0])  # hit: another question, same length
    check([a], "What is it?", [0, 1])                    # deeper: recomputed in place of the shallower
    check([a], Q, [0])                                   # shallower hit from the deeper entry
    assert len(silence._prefixes) == 1 and len(next(iter(silence._prefixes.values()))) == 2
    check([b], Q, [1])                                   # another length: its own entry
    check([a, b], Q, [0, 1])                             # two clips: keyed on both lengths
    assert len(silence._prefixes) == 2                   # the oldest dropped
    check([a], Q, [0, 1])                                # and it still works after being dropped
    silence = Silence(model, prefix_size=0)              # keeps nothing: every read a miss
    check([a], Q, [0, 1])
    check([a], Q, [1])
    assert not silence._prefixes


def test_bad_configs_are_refused(tiny_gqa):
    model, _ = tiny_gqa.mlx
    with pytest.raises(ListenError):
        Steerer(model, SteerConfig(layers=[7]))
    with pytest.raises(ListenError):
        Steerer(model, SteerConfig(layers=[0], at="everywhere"))
    with pytest.raises(ListenError):
        Steerer(model, SteerConfig())
    with pytest.raises(ListenError, match="before the deepest read layer"):
        Steerer(model, SteerConfig(layers=[1], apply_layer=0))
    with pytest.raises(ListenError, match="does not exist"):
        Steerer(model, SteerConfig(layers=[0], apply_layer=5))


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("at", ["all", "prompt"])
def test_norm_matched_random_direction_matches_pytorch(tiny, at):
    """The experiment's random-direction control (a fixed random direction at the norm of each input's
    own audio-silence direction, `match_norm`) against its PyTorch reference (forward hooks): the
    direction, the steered logits and greedy tokens through hooks, and the tokens of the shared
    batched decode (`Answerer`) equal to the hooks' answer."""
    from mlx_listen.eval.conditions import Answerer, baseline, steered
    from mlx_listen_convert.reference.controls import run_norm_matched

    clip, layers, alpha = tone(2.5), [0, 1], 2.0
    model, processor = tiny.mlx
    v = np.random.default_rng(7).standard_normal(model.hidden_size).astype(np.float32)
    ref = run_norm_matched(tiny.hf_model, tiny.hf_processor, [clip], Q, layers=layers, vector=v, alpha=alpha, at=at,
                           max_new_tokens=24)
    prompt = prepare(model, processor, [clip], Q)
    cfg = SteerConfig(vector=v, layers=layers, match_norm=True, alpha=alpha, at=at)
    st = Steerer(model, cfg)
    d = np.array(st.direction(prompt))
    own = np.array(Steerer(model, SteerConfig(layers=layers)).direction(prompt))
    assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(own), rel=1e-5)  # the input's own norm
    assert np.abs(d - ref["direction"]).max() <= 1e-4 * max(1, np.abs(ref["direction"]).max())
    with st.applied(prompt):
        logits = last_logits(model, prompt)
    assert np.abs(logits - ref["steered_logits_last"]).max() <= 1e-4
    assert np.abs(logits - last_logits(model, prompt)).max() > 0.05, "the control had no visible effect: a weak test"
    eos = set(processor.tokenizer.eos_token_ids)
    hf = ref["steered_greedy_tokens"].tolist()
    hf = hf[: next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert st.generate(processor, prompt, max_tokens=24).tokens == hf
    batched = Answerer(model, processor, [baseline(), steered(cfg, "control")], max_tokens=24)(prompt)
    assert batched["control"].tokens == hf
