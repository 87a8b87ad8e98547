"""Whisper's log-mel spectrogram (transformers' `WhisperFeatureExtractor`, feature_size 128), in MLX.

n_fft 400, hop 160, periodic Hann, centred STFT with reflect padding, power spectrum, the last
frame dropped, 128 Slaney mel filters, log10 clamped at 1e-10, a floor at (max - 8) where the max
is taken over the whole padded piece, then (x + 4) / 4. Every family's front end (`frontend.py`)
is built from `log_mel`; they differ in how a clip is cut into pieces and how far each is padded.

MLX is imported lazily: the MLX-free reference side imports this package's audio reading.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import mlx.core as mx

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
CHUNK_SAMPLES = 480000  # 30 s: Whisper's window (Qwen2-Audio's only one, Audio Flamingo 3's unit)
CHUNK_FRAMES = 3000


def pad_or_trim(audio: np.ndarray, n_samples: int = CHUNK_SAMPLES) -> np.ndarray:
    """Zero-pad or truncate to exactly `n_samples` (30 s), like the processor's max_length padding."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.shape[0] >= n_samples:
        return np.ascontiguousarray(audio[:n_samples])
    return np.pad(audio, (0, n_samples - audio.shape[0]))


def num_frames(n_samples: int, max_samples: int = CHUNK_SAMPLES) -> int:
    """Valid (unpadded) mel frames; equals HF's attention-mask sum (mask[::160] over the padded samples)."""
    n = min(max(int(n_samples), 0), max_samples)
    return -(-n // HOP_LENGTH)


def num_audio_tokens(n_frames: int) -> int:
    """Tokens after the encoder's stride-2 conv and its stride-2 avg-pool (every family's length formula)."""
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


def _spectrogram(x: np.ndarray, n_frames: int) -> mx.array:
    """The log-mel of `n_frames` STFT frames of the reflect-padded signal `x`, clamped at its own max - 8."""
    import mlx.core as mx  # here, not at the top: the MLX-free reference side imports audio reading

    x = mx.array(x)
    frames = mx.as_strided(x, shape=(n_frames, N_FFT), strides=(HOP_LENGTH, 1))
    spec = mx.fft.rfft(frames * mx.array(_hann_window()), axis=-1)  # (frames, 201)
    power = mx.square(mx.abs(spec))
    mel = power @ mx.array(mel_filters())  # (frames, 128)
    logm = mx.log10(mx.maximum(mel, 1e-10))
    # Clamp to 80 dB below the loudest value of the whole padded piece, then rescale to about [-1, 1].
    logm = mx.maximum(logm, mx.max(logm) - 8.0)
    return ((logm + 4.0) / 4.0).T.astype(mx.float32)


def log_mel(audio: np.ndarray) -> mx.array:
    """(128, 3000) float32 log-mel of the clip padded/truncated to 30 s, as WhisperFeatureExtractor computes it."""
    # Pad to 30 s *before* the STFT (as HF does): the padding changes the last frames and the global max.
    x = np.pad(pad_or_trim(audio), N_FFT // 2, mode="reflect")  # torch.stft(center=True) reflect padding
    return _spectrogram(x, CHUNK_FRAMES)  # drops STFT frame 3001, as HF


def log_mel_valid(audio: np.ndarray, n_samples: int) -> mx.array:
    """(128, valid frames) of the log-mel of the clip zero-padded (or cut) to `n_samples`, computing only
    what those frames need: work and memory grow with the clip, not with the padded length.

    Exact: every frame past `ceil((n + 200) / 160)` reads nothing but the zero padding, so its log-mel
    is the clamp's -10, never above the max of the frames computed here; the floor's max is the whole
    padded piece's. A clip that reaches the end of the piece is transformed whole (reflect edge)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:n_samples]
    n, total = audio.shape[0], n_samples // HOP_LENGTH
    frames = min(total, math.ceil((n + N_FFT // 2) / HOP_LENGTH) + 1)
    valid = num_frames(n, n_samples)
    if frames == total:
        x = np.pad(pad_or_trim(audio, n_samples), N_FFT // 2, mode="reflect")
    else:  # the left reflect edge, the clip, and the zeros the computed frames read
        need = (frames - 1) * HOP_LENGTH + N_FFT // 2 + 1
        body = np.pad(audio, (0, max(0, need - n)))
        x = np.concatenate([body[1:N_FFT // 2 + 1][::-1], body])
    return _spectrogram(x, frames)[:, :valid]
