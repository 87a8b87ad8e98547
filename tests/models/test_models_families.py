"""Audio Flamingo 3 and the Qwen2.5-Omni thinker against transformers, stage by stage (log-mel, encoder,
projector, every decoder layer, logits, greedy tokens), on tiny random checkpoints in the hub's key
layout (GQA and MHA, sharded and single-file, both config styles), fp32 on the CPU, at the same
tolerances as Qwen2-Audio (`test_models_qwen2_audio.py`)."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from support import tone
from support.checks import assert_close, check_greedy_matches_hf
from support.families import valid_features, with_features

from mlx_listen.errors import ListenError, TruncatedAudioWarning
from mlx_listen.hooks import RESID, Capture
from mlx_listen.prompt import prepare

pytestmark = pytest.mark.torch

LOGITS_ATOL = STAGE_ATOL = FEATURE_ATOL = 1e-4  # Qwen2-Audio's
Q = "What is this sound?"


def stages(model, processor, feats, question=Q):
    prompt = prepare(model, processor, feats, question)
    with Capture(model, "decoder.blocks.*.hook_resid_post", at=slice(0, None)) as cap:
        logits = model(mx.array(prompt.ids)[None], input_embeddings=prompt.embeddings[None])
        mx.eval(logits)
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    return prompt, {
        "encoder": np.concatenate([f32(e) for e in prompt.encoder_out]),
        "projector": np.concatenate([f32(p) for p in prompt.audio_embeddings]),
        "hidden_states": np.stack([f32(cap.get(RESID.format(i))[0]) for i in range(model.n_layers)]),
        "logits": f32(logits[0]),
    }


def rows_of(ref, n_clips):
    """The processor's feature rows of each clip (one per clip; AF3: one per window, windows in order)."""
    rows = np.arange(len(ref["input_features"]))
    return np.array_split(rows, n_clips) if n_clips == 1 else [[i] for i in rows]


def check_parity(t, key, clips, question=Q):
    ref = t.reference(key, clips, question)
    model, processor = t.mlx
    own = [model.front_end.features(c) for c in clips]
    assert sum(f.n_frames for f in own) == int(ref["feature_attention_mask"].sum())
    if len(clips) == 1:  # the MLX front end against the processor's log-mel, valid frames
        assert_close(np.array(own[0].valid()), valid_features(ref), FEATURE_ATOL, "log-mel")
    feats = [with_features(f, ref, r) for f, r in zip(own, rows_of(ref, len(clips)))]
    prompt, out = stages(model, processor, feats, question)
    assert prompt.ids == ref["input_ids"].tolist()
    assert prompt.n_audio_tokens == int((ref["input_ids"] == model.audio_token_id).sum()) > 0
    assert out["encoder"].shape == ref["encoder"].shape
    assert_close(out["encoder"], ref["encoder"], STAGE_ATOL, "encoder")
    assert_close(out["projector"], ref["projector"], STAGE_ATOL, "projector")
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref["hidden_states"])):
        assert_close(a, b, STAGE_ATOL, f"decoder layer {i} output")
    assert np.abs(ref["logits"]).max() > 1.0, "fixture logits are flat: the test would be weak"
    return assert_close(out["logits"], ref["logits"], LOGITS_ATOL, "logits")


@pytest.mark.parametrize("seconds", [2.5, pytest.param(35.2, marks=pytest.mark.slow)])
def test_parity_stages(fam, seconds):
    """Log-mel, encoder, projector, every decoder layer and logits; 35.2 s: AF3's two windows (3000 + 520
    frames -> 750 + 130 tokens), Omni's one spectrogram (880 tokens), not cut at 30 s."""
    check_parity(fam, f"len{seconds}", [tone(seconds, seed=int(seconds * 10))])


def test_clip_over_30s_keeps_every_token(af3, omni):
    for t in (af3, omni):
        ref = t.reference("len35.2", [tone(35.2, seed=352)], Q)
        assert int((ref["input_ids"] == t.mlx[0].audio_token_id).sum()) == 880
    check_parity(omni, "len31", [tone(31.0, seed=31)])


def test_two_clips_omni(omni):
    check_parity(omni, "two", [tone(1.5, 330.0, 1), tone(3.2, 880.0, 2)], "Which clip is higher?")


def test_af3_takes_one_clip_per_turn(af3):
    """AF3's template writes one `<sound>` per turn (transformers' processor needs one clip per text)."""
    model, processor = af3.mlx
    with pytest.raises(ListenError, match="1 audio placeholders but 2 clips.*one audio placeholder per turn"):
        prepare(model, processor, [tone(1.0), tone(1.2)], Q)


@pytest.mark.slow
def test_greedy_tokens_match_hf_generate(fam):
    check_greedy_matches_hf(fam)


@pytest.mark.slow
@pytest.mark.parametrize("kind, seconds, limit", [("af3", 610.0, 600.0), ("omni", 305.0, 300.0)])
def test_past_the_limit_warns_and_matches_hf(af3, omni, kind, seconds, limit):
    """Past the family's limit the clip is cut where transformers cuts it, with one warning saying so; the
    token count, log-mel and projected audio tokens match transformers' (its processor and audio stage; the
    decoder over 7500-15000 positions is the same code the shorter clips test)."""
    import torch

    from mlx_listen_convert.reference import hf as R

    t = {"af3": af3, "omni": omni}[kind]
    clip = tone(seconds, seed=7)
    model, processor = t.mlx
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = model.front_end.features(clip, "long.wav")
    msgs = [str(w.message) for w in caught if issubclass(w.category, TruncatedAudioWarning)]
    assert len(msgs) == 1 and f"truncated to its first {limit:g} s" in msgs[0], msgs
    assert f.truncated and f.seconds_used == limit and f.duration == seconds
    inputs = R.hf_inputs(t.hf_processor, [clip], Q)
    fam = R.family_of(t.hf_model)
    mask = inputs[fam["mask"]]
    assert f.n_tokens == int((inputs["input_ids"] == model.audio_token_id).sum())
    assert f.windows == (tuple(mask.sum(-1).tolist()) if kind == "af3" else ())
    ref = {"input_features": inputs["input_features"].numpy(), "feature_attention_mask": mask.numpy()}
    assert_close(np.array(f.valid()), valid_features(ref), FEATURE_ATOL, "log-mel")
    with torch.no_grad():
        hf_tokens = t.hf_model.get_audio_features(inputs["input_features"], mask)
    hf_tokens = (hf_tokens.pooler_output if kind == "af3" else hf_tokens.last_hidden_state).numpy()
    ours = np.array(model.encode(with_features(f, ref, rows_of(ref, 1)[0]))[1])
    assert ours.shape == hf_tokens.shape == (f.n_tokens, model.hidden_size)
    assert_close(ours, hf_tokens, STAGE_ATOL, "projected audio tokens")


@pytest.mark.slow
def test_bf16_drift_within_hf_own_drift(fam, tmp_path):
    """bf16: the MLX model's error against HF fp32 is at most 2x HF bf16's own error against HF fp32."""
    from mlx_listen.load import load
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference import hf as R

    clips = [tone(3.0)]
    fp32 = fam.reference("bf16-base", clips, Q)
    hf16, hp = R.load_hf(fam.hf_path, dtype="bfloat16", device="cpu")
    ref16 = R.run(hf16, hp, clips, Q)
    model, processor = load(convert(str(fam.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False))
    assert model.dtype == mx.bfloat16
    _, out = stages(model, processor, [model.front_end.features(c) for c in clips])
    for key in ("projector", "logits"):
        hf_err = np.abs(ref16[key] - fp32[key]).max()
        ours = np.abs(out[key] - fp32[key]).max()
        print(f"{fam.name} {key}: HF bf16 drift {hf_err:.3g}, MLX bf16 error {ours:.3g}")
        assert 0 < hf_err, "HF bf16 equals fp32: the fixture cannot measure drift"
        assert ours <= 2 * hf_err, f"{key}: MLX bf16 error {ours:.3g} > 2x HF bf16 drift {hf_err:.3g}"
