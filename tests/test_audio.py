"""Audio front end vs transformers' WhisperFeatureExtractor (torch path), the Qwen2-Audio processor's reference."""

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from mlx_listen import audio as A
from mlx_listen.errors import AudioError

SR = 16000

# Tolerances. HF's own float32 (MKL) STFT is up to ~7e-5 away from a float64 STFT on tonal signals with a
# weak noise floor (a mel bin far below its frame's peak carries the FFT's absolute roundoff), so no
# independent float32 implementation can promise 3e-5 everywhere. We require: max <= 1e-4, and the bulk
# (99.9th percentile) <= 3e-5, mean <= 1e-6; plus being no further from float64 than HF itself is.
MAX_ERR, P999_ERR, MEAN_ERR = 1e-4, 3e-5, 1e-6


@pytest.fixture(scope="module")
def fe():
    return WhisperFeatureExtractor(feature_size=128)


def hf(fe, audio):
    out = fe(audio, sampling_rate=SR, padding="max_length", return_attention_mask=True, return_tensors="np")
    return out["input_features"][0], int(out["attention_mask"][0].sum())


def hf_tokens(mask_sum):
    # Qwen2-Audio's own length formula (self is unused by it).
    _, out = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, torch.tensor(mask_sum))
    return int(out)


def tone(seconds, amp=0.5, noise=0.01, freq=440.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.size)).astype(np.float32)


def float64_reference(audio):
    """Same algorithm in float64 (HF's float32 window and filterbank), to bound float32 roundoff on both sides."""
    x = np.pad(A.pad_or_trim(audio).astype(np.float64), 200, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160][:3000]
    power = np.abs(np.fft.rfft(frames * torch.hann_window(400).double().numpy(), axis=-1)) ** 2
    fb = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                         sampling_rate=SR, norm="slaney", mel_scale="slaney").astype(np.float32)
    logm = np.log10(np.maximum(power @ fb.astype(np.float64), 1e-10))
    return ((np.maximum(logm, logm.max() - 8.0) + 4.0) / 4.0).T


SIGNALS = {
    "2.5s": lambda: tone(2.5),
    "0.2s": lambda: tone(0.2, seed=1),
    "29.99s": lambda: tone(29.99, seed=2),
    "30s": lambda: tone(30.0, seed=3),
    "45s": lambda: tone(45.0, seed=4),
    "loud": lambda: tone(3.0, amp=20.0, noise=2.0, freq=1234.0, seed=5),  # far beyond [-1, 1]
    "quiet": lambda: tone(3.0, amp=1e-4, noise=1e-6, freq=3000.0, seed=6),  # most bins hit the max-8 clamp
}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_log_mel_matches_hf(fe, name):
    audio = SIGNALS[name]()
    ref, _ = hf(fe, audio)
    mel = A.log_mel(audio)
    assert mel.shape == (128, 3000) and mel.dtype == mx.float32
    got = np.array(mel)
    err = np.abs(got - ref)
    print(f"{name}: max {err.max():.2e} p99.9 {np.quantile(err, 0.999):.2e} mean {err.mean():.1e}")
    assert err.max() <= MAX_ERR
    assert np.quantile(err, 0.999) <= P999_ERR
    assert err.mean() <= MEAN_ERR
    # Whatever is left is float32 roundoff: we are no further from float64 than HF is (with slack).
    exact = float64_reference(audio)
    assert np.abs(got - exact).max() <= max(1.5 * np.abs(ref - exact).max(), 3e-5)


def test_clamp_is_global(fe):
    # A loud burst then near-silence: the quiet part must be clamped at (global max - 8), not per frame.
    audio = np.concatenate([tone(1.0, amp=1.0, noise=0.1), tone(2.0, amp=1e-6, noise=1e-7, seed=9)])
    got = np.array(A.log_mel(audio))
    ref, _ = hf(fe, audio)
    assert np.abs(got - ref).max() <= MAX_ERR
    assert np.isclose(got.min(), got.max() - 2.0, atol=1e-6)  # floor (max - 8) is max - 2 after scaling


def test_filterbank_matches_hf():
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=SR, norm="slaney", mel_scale="slaney")
    fb = A.mel_filters()
    assert fb.shape == (201, 128) and fb.dtype == np.float32
    assert np.abs(fb - ref).max() < 1e-8


def test_window_matches_torch():
    assert np.abs(A._hann_window() - torch.hann_window(400).numpy()).max() <= 6e-8


@pytest.mark.parametrize("n", [1, 159, 160, 161, 320, 321, 40000, 479999, 480000, 720000])
def test_num_frames_matches_hf_mask(fe, n):
    _, mask_sum = hf(fe, np.zeros(n, np.float32))
    assert A.num_frames(n) == mask_sum


@pytest.mark.parametrize("seconds,expected", [(0.2, 5), (1, 25), (2.5, 62), (10, 250), (29.99, 750), (30, 750), (45, 750)])
def test_num_audio_tokens_matches_hf(fe, seconds, expected):
    n = round(seconds * SR)
    _, mask_sum = hf(fe, np.zeros(n, np.float32))
    assert hf_tokens(mask_sum) == expected
    assert A.num_audio_tokens(A.num_frames(n)) == expected


def test_num_audio_tokens_small():
    for frames in range(0, 12):
        assert A.num_audio_tokens(frames) == max(hf_tokens(frames), 0)
    assert A.num_audio_tokens(2) == 0 and A.num_audio_tokens(3) == 1


def test_audio_features_fields(capsys):
    f = A.audio_features(tone(2.5), name="clip.wav")
    assert (f.n_frames, f.n_tokens, f.duration, f.truncated) == (250, 62, 2.5, False)
    assert f.mel.shape == (128, 3000)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("n", [0, 1, 160, 320])
def test_audio_features_too_short(n):
    with pytest.raises(AudioError, match=r"short\.wav.*too short.*320 samples"):
        A.audio_features(np.zeros(n, np.float32), name="short.wav")


def test_audio_features_shortest_ok():
    assert A.audio_features(np.zeros(321, np.float32)).n_tokens == 1


def test_audio_features_truncates_with_warning(capsys):
    f = A.audio_features(tone(45.0, seed=4), name="long.wav")
    assert f.truncated and f.duration == 45.0 and f.n_frames == 3000 and f.n_tokens == 750
    err = capsys.readouterr().err
    assert err == "[WARNING] long.wav: 45.0 s clip truncated to its first 30 s (Qwen2-Audio's window)\n"
    np.testing.assert_array_equal(np.array(f.mel), np.array(A.log_mel(tone(45.0, seed=4)[: A.CHUNK_SAMPLES])))


def test_pad_or_trim():
    assert A.pad_or_trim(np.ones(10)).shape == (480000,)
    assert A.pad_or_trim(np.ones(10))[10:].sum() == 0
    assert A.pad_or_trim(np.arange(500000, dtype=np.float32))[-1] == 479999


# --- load_audio --------------------------------------------------------------------------------------------


def test_load_stereo_44k_wav(tmp_path):
    sr, seconds = 44100, 1.5
    t = np.arange(int(sr * seconds)) / sr
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo.astype(np.float32), sr, subtype="FLOAT")
    audio = A.load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.flags.c_contiguous
    assert abs(audio.shape[0] - seconds * SR) <= 2
    expected = soxr.resample(stereo.astype(np.float32).mean(axis=1), sr, SR, quality="HQ")
    np.testing.assert_allclose(audio, expected, atol=1e-6)


def test_load_16k_is_not_resampled(tmp_path):
    x = tone(1.0, noise=0.0)
    sf.write(tmp_path / "a.wav", x, SR, subtype="FLOAT")
    np.testing.assert_array_equal(A.load_audio(str(tmp_path / "a.wav")), x)


@pytest.mark.parametrize("ext,fmt,subtype,sr,atol", [
    ("flac", "FLAC", "PCM_16", 16000, 1e-4),
    ("ogg", "OGG", "VORBIS", 22050, None),
    ("mp3", "MP3", "MPEG_LAYER_III", 24000, None),
])
def test_load_compressed(tmp_path, ext, fmt, subtype, sr, atol):
    t = np.arange(sr) / sr
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / f"a.{ext}"
    try:
        sf.write(path, x, sr, format=fmt, subtype=subtype)
    except Exception as e:  # libsndfile builds without an encoder
        pytest.skip(f"cannot write {fmt}: {e}")
    audio = A.load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - SR) <= 0.06 * SR  # lossy codecs may add encoder delay/padding
    expected = soxr.resample(x, sr, SR, quality="HQ") if sr != SR else x
    if atol is not None:
        np.testing.assert_allclose(audio, expected, atol=atol)
    else:  # lossy: same energy, same dominant frequency
        assert abs(np.sqrt(np.mean(audio**2)) - np.sqrt(np.mean(expected**2))) < 0.05
        spectrum = np.abs(np.fft.rfft(audio[: SR // 2]))
        assert abs(np.argmax(spectrum) * SR / (SR // 2) - 440) <= 4


def test_load_missing(tmp_path):
    with pytest.raises(AudioError, match=r"not found.*nope\.wav"):
        A.load_audio(tmp_path / "nope.wav")


def test_load_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 10)
    with pytest.raises(AudioError, match=r"notes\.wav.*not a readable audio file"):
        A.load_audio(path)


def test_load_zero_byte_file(tmp_path):
    path = tmp_path / "blank.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"blank\.flac"):
        A.load_audio(path)


def test_load_empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 1), np.float32), SR)
    with pytest.raises(AudioError, match=r"empty\.wav.*no audio samples"):
        A.load_audio(path)


def test_load_directory(tmp_path):
    with pytest.raises(AudioError, match="not a readable audio file"):
        A.load_audio(tmp_path)
