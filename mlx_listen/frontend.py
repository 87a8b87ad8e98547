"""Each family's audio front end, exactly as its transformers processor: how much of a file is read,
how a clip is cut into pieces, how each piece is padded and transformed, and how many audio tokens it
gives. A front end is built from the model folder's config alone (`models.front_end`), so a run
checks its clips before any model loads, and reads only what the family uses.

| front end | family | transformers | limit |
|---|---|---|---|
| `Window` | Qwen2-Audio | one 30 s window, zero-padded, one log-mel; longer clips cut (with a warning) | 30 s |
| `Windows` | Audio Flamingo 3 | 30 s windows, each zero-padded and transformed on its own (its own reflect edges, its own max) | 20 windows (600 s) |
| `Whole` | Qwen2.5-Omni | one spectrogram of the clip zero-padded to `chunk_length` s (one max); only valid frames are kept | 300 s |

Every piece uses Whisper's log-mel (`mel.py`). Work grows with the clip: `Whole` computes only the
frames it keeps (exact, see `mel.log_mel_valid`); `Windows` transforms only the windows the clip has.
MLX-free at import (the reference side uses `check` and the token counts).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .audio import Audio, AudioFeatures, audio_features, clip_facts, load_audio, too_short
from .errors import AudioError, TruncatedAudioWarning
from .mel import CHUNK_FRAMES, CHUNK_SAMPLES, HOP_LENGTH, SAMPLE_RATE, num_audio_tokens, num_frames


class FrontEnd:
    """The interface; subclasses set `family` (for messages), `limit` (samples used) and `features`."""

    family = "the model"
    limit = CHUNK_SAMPLES
    why = ""  # what the limit is, for the truncation warning

    @property
    def seconds(self) -> float:
        """The longest stretch of a clip the model sees."""
        return self.limit / SAMPLE_RATE

    def load(self, path) -> Audio:
        """A file as 16 kHz mono, decoding only the part this family uses (header facts kept)."""
        return load_audio(path, seconds=self.seconds)

    def frames(self, n_samples: int) -> list[int]:
        """Valid mel frames of each piece for a clip of `n_samples` samples."""
        return [num_frames(n_samples, self.limit)]

    def n_tokens(self, n_samples: int) -> int:
        """Audio tokens a clip of `n_samples` samples gives (0: too short)."""
        return sum(num_audio_tokens(f) for f in self.frames(n_samples))

    def check(self, audio: np.ndarray, name: str) -> None:
        """The clip rules without computing features (MLX-free): mono, finite, at least one audio token."""
        used, name, *_ = clip_facts(audio, name, self.limit)
        if self.n_tokens(np.shape(audio)[0]) == 0:
            raise too_short(name, np.shape(audio)[0])

    def features(self, audio: np.ndarray, name: str | None = None) -> AudioFeatures:
        raise NotImplementedError

    def silence(self, clip: AudioFeatures) -> AudioFeatures:
        """Digital silence with the same pieces and valid frames as `clip` (its features depend on nothing else)."""
        return self.features(np.zeros(clip.n_frames * HOP_LENGTH, np.float32), "silence")

    def _facts(self, audio, name):
        used, name, duration, truncated, damage = clip_facts(audio, name, self.limit)
        n = np.shape(audio)[0]
        if self.n_tokens(n) == 0:
            raise too_short(name, n)
        if truncated:
            warnings.warn(f"{name}: {duration:.1f} s clip truncated to its first {self.seconds:g} s ({self.why})",
                          TruncatedAudioWarning, stacklevel=3)
        return used, name, duration, truncated, damage, min(n, self.limit) / SAMPLE_RATE

    def __repr__(self):
        return f"{type(self).__name__}({self.family}, {self.seconds:g} s)"


class Window(FrontEnd):
    """Qwen2-Audio: one 30 s window (`audio.audio_features`, unchanged)."""

    family, why = "Qwen2-Audio", "Qwen2-Audio's window"

    def features(self, audio, name=None):
        return audio_features(audio, name)


class Windows(FrontEnd):
    """Audio Flamingo 3: 30 s windows, each zero-padded to 30 s and transformed alone, at most `max_windows`."""

    family = "Audio Flamingo 3"

    def __init__(self, max_windows: int = 20):
        if max_windows < 1:
            raise AudioError(f"the processor allows {max_windows} windows; it needs at least one")
        self.max_windows = int(max_windows)
        self.limit = self.max_windows * CHUNK_SAMPLES
        self.why = f"Audio Flamingo 3's limit: {self.max_windows} windows of 30 s"

    def frames(self, n_samples):
        n = min(max(int(n_samples), 0), self.limit)
        return [num_frames(min(CHUNK_SAMPLES, n - s)) for s in range(0, max(n, 1), CHUNK_SAMPLES)]

    def features(self, audio, name=None):
        import mlx.core as mx

        from .mel import log_mel

        used, name, duration, truncated, damage, seconds = self._facts(audio, name)
        frames = self.frames(used.shape[0])
        mel = [log_mel(used[w * CHUNK_SAMPLES:(w + 1) * CHUNK_SAMPLES]) for w in range(len(frames))]
        mel = mel[0] if len(mel) == 1 else mx.concatenate(mel, axis=1)
        return AudioFeatures(mel, sum(frames), self.n_tokens(used.shape[0]), duration, truncated, seconds, damage,
                             windows=tuple(frames))


class Whole(FrontEnd):
    """Qwen2.5-Omni: one spectrogram of the whole clip, zero-padded to `chunk_length` seconds; the valid frames."""

    family = "Qwen2.5-Omni"

    def __init__(self, chunk_length: float = 300):
        if not chunk_length > 0:
            raise AudioError(f"the feature extractor's chunk_length is {chunk_length}; it must be positive")
        self.limit = int(round(chunk_length * SAMPLE_RATE))
        self.why = f"Qwen2.5-Omni's feature extractor pads and cuts to chunk_length {chunk_length:g} s"

    def features(self, audio, name=None):
        from .mel import log_mel_valid

        used, name, duration, truncated, damage, seconds = self._facts(audio, name)
        n_frames = num_frames(used.shape[0], self.limit)
        return AudioFeatures(log_mel_valid(used, self.limit), n_frames, num_audio_tokens(n_frames), duration,
                             truncated, seconds, damage)


def max_frames(front: FrontEnd) -> int:
    """The most valid frames a clip can have with this front end."""
    return sum(front.frames(front.limit)) if isinstance(front, Windows) else math.ceil(front.limit / HOP_LENGTH)


__all__ = ["FrontEnd", "Window", "Windows", "Whole", "CHUNK_FRAMES", "max_frames"]
