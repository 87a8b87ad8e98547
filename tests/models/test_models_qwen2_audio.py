"""The MLX Qwen2-Audio model against transformers, stage by stage (log-mel, encoder, projector,
every decoder layer, logits, greedy tokens), on the tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support import SR, tone
from support.checks import assert_close, check_greedy_matches_hf

from mlx_listen.audio import audio_features
from mlx_listen.hooks import RESID, Capture
from mlx_listen.prompt import prepare

pytestmark = pytest.mark.torch  # every test compares with transformers' outputs


# fp32 tolerances. Measured on these fixtures: logits ≈ 5e-6, hidden states ≈ 2e-6.
LOGITS_ATOL = 1e-4
STAGE_ATOL = 1e-4

# Features: the MLX log-mel vs transformers' torch STFT (see tests/test_audio.py for why the max
# is bounded at 1e-4 rather than 3e-5); the model stages below are fed HF's own features.
FEATURE_ATOL = 1e-4


def mlx_stages(model, processor, clips, question="What is this sound?", features=None):
    """Everything the MLX side computes for one prompt, as numpy.

    `features`: transformers' log-mel (clips, 128, 3000) to feed the encoder, so that later
    stages are compared on identical inputs; the MLX log-mel is compared separately.
    """
    feats = [audio_features(c) for c in clips]
    if features is not None:
        for f, mel in zip(feats, features):
            f.mel = mx.array(mel)
    prompt = prepare(model, processor, feats, question)
    enc, proj = prompt.encoder_out, prompt.audio_embeddings
    with Capture(model, "decoder.blocks.*.hook_resid_post", at=slice(0, None)) as cap:  # every position
        logits = model(mx.array(prompt.ids)[None], input_embeddings=prompt.embeddings[None])  # every position
        mx.eval(logits)
    hidden = [cap.get(RESID.format(i)) for i in range(len(model.layers))]
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731  (numpy has no bfloat16)
    return {
        "input_ids": np.array(prompt.ids),
        "mel": [f32(f.mel) for f in feats],
        "n_frames": [f.n_frames for f in feats],
        "encoder": np.concatenate([f32(e) for e in enc]),
        "projector": np.concatenate([f32(p) for p in proj]),
        "hidden_states": np.stack([f32(h[0]) for h in hidden]),
        "logits": f32(logits[0]),
        "prompt": prompt,
    }


def check_parity(tiny, key, clips, question="What is this sound?"):
    ref = tiny.reference(key, clips, question)
    model, processor = tiny.mlx
    out = mlx_stages(model, processor, clips, question, features=ref["input_features"])
    assert out["input_ids"].tolist() == ref["input_ids"].tolist()
    assert out["n_frames"] == ref["feature_attention_mask"].sum(-1).tolist()
    own = [audio_features(c) for c in clips]
    for f, mel in zip(own, ref["input_features"]):
        assert_close(f.mel, mel, FEATURE_ATOL, "log-mel")
    assert out["encoder"].shape == ref["encoder"].shape
    assert_close(out["encoder"], ref["encoder"], STAGE_ATOL, "encoder")
    assert_close(out["projector"], ref["projector"], STAGE_ATOL, "projector")
    assert out["hidden_states"].shape == ref["hidden_states"].shape
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref["hidden_states"])):
        assert_close(a, b, STAGE_ATOL, f"decoder layer {i} output")
    assert np.abs(ref["logits"]).max() > 1.0, "fixture logits are flat: the test would be weak"
    return assert_close(out["logits"], ref["logits"], LOGITS_ATOL, "logits")


@pytest.mark.parametrize("seconds", [0.2, 2.5, *(pytest.param(s, marks=pytest.mark.slow) for s in (29.99, 30.0, 45.0))])
def test_parity_clip_lengths(tiny, seconds):
    """Features, encoder, projector, every decoder layer and logits, over the 30 s window edges."""
    check_parity(tiny, f"len{seconds}", [tone(seconds, seed=int(seconds * 100))])


@pytest.mark.slow
def test_audio_token_counts_follow_length(tiny_gqa):
    model, processor = tiny_gqa.mlx
    counts = {s: prepare(model, processor, [tone(s)], "q").n_audio_tokens for s in (0.2, 2.5, 10.0, 29.99, 45.0)}
    ref = {s: int((tiny_gqa.reference(f"cnt{s}", [tone(s)], "q")["input_ids"] == model.config.audio_token_index).sum())
           for s in counts}
    assert counts == ref
    assert counts[2.5] < counts[10.0] < counts[29.99] == counts[45.0]


def test_two_clips_in_one_prompt(tiny):
    check_parity(tiny, "two", [tone(1.5, 330.0, 1), tone(3.2, 880.0, 2)], "Which clip is higher?")


@pytest.mark.slow
def test_greedy_tokens_match_hf_generate(tiny):
    check_greedy_matches_hf(tiny)


def test_stereo_44k_file(tiny_gqa, tmp_path):
    """A stereo 44.1 kHz file goes through load → mixdown → resample and matches HF on the result."""
    import soundfile as sf

    from mlx_listen.audio import load_audio

    t = np.arange(int(2.0 * 44100)) / 44100
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 1200 * t)], 1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo.astype(np.float32), 44100)
    audio = load_audio(path)
    assert abs(audio.size - 2.0 * SR) <= 2
    check_parity(tiny_gqa, "stereo", [audio])


@pytest.mark.slow
def test_bf16_drift_within_hf_own_drift(tiny, tmp_path):
    """bf16: the MLX model's error against HF fp32 is at most 2x HF bf16's own error against HF fp32."""
    from mlx_listen.load import load
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference import hf as R

    clips, q = [tone(3.0)], "What is this sound?"
    fp32 = tiny.reference("bf16-base", clips, q)
    hf16, hp = R.load_hf(tiny.hf_path, dtype="bfloat16", device="cpu")
    ref16 = R.run(hf16, hp, clips, q)
    model, processor = load(convert(str(tiny.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False))
    assert model.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    out = mlx_stages(model, processor, clips, q)
    for key in ("projector", "logits"):
        hf_err = np.abs(ref16[key] - fp32[key]).max()
        ours = np.abs(out[key] - fp32[key]).max()
        print(f"{tiny.name} {key}: HF bf16 drift {hf_err:.3g}, MLX bf16 error {ours:.3g}")
        assert 0 < hf_err, "HF bf16 equals fp32: the fixture cannot measure drift"
        assert ours <= 2 * hf_err, f"{key}: MLX bf16 error {ours:.3g} > 2x HF bf16 drift {hf_err:.3g}"
