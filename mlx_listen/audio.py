"""Audio files and the Qwen2-Audio front end: file loading (any libsndfile format, any rate, mono 16 kHz out,
only as much of a file as is used) and `audio_features`, Whisper-style log-mel features of one 30 s window.

Mirrors transformers' WhisperFeatureExtractor(feature_size=128) as the Qwen2-Audio processor calls it
(padding="max_length", truncation to 30 s). The other families' front ends (`frontend.py`) build on the same
pieces. No torch/transformers imports: this runs on bare Macs.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError, DamagedAudioWarning, TruncatedAudioWarning
from .mel import (  # noqa: F401  (the log-mel pieces keep their old home here)
    CHUNK_FRAMES,
    CHUNK_SAMPLES,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    _hann_window,
    log_mel,
    mel_filters,
    num_audio_tokens,
    num_frames,
    pad_or_trim,
)

if TYPE_CHECKING:  # MLX is imported lazily: the MLX-free reference side uses load_audio
    import mlx.core as mx

WINDOW_SECONDS = CHUNK_SAMPLES / SAMPLE_RATE

# Source samples read past the 30 s a resampled window needs. The resampler's output near the end of its input
# depends on where the input stops (filter support and soxr's block flush); with 1 s more input the first 480000
# output samples were bitwise equal to resampling the whole file at every rate measured (8-192 kHz, odd rates
# included; benchmarks/bench_audio.py --exactness). 0.1 s was already enough everywhere; 1 s is the safety margin.
RESAMPLE_MARGIN_SECONDS = 1.0
_MP3_FRAME = 1152  # libmpg123 estimates lengths without a Xing/LAME tag: tolerate a shortfall of one frame
_SIZE_LINE = re.compile(r"^\s*([A-Za-z0-9 ]+?)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


class Audio(np.ndarray):
    """Mono float32 samples at 16 kHz as `load_audio` returns them, plus what the file said about itself.

    It is a numpy array (every numpy, soxr or HF call takes it), so callers that want samples need nothing new;
    `audio_features` reads the facts below. Only the object `load_audio` returned carries them: slices, copies and
    arithmetic (e.g. `np.zeros_like(audio)` for a silence pass) are plain samples whose facts are unset (None/False).
    """

    name: str | None  # the path it was read from
    duration: float | None  # seconds in the whole file (from its header, or what decoded if it was cut short)
    source_rate: int | None  # the file's own sample rate
    truncated: bool  # the file is longer than the window read and only the window was read (load_audio(path, seconds))
    damage: str | None  # why the file is damaged (already warned with DamagedAudioWarning), or None

    def __array_finalize__(self, obj):
        self.name, self.duration, self.source_rate, self.truncated, self.damage = None, None, None, False, None

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        # Results of ufuncs and reductions are plain arrays (or numpy scalars), not Audio without its facts.
        arr = arr.view(np.ndarray)
        return arr[()] if return_scalar else arr

    def __reduce__(self):  # pickling keeps the facts (multiprocessing, caches)
        rebuild, args, state = super().__reduce__()
        return rebuild, args, (state, self._facts())

    def __setstate__(self, state):
        base, facts = state
        super().__setstate__(base)
        self.name, self.duration, self.source_rate, self.truncated, self.damage = facts

    def _facts(self):
        return self.name, self.duration, self.source_rate, self.truncated, self.damage

    @property
    def damaged(self) -> bool:
        return self.damage is not None


def load_audio(path, full: bool = False, seconds: float = WINDOW_SECONDS) -> Audio:
    """Read any libsndfile format (wav, flac, ogg, mp3, ...) as mono float32 at 16 kHz.

    Only the part a model uses is decoded: the first `seconds` (default Qwen2-Audio's 30 s window; a family's
    front end passes its own limit). 16 kHz sources: the first `seconds * 16000` samples; other rates: that much
    plus a 1 s margin, resampled, then cut, bitwise what resampling the whole file would give. The whole file's
    length still comes from its header (`Audio.duration`, `Audio.truncated`). `full=True` decodes it all.

    A damaged file (its header promises more audio than it holds, or decoding fails part-way) is not an error as
    long as some audio decodes: it gives a `DamagedAudioWarning` and `Audio.damage` says why. An unreadable, empty
    or missing file raises `AudioError`.
    """
    name = os.fspath(path)
    limit = int(round(seconds * SAMPLE_RATE))  # samples at 16 kHz the caller uses
    if not os.path.exists(name):
        raise AudioError(f"audio file not found: {name}")
    try:
        f = sf.SoundFile(name)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError depending on the failure
        raise AudioError(f"{name} is not a readable audio file ({_reason(e, name)})") from None
    with f:
        sr, frames = int(f.samplerate), max(int(f.frames), 0)
        if sr == SAMPLE_RATE:
            window = limit
        else:
            window = math.ceil(limit * sr / SAMPLE_RATE) + math.ceil(RESAMPLE_MARGIN_SECONDS * sr)
        want = frames if full else min(frames, window)
        data, error = _read_mono(f, want)
        header_damage = _header_shortfall(f.extra_info)
        fmt = f.format
    n = data.shape[0]
    if n == 0:
        if error:
            raise AudioError(f"{name} is not a readable audio file ({error})")
        raise AudioError(f"{name} contains no audio samples")

    damage = None
    duration = frames / sr
    if error:
        duration = n / sr
        damage = (f"decoding failed at {n / sr:.2f} s of the {frames / sr:.2f} s its header promises ({error}); "
                  f"using the {n / sr:.2f} s before that")
    elif n < want - (_MP3_FRAME if fmt == "MP3" else 0):
        duration = n / sr
        damage = (f"the file ends at {n / sr:.2f} s but its header promises {frames / sr:.2f} s (cut short?); "
                  f"using the {n / sr:.2f} s there are")
    elif header_damage:
        damage = (f"cut short: its header promises about {duration * header_damage:.2f} s of audio but the file "
                  f"holds {duration:.2f} s; using those")
    if damage:
        damage = f"{name}: damaged file: {damage}"
        warnings.warn(damage, DamagedAudioWarning, stacklevel=2)

    if sr != SAMPLE_RATE:
        # HQ (soxr's default, also librosa.load's default "soxr_hq", which Qwen2-Audio's examples use):
        # its ~120 dB (20-bit) stopband is far below the 80 dB range the log-mel clamp keeps, so VHQ buys nothing.
        data = soxr.resample(data, sr, SAMPLE_RATE, quality="HQ")
    # Longer than the window at 16 kHz (soxr's output length is round(n * 16000 / sr)).
    truncated = not full and round(duration * SAMPLE_RATE) > limit
    if not full:
        data = data[:limit]
    out = np.ascontiguousarray(data, dtype=np.float32).view(Audio)
    out.name, out.duration, out.source_rate, out.truncated, out.damage = name, duration, sr, truncated, damage
    return out


def _reason(e: Exception, name: str) -> str:
    return str(e).removeprefix(f"Error opening {name!r}: ").removeprefix("Error : ").strip() or type(e).__name__


def _read_mono(f: sf.SoundFile, frames: int) -> tuple[np.ndarray, str | None]:
    """Up to `frames` frames from the start of `f`, mixed to mono float32, and the decoder's error if one stopped it.

    One read call from a seek to 0, exactly as `sf.read` decodes: libmpg123 re-primes its decoder on every seek,
    and soundfile seeks after every read, so MP3 samples decoded block by block differ from one read's by float
    noise (~6e-8). A decoding error keeps every frame decoded before it.
    """
    buf = np.empty((frames, f.channels), np.float32)
    error = None
    try:
        if f.seekable():
            f.seek(0)
        n = f.read(frames, dtype="float32", always_2d=True, out=buf).shape[0]
    except Exception as e:  # LibsndfileError mid-read (e.g. "flac decoder lost sync")
        error = _reason(e, f.name)
        try:  # libsndfile's position says how much decoded before the error
            n = min(max(int(f.tell()), 0), frames)
        except Exception:
            n = 0
    # Mixing before resampling is equivalent (both linear) and resamples one channel instead of many.
    return buf[:n].mean(axis=1, dtype=np.float32), error


def _header_shortfall(log: str) -> float | None:
    """How many times more audio the header promises than the file holds (>1), from libsndfile's parse log.

    libsndfile clamps a WAV/AIFF/W64/RF64 data size that runs past the end of the file to what is there, silently,
    and logs e.g. `data : 320000 (should be 159979)`. Streamed files that never filled their sizes in (0xFFFFFFFF,
    0) are not damaged, and a container size over by a few bytes (a common writer bug) is tolerated.
    """
    data, container = [], []
    for marker, claimed, actual in _SIZE_LINE.findall(log or ""):
        claimed, actual = int(claimed), int(actual)
        if 0xFFFFFF00 <= claimed <= 0xFFFFFFFF or claimed >= 1 << 62 or actual <= 0:
            continue  # "unknown length" sentinels of streamed files
        if claimed - actual > 8:
            (data if marker.strip().lower() in ("data", "ssnd") else container).append(claimed / actual)
    # The data chunk's own size gives the promised length; W64/RF64 log only the container's.
    return max(data or container) if data or container else None


@dataclass
class AudioFeatures:
    """One clip's front-end output: its log-mel and the lengths the prompt and the encoder need.

    `mel` is (128, F): Qwen2-Audio's one 30 s window (3000 frames, valid ones first); Qwen2.5-Omni's valid
    frames of one spectrogram; Audio Flamingo 3's windows side by side, 3000 frames each, with `windows`
    giving each window's valid frames. `valid()` is every valid frame, in order (what a bundle records)."""

    mel: mx.array
    n_frames: int  # valid frames in all (feature_attention_mask.sum())
    n_tokens: int  # audio tokens the encoder produces for this clip
    duration: float  # seconds of the whole input (the file, per its header, or the array), before any cut
    truncated: bool  # the input is longer than the family's limit: the encoder sees only its start
    seconds_used: float | None = None  # seconds the encoder sees: what stats lines should call "Audio"
    damage: str | None = None  # why the source file is damaged (see load_audio), or None
    windows: tuple[int, ...] = ()  # windowed front ends: valid frames of each 3000-frame window of `mel`

    def __post_init__(self):
        if self.seconds_used is None:
            self.seconds_used = min(self.duration, WINDOW_SECONDS)

    @property
    def damaged(self) -> bool:
        return self.damage is not None

    def pieces(self) -> list[tuple[mx.array, int]]:
        """(log-mel, valid frames) of each piece the encoder runs on alone (one, or each window)."""
        if not self.windows:
            return [(self.mel, self.n_frames)]
        return [(self.mel[:, w * CHUNK_FRAMES:(w + 1) * CHUNK_FRAMES], n) for w, n in enumerate(self.windows)]

    def valid(self) -> mx.array:
        """(128, n_frames): every valid frame, pieces concatenated on time."""
        import mlx.core as mx

        parts = [m[:, :n] for m, n in self.pieces()]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)

    def to_dict(self) -> dict:
        """The facts about the clip (no features), JSON-ready: what a run stores per item."""
        return {"audio_seconds": round(self.duration, 6), "audio_seconds_used": round(self.seconds_used, 6),
                "audio_tokens": self.n_tokens, "audio_truncated": self.truncated, "audio_damage": self.damage}


def clip_facts(audio: np.ndarray, name: str | None, limit: int) -> tuple[np.ndarray, str, float, bool, str | None]:
    """The part of a 16 kHz mono clip a front end uses (its first `limit` samples), checked (mono, finite), with
    the clip's name, whole duration, whether it was cut and why its file is damaged. `audio` is a plain array (its
    length is its duration) or `load_audio`'s `Audio`, whose file facts (whole-file duration, truncation, damage)
    carry over."""
    facts = audio if isinstance(audio, Audio) else None
    name = name or (facts.name if facts is not None else None) or "audio"
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected mono 1-D audio, got shape {audio.shape}")
    used = audio[:limit]  # all the encoder sees; the rest of a long array is not checked or copied
    if not np.isfinite(used).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    n = audio.shape[0]
    duration, truncated, damage = n / SAMPLE_RATE, n > limit, None
    if facts is not None and facts.duration is not None:
        duration, truncated, damage = facts.duration, truncated or facts.truncated, facts.damage
    return used, name, duration, truncated, damage


def too_short(name: str, n: int) -> AudioError:
    return AudioError(f"{name}: clip too short ({n} samples, {n / SAMPLE_RATE:.3f} s); "
                      f"need more than {2 * HOP_LENGTH} samples (> {2 * HOP_LENGTH / SAMPLE_RATE:.2f} s at 16 kHz)")


def audio_features(audio: np.ndarray, name: str | None = None) -> AudioFeatures:
    """Qwen2-Audio's front end: features plus the lengths the prompt needs; rejects clips too short to yield a
    single audio token. A clip over 30 s gives a `TruncatedAudioWarning` (damage was already warned about by
    `load_audio`, so it is only recorded)."""
    window, name, duration, truncated, damage = clip_facts(audio, name, CHUNK_SAMPLES)
    n = np.shape(audio)[0]
    n_frames = num_frames(n)
    n_tokens = num_audio_tokens(n_frames)
    if n_tokens == 0:
        raise too_short(name, n)
    if truncated:
        warnings.warn(f"{name}: {duration:.1f} s clip truncated to its first 30 s (Qwen2-Audio's window)",
                      TruncatedAudioWarning, stacklevel=2)
    seconds_used = min(n, CHUNK_SAMPLES) / SAMPLE_RATE
    return AudioFeatures(log_mel(window), n_frames, n_tokens, duration, truncated, seconds_used, damage)
