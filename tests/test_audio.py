"""Audio front end vs transformers' WhisperFeatureExtractor (torch path), the Qwen2-Audio processor's reference;
file loading: the 30 s partial read, damaged files, warnings."""

import math
import pickle
import struct
import subprocess
import sys
import warnings

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
from mlx_listen.errors import AudioError, AudioWarning, DamagedAudioWarning, ListenWarning, TruncatedAudioWarning

pytestmark = pytest.mark.torch  # the references: transformers' feature extractor and torch's window

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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = A.audio_features(tone(2.5), name="clip.wav")
    assert (f.n_frames, f.n_tokens, f.duration, f.truncated) == (250, 62, 2.5, False)
    assert (f.seconds_used, f.damage, f.damaged) == (2.5, None, False)
    assert f.mel.shape == (128, 3000)
    assert f.to_dict() == {"audio_seconds": 2.5, "audio_seconds_used": 2.5, "audio_tokens": 62,
                           "audio_truncated": False, "audio_damage": None}
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("n", [0, 1, 160, 320])
def test_audio_features_too_short(n):
    with pytest.raises(AudioError, match=r"short\.wav.*too short.*320 samples"):
        A.audio_features(np.zeros(n, np.float32), name="short.wav")


def test_audio_features_shortest_ok():
    assert A.audio_features(np.zeros(321, np.float32)).n_tokens == 1


def test_audio_features_truncates_with_warning(capsys):
    with pytest.warns(TruncatedAudioWarning) as record:
        f = A.audio_features(tone(45.0, seed=4), name="long.wav")
    assert f.truncated and f.duration == 45.0 and f.n_frames == 3000 and f.n_tokens == 750
    assert f.seconds_used == 30.0 and not f.damaged
    assert [str(w.message) for w in record] == [
        "long.wav: 45.0 s clip truncated to its first 30 s (Qwen2-Audio's window)"]
    assert record[0].filename == __file__  # stacklevel: the warning points at the caller, not at audio.py
    assert issubclass(TruncatedAudioWarning, AudioWarning) and issubclass(AudioWarning, ListenWarning)
    assert issubclass(ListenWarning, UserWarning)
    assert capsys.readouterr() == ("", "")  # library code does not print
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
    np.testing.assert_array_equal(audio, expected)  # bitwise: same mono mix, same resampler
    assert (audio.duration, audio.source_rate, audio.truncated, audio.damage) == (1.5, sr, False, None)


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


# --- the 30 s partial read ---------------------------------------------------------------------------------


def whole_file_then_window(path):
    """What load_audio did before the partial read (the old code): decode everything, mix, resample, then cut."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = data.mean(axis=1, dtype=np.float32)
    if sr != SR:
        audio = soxr.resample(audio, sr, SR, quality="HQ")
    return audio


def write_long(path, sr, seconds, channels=1, subtype="PCM_16", seed=0, **kw):
    rng = np.random.default_rng(seed)
    n = int(round(sr * seconds))
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((n, channels))
    sf.write(path, x.astype(np.float32), sr, subtype=subtype, **kw)
    return path


class FrameCounter:
    """Counts the frames load_audio asks libsndfile for."""

    def __init__(self, monkeypatch):
        self.frames = 0
        read = sf.SoundFile.read

        def counting(f, frames=-1, *a, **kw):
            out = read(f, frames, *a, **kw)
            self.frames += out.shape[0]
            return out

        monkeypatch.setattr(sf.SoundFile, "read", counting)


@pytest.mark.parametrize("sr,channels", [(16000, 1), pytest.param(44100, 2, marks=pytest.mark.slow), (22050, 1), (48000, 1)])
def test_partial_read_is_bitwise_the_whole_file_window(tmp_path, monkeypatch, sr, channels):
    path = write_long(tmp_path / "long.wav", sr, 75.0, channels)
    whole = whole_file_then_window(path)
    counter = FrameCounter(monkeypatch)
    with pytest.warns(TruncatedAudioWarning, match=r"long\.wav: 75\.0 s clip truncated"):
        audio = A.load_audio(path)
        f = A.audio_features(audio)
    # Measured: bitwise equal at every rate (see RESAMPLE_MARGIN_SECONDS), not just float noise.
    np.testing.assert_array_equal(audio, whole[: A.CHUNK_SAMPLES])
    window = A.CHUNK_SAMPLES if sr == SR else math.ceil(A.CHUNK_SAMPLES * sr / SR) + sr
    assert counter.frames == window  # only the window (and the resampler's 1 s margin) was decoded
    assert isinstance(audio, A.Audio) and audio.shape == (A.CHUNK_SAMPLES,) and audio.flags.c_contiguous
    assert (audio.duration, audio.truncated, audio.source_rate, audio.damage) == (75.0, True, sr, None)
    assert (f.duration, f.seconds_used, f.truncated, f.n_frames, f.n_tokens) == (75.0, 30.0, True, 3000, 750)
    np.testing.assert_array_equal(np.array(f.mel), np.array(A.log_mel(whole)))
    full = A.load_audio(path, full=True)
    np.testing.assert_array_equal(full, whole)
    assert (full.duration, full.truncated) == (75.0, False)  # nothing was cut from what it returns


@pytest.mark.parametrize("seconds", [29.99, 30.0, 30.5, 31.0])
def test_window_edges(tmp_path, seconds):
    # Around 30 s at 44.1 kHz: the whole file may fit in the read window (30 s + margin) yet resample past 30 s.
    path = write_long(tmp_path / "edge.wav", 44100, seconds)
    whole = whole_file_then_window(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        audio = A.load_audio(path)
        f = A.audio_features(audio)
    np.testing.assert_array_equal(audio, whole[: A.CHUNK_SAMPLES])
    assert audio.truncated == f.truncated == (whole.shape[0] > A.CHUNK_SAMPLES) == (seconds > 30)
    assert [w.category for w in record] == ([TruncatedAudioWarning] if seconds > 30 else [])
    assert f.seconds_used == min(seconds, 30.0) and f.duration == pytest.approx(seconds, abs=1e-9)


def test_partial_read_mp3(tmp_path):
    path = tmp_path / "long.mp3"
    try:
        write_long(path, 24000, 40.0, subtype="MPEG_LAYER_III", format="MP3")
    except Exception as e:  # libsndfile builds without an encoder
        pytest.skip(f"cannot write MP3: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedAudioWarning)
        audio = A.load_audio(path)
    np.testing.assert_array_equal(audio, whole_file_then_window(path)[: A.CHUNK_SAMPLES])
    assert audio.truncated and audio.duration == pytest.approx(40.0, abs=0.05)


def test_facts_belong_to_the_loaded_array_only(tmp_path):
    audio = A.load_audio(write_long(tmp_path / "long.wav", SR, 40.0))
    assert pickle.loads(pickle.dumps(audio)).duration == 40.0
    for derived in (np.zeros_like(audio), audio[:1000], audio.copy(), audio * 1.0, np.asarray(audio)):
        assert getattr(derived, "duration", None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silence = A.audio_features(np.zeros_like(audio), "silence")  # a silence pass of the window: not truncated
    assert (silence.duration, silence.truncated, silence.n_tokens) == (30.0, False, 750)
    assert type(audio.mean()) is np.float32 and type(audio + 1) is np.ndarray


def test_load_audio_without_mlx(tmp_path):
    path = write_long(tmp_path / "a.wav", 44100, 2.0)
    code = ("import sys; sys.modules['mlx'] = None\n"  # any `import mlx...` now raises ImportError
            "from mlx_listen.audio import load_audio\n"
            f"a = load_audio({str(path)!r}); assert a.shape == (32000,) and a.duration == 2.0\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- damaged files -------------------------------------------------------------------------------------


def cut(path, keep, out=None):
    data = path.read_bytes()
    out = out or path.with_name("cut_" + path.name)
    out.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    return out


@pytest.mark.parametrize("subtype,fmt", [("PCM_16", "WAV"), ("FLOAT", "WAV"), ("PCM_24", "AIFF"), ("PCM_16", "W64")])
def test_header_promises_more_than_the_file_holds(tmp_path, subtype, fmt, capsys):
    good = write_long(tmp_path / f"a.{fmt.lower()}", SR, 10.0, subtype=subtype, format=fmt)
    bad = cut(good, 0.5)
    with pytest.warns(DamagedAudioWarning) as record:
        audio = A.load_audio(bad)
    assert len(record) == 1 and record[0].filename == __file__
    msg = str(record[0].message)
    assert msg.startswith(f"{bad}: damaged file: cut short") and "about 10.0" in msg
    assert audio.damage == msg and audio.damaged
    n = audio.shape[0]
    assert 4.9 * SR < n < 5.1 * SR and audio.duration == n / SR and not audio.truncated
    np.testing.assert_array_equal(audio, A.load_audio(good)[:n])  # what is there is used as is
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already warned by load_audio: recorded, not repeated
        f = A.audio_features(audio)
    assert f.damage == msg and f.to_dict()["audio_damage"] == msg and f.seconds_used == n / SR
    assert capsys.readouterr() == ("", "")


def test_flac_cut_mid_stream(tmp_path):
    good = write_long(tmp_path / "a.flac", 44100, 20.0, channels=2, format="FLAC")
    bad = cut(good, 0.5)
    with pytest.warns(DamagedAudioWarning, match=r"cut_a\.flac: damaged file: decoding failed at .* s of the "
                                                 r"20\.00 s its header promises \(.*\)"):
        audio = A.load_audio(bad)
    src = audio.duration * 44100
    assert 5 * 44100 < src < 15 * 44100 and audio.damaged
    # the decoded part, resampled, is what the intact file gives for those samples (up to the resampler's tail)
    head = A.load_audio(good)[: round(src * SR / 44100) - SR]
    np.testing.assert_array_equal(audio[: head.shape[0]], head)


def test_mp3_cut_mid_frame(tmp_path):
    good = tmp_path / "a.mp3"
    try:
        write_long(good, SR, 10.0, subtype="MPEG_LAYER_III", format="MP3")
    except Exception as e:
        pytest.skip(f"cannot write MP3: {e}")
    bad = cut(good, 0.6)
    with pytest.warns(DamagedAudioWarning, match=r"cut_a\.mp3: damaged file: the file ends at .* s but its header "
                                                 r"promises 10\.00 s"):
        audio = A.load_audio(bad)
    assert 4 * SR < audio.shape[0] < 8 * SR and audio.duration == audio.shape[0] / SR


def test_damage_past_the_window_in_a_full_read(tmp_path):
    good = write_long(tmp_path / "a.flac", SR, 60.0, format="FLAC")
    bad = cut(good, 0.8)  # damaged at ~48 s: the 30 s window reads fine
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedAudioWarning)
        with pytest.warns(TruncatedAudioWarning):
            A.audio_features(A.load_audio(bad))
    with pytest.warns(DamagedAudioWarning, match="decoding failed"):
        assert A.load_audio(bad, full=True).shape[0] > 40 * SR


@pytest.mark.parametrize("size", [0xFFFFFFFF, 0xFFFFFFFF - 1])
def test_streamed_wav_sizes_are_not_damage(tmp_path, size):
    path = write_long(tmp_path / "s.wav", SR, 2.0)
    b = bytearray(path.read_bytes())
    b[4:8] = struct.pack("<I", size)  # writers that stream (e.g. to a pipe) never fill the sizes in
    i = b.find(b"data")
    b[i + 4:i + 8] = struct.pack("<I", size)
    path.write_bytes(bytes(b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio = A.load_audio(path)
    assert audio.shape == (2 * SR,) and not audio.damaged


def test_riff_size_off_by_a_few_bytes_is_not_damage(tmp_path):
    path = write_long(tmp_path / "r.wav", SR, 1.0)
    b = bytearray(path.read_bytes())
    b[4:8] = struct.pack("<I", len(b))  # a common writer bug: RIFF size = file size instead of file size - 8
    path.write_bytes(bytes(b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not A.load_audio(path).damaged
