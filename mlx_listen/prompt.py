"""A prepared prompt: token ids, the audio run through the tower and projector once, and the
merged input embeddings that the decoder reads.

`prepare` is the one place audio meets text: clips → the family's front end (reading, windows,
log-mel) → audio tower → projector, the question → chat template → ids, then the projected audio
written over the placeholder runs.
Everything downstream (answers, capture, steering, patching, scoring) starts from a `Prompt`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from .audio import AudioFeatures
from .chat import Processor, messages_for
from .errors import ListenError


@dataclass
class Prompt:
    ids: list[int]
    embeddings: mx.array  # (T + 1, hidden): text embeddings with the audio features merged in
    clips: list[AudioFeatures]
    audio_positions: np.ndarray = field(repr=False)  # indices of the <|AUDIO|> tokens
    encoder_out: list[mx.array] = field(default_factory=list, repr=False)  # per clip, the audio tower's output
    audio_embeddings: list[mx.array] = field(default_factory=list, repr=False)  # per clip, after the projector
    encode_seconds: float = 0.0

    @property
    def last(self) -> int:
        """T: the last prompt position, the one that predicts the first answer token."""
        return len(self.ids) - 1

    @property
    def n_audio_tokens(self) -> int:
        return int(self.audio_positions.size)

    @property
    def audio_seconds(self) -> float:
        return sum(c.duration for c in self.clips)

    @property
    def audio_seconds_used(self) -> float:
        """What the encoder saw (each clip up to the family's limit)."""
        return sum(c.seconds_used for c in self.clips)


def as_features(clip, name: str | None = None, front=None) -> AudioFeatures:
    """A path, a 16 kHz float array, or ready `AudioFeatures`, through `front` (a model's `front_end`;
    default Qwen2-Audio's)."""
    if isinstance(clip, AudioFeatures):
        return clip
    if front is None:
        from .frontend import Window

        front = Window()
    if isinstance(clip, np.ndarray):
        return front.features(clip, name)
    return front.features(front.load(clip), name or str(clip))


def prepare(model, processor: Processor, clips: Sequence, question: str, system: str | None = None) -> Prompt:
    """Audio → the family's features → encoder/projector; prompt → ids; merge. One call per question."""
    feats = [as_features(c, front=model.front_end) for c in clips]
    ids = processor.encode(messages_for(question, len(feats), system), [f.n_tokens for f in feats])
    limit = model.max_positions
    if len(ids) >= limit:
        raise ListenError(f"the prompt is {len(ids)} tokens, over the model's context of {limit}")
    tic = time.perf_counter()
    enc, audio = zip(*[model.encode(f) for f in feats]) if feats else ((), ())
    enc, audio = list(enc), list(audio)
    mx.eval(enc, audio)
    encode_seconds = time.perf_counter() - tic
    emb = model.embed(ids, audio)
    positions = model.audio_positions(ids)
    return Prompt(ids, emb, feats, positions, enc, audio, encode_seconds)


def with_audio(model, prompt: Prompt, audio: Sequence[mx.array]) -> Prompt:
    """The same prompt with other projected audio over its `<|AUDIO|>` runs (e.g. silence of the
    same length): same ids, same positions."""
    return Prompt(prompt.ids, model.embed(prompt.ids, audio), prompt.clips, prompt.audio_positions,
                  audio_embeddings=list(audio))
