"""The families' audio front ends (`frontend.py`, `mel.log_mel_valid`): windows, valid frames, token
counts, limits and their warnings, silence, and the partial spectrogram's exactness."""

from __future__ import annotations

import json
import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
from support import SR, tone

from mlx_listen import mel as M
from mlx_listen.audio import audio_features
from mlx_listen.errors import AudioError, TruncatedAudioWarning
from mlx_listen.frontend import Whole, Window, Windows
from mlx_listen.models import front_end


def full_piece(audio, n_samples):
    """The log-mel of every frame of the padded piece (what transformers computes), valid frames kept."""
    x = np.pad(M.pad_or_trim(audio, n_samples), M.N_FFT // 2, mode="reflect")
    return np.array(M._spectrogram(x, n_samples // M.HOP_LENGTH))[:, : M.num_frames(len(audio), n_samples)]


@pytest.mark.parametrize("n", [1, 321, 16000, 79_000, 79_850, 79_999, 80_000, 95_000])
def test_valid_log_mel_is_the_whole_pieces(n):
    """Computing only the frames a clip reaches gives the whole padded piece's values (same floor, same
    edges), near the piece's end (reflect edge), at it and past it (cut) too."""
    piece = 80_000  # a 5 s piece keeps the reference cheap; Omni's is 300 s
    audio = tone(n / SR, seed=n % 7) if n > 1 else np.array([0.3], np.float32)
    got = np.array(M.log_mel_valid(audio, piece))
    want = full_piece(audio, piece)
    assert got.shape == want.shape == (128, M.num_frames(n, piece))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_valid_log_mel_matches_transformers_near_the_end():
    """The same against transformers' feature extractor itself, with a piece as short as the clip's end."""
    pytest.importorskip("torch")
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=5)
    for n in (30_000, 79_900):
        audio = tone(n / SR, seed=3)
        ref = fe(audio, sampling_rate=SR, padding="max_length", return_attention_mask=True, return_tensors="np")
        valid = int(ref["attention_mask"].sum())
        got = np.array(M.log_mel_valid(audio, 80_000))
        np.testing.assert_allclose(got, ref["input_features"][0][:, :valid], rtol=0, atol=1e-4)


def test_qwen2_audio_window_is_audio_features_bit_for_bit():
    for secs in (0.5, 12.0):
        x = tone(secs)
        a, b = Window().features(x), audio_features(x)
        assert np.array_equal(np.array(a.mel), np.array(b.mel)) and (a.n_frames, a.n_tokens) == (b.n_frames, b.n_tokens)


def processor_tokens(n_samples, max_windows=20):
    """Audio Flamingo 3's processor: windows of 480000 samples, at most 20, tokens from the summed frames."""
    n_win = min(max(1, math.ceil(n_samples / 480000)), max_windows)
    cap = min(n_samples, n_win * 480000)
    frames = [math.ceil((min((i + 1) * 480000, cap) - i * 480000) / 160) for i in range(n_win)]
    total = sum(frames)
    return frames, ((total - 1) // 2 + 1 - 2) // 2 + 1


@pytest.mark.parametrize("seconds", [0.5, 29.99, 30.0, 30.01, 35.2, 60.0, 599.0, 600.0])
def test_windows_frames_and_tokens(seconds):
    n = int(round(seconds * SR))
    front = Windows()
    frames, tokens = processor_tokens(n)
    assert front.frames(n) == frames
    assert front.n_tokens(n) == tokens  # per-window counts sum to the processor's total formula


def test_windows_features_cut_each_window_alone():
    x = tone(35.2, seed=2)
    f = Windows().features(x)
    assert f.windows == (3000, 520) and f.n_frames == 3520 and f.n_tokens == 880
    assert f.mel.shape == (128, 6000)
    np.testing.assert_array_equal(np.array(f.pieces()[1][0]), np.array(M.log_mel(x[480000:])))
    assert f.valid().shape == (128, 3520)


def test_limits_warn_once_and_say_what_was_used():
    for front, seconds, limit in ((Windows(2), 65.0, 60), (Whole(40), 41.0, 40), (Window(), 31.0, 30)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = front.features(tone(seconds), "clip.wav")
        msgs = [str(w.message) for w in caught if issubclass(w.category, TruncatedAudioWarning)]
        assert len(msgs) == 1 and msgs[0].startswith(f"clip.wav: {seconds:.1f} s clip truncated to its first {limit} s")
        assert f.truncated and f.seconds_used == limit and f.duration == seconds
        assert f.n_frames == limit * 100


def test_whole_keeps_only_valid_frames():
    f = Whole().features(tone(7.3))
    assert f.mel.shape == (128, 730) == (128, f.n_frames) and f.n_tokens == 182 and not f.windows


@pytest.mark.parametrize("front", [Window(), Windows(), Whole()])
def test_too_short_and_bad_clips_fail_before_any_model(front):
    with pytest.raises(AudioError, match="clip too short"):
        front.check(np.zeros(200, np.float32), "x.wav")
    with pytest.raises(AudioError, match="clip too short"):
        front.features(np.zeros(320, np.float32), "x.wav")
    with pytest.raises(AudioError, match="NaN or infinite"):
        front.check(np.full(8000, np.nan, np.float32), "x.wav")
    with pytest.raises(AudioError, match="mono"):
        front.check(np.zeros((8000, 2), np.float32), "x.wav")
    front.check(np.zeros(321, np.float32), "x.wav")  # 3 frames: one token


@pytest.mark.parametrize("front", [Window(), Windows(), Whole()])
def test_silence_has_the_clips_pieces(front):
    clip = front.features(tone(31.3 if not isinstance(front, Window) else 3.3))
    sil = front.silence(clip)
    assert (sil.n_frames, sil.windows, sil.n_tokens) == (clip.n_frames, clip.windows, clip.n_tokens)
    assert float(mx.abs(sil.mel - sil.mel[0, 0]).max()) == 0.0  # digital silence: one value everywhere


def test_front_end_from_the_folders_processor_files(tmp_path):
    af3 = {"model_type": "audioflamingo3"}
    assert front_end(af3).max_windows == 20
    (tmp_path / "processor_config.json").write_text(json.dumps({"max_audio_len": 90, "feature_extractor": {
        "chunk_length": 30}}))
    assert front_end(af3, tmp_path).max_windows == 3
    omni = {"model_type": "qwen2_5_omni"}
    assert front_end(omni).seconds == 300
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"chunk_length": 120}))
    (tmp_path / "processor_config.json").unlink()
    assert front_end(omni, tmp_path).seconds == 120
    assert isinstance(front_end({"model_type": "qwen2_audio"}, tmp_path), Window)
    with pytest.raises(ValueError, match="mlx-listen runs 'qwen2_audio'"):
        front_end({"model_type": "whisper"})
