"""Audio front end: file loading and Whisper-style log-mel features for Qwen2-Audio, in MLX.

Mirrors transformers' WhisperFeatureExtractor(feature_size=128) as the Qwen2-Audio processor calls it
(padding="max_length", truncation to 30 s). No torch/transformers imports: this runs on bare Macs.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

if TYPE_CHECKING:  # MLX is imported lazily: the MLX-free reference side uses load_audio
    import mlx.core as mx

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
CHUNK_SAMPLES = 480000  # 30 s: Qwen2-Audio's encoder sees one fixed window
CHUNK_FRAMES = 3000


def load_audio(path) -> np.ndarray:
    """Read any libsndfile format (wav, flac, ogg, mp3, ...) as mono float32 at 16 kHz."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(f"audio file not found: {name}")
    try:
        data, sr = sf.read(name, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError depending on the failure
        reason = str(e).removeprefix(f"Error opening {name!r}: ")
        raise AudioError(f"{name} is not a readable audio file ({reason})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{name} contains no audio samples")
    # Mixing before resampling is equivalent (both linear) and resamples one channel instead of many.
    audio = data.mean(axis=1, dtype=np.float32)
    if sr != SAMPLE_RATE:
        # HQ (soxr's default, also librosa.load's default "soxr_hq", which Qwen2-Audio's examples use):
        # its ~120 dB (20-bit) stopband is far below the 80 dB range the log-mel clamp keeps, so VHQ buys nothing.
        audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def pad_or_trim(audio: np.ndarray) -> np.ndarray:
    """Zero-pad or truncate to exactly 30 s (CHUNK_SAMPLES), like the processor's max_length padding."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.shape[0] >= CHUNK_SAMPLES:
        return np.ascontiguousarray(audio[:CHUNK_SAMPLES])
    return np.pad(audio, (0, CHUNK_SAMPLES - audio.shape[0]))


def num_frames(n_samples: int) -> int:
    """Valid (unpadded) mel frames; equals HF's feature_attention_mask.sum() (mask[::160] over 480000 samples)."""
    n = min(max(int(n_samples), 0), CHUNK_SAMPLES)
    return -(-n // HOP_LENGTH)


def num_audio_tokens(n_frames: int) -> int:
    """Tokens after the encoder's stride-2 conv and its stride-2 avg-pool (Qwen2-Audio's length formula)."""
    n = int(n_frames)
    if n <= 2:  # the formula only reaches 0 here through floor division of negatives; don't rely on it
        return 0
    return ((n - 1) // 2 + 1 - 2) // 2 + 1


@functools.lru_cache(maxsize=None)
def _hann_window() -> np.ndarray:
    # Periodic Hann exactly as torch.hann_window builds it (HF's reference path): the phase n * f32(2*pi/400)
    # is formed in float32. Its rounding shifts the window by ~2.5e-7, which alone moves the features by ~4e-5,
    # so an exact float64 window would disagree with HF by more than the STFT's own float32 noise.
    n = np.arange(N_FFT, dtype=np.float32)
    phase = n * np.float32(2.0 * np.pi / N_FFT)
    cos = np.cos(phase.astype(np.float64)).astype(np.float32)
    return np.float32(0.5) - np.float32(0.5) * cos


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above.
    logstep = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * logstep, 3.0 * f / 200.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
    """(201, 128) Slaney-scale, Slaney-normalised triangular filterbank over 0-8000 Hz (= librosa's default)."""
    n_bins = N_FFT // 2 + 1
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.float64(0.0)), _hz_to_mel(np.float64(8000.0)), N_MELS + 2))
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, n_bins)
    slopes = edges[None, :] - fft_freqs[:, None]  # (bins, mels + 2)
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= 2.0 / (edges[2:] - edges[:-2])  # equal area per filter
    return fb.astype(np.float32)


def log_mel(audio: np.ndarray) -> mx.array:
    """(128, 3000) float32 log-mel of the clip padded/truncated to 30 s, as WhisperFeatureExtractor computes it."""
    import mlx.core as mx  # here, not at the top: the MLX-free reference side imports load_audio

    # Pad to 30 s *before* the STFT (as HF does): the padding changes the last frames and the global max.
    x = np.pad(pad_or_trim(audio), N_FFT // 2, mode="reflect")  # torch.stft(center=True) reflect padding
    x = mx.array(x)
    frames = mx.as_strided(x, shape=(CHUNK_FRAMES, N_FFT), strides=(HOP_LENGTH, 1))  # drops STFT frame 3001, as HF
    spec = mx.fft.rfft(frames * mx.array(_hann_window()), axis=-1)  # (3000, 201)
    power = mx.square(mx.abs(spec))
    mel = power @ mx.array(mel_filters())  # (3000, 128)
    logm = mx.log10(mx.maximum(mel, 1e-10))
    # Clamp to 80 dB below the loudest value of the whole padded window, then rescale to about [-1, 1].
    logm = mx.maximum(logm, mx.max(logm) - 8.0)
    return ((logm + 4.0) / 4.0).T.astype(mx.float32)


@dataclass
class AudioFeatures:
    mel: mx.array  # (128, 3000)
    n_frames: int  # valid frames (feature_attention_mask.sum())
    n_tokens: int  # audio tokens the encoder produces for this clip
    duration: float  # seconds of the input, before truncation
    truncated: bool  # input was longer than 30 s and was cut


def audio_features(audio: np.ndarray, name: str = "audio") -> AudioFeatures:
    """Features plus the lengths the prompt needs; rejects clips too short to yield a single audio token."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected mono 1-D audio, got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    n = audio.shape[0]
    duration = n / SAMPLE_RATE
    n_frames = num_frames(n)
    n_tokens = num_audio_tokens(n_frames)
    if n_tokens == 0:
        raise AudioError(
            f"{name}: clip too short ({n} samples, {duration:.3f} s); "
            f"need more than {2 * HOP_LENGTH} samples (> {2 * HOP_LENGTH / SAMPLE_RATE:.2f} s at 16 kHz)"
        )
    truncated = n > CHUNK_SAMPLES
    if truncated:
        print(
            f"[WARNING] {name}: {duration:.1f} s clip truncated to its first 30 s (Qwen2-Audio's window)",
            file=sys.stderr,
        )
    return AudioFeatures(log_mel(audio), n_frames, n_tokens, duration, truncated)
