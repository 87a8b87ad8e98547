"""Asking the model about audio: prompt preparation and streamed generation through mlx-lm.

mlx-lm's `stream_generate` does the work (chunked prefill, KV cache, async decode, sampler, eos
handling); we hand it the prompt ids together with the merged audio+text embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .audio import AudioFeatures, audio_features, load_audio
from .errors import ListenError
from .model import Model
from .prompt import Processor, messages_for


@dataclass
class Prompt:
    ids: list[int]
    embeddings: mx.array  # (T, hidden): text embeddings with the audio features merged in
    clips: list[AudioFeatures]
    audio_positions: np.ndarray = field(repr=False)  # indices of the <|AUDIO|> tokens
    encode_seconds: float = 0.0
    # Values derived from this prompt that several answers to it share (e.g. the silence pass of
    # steering, the same for every alpha of a sweep), keyed by who computed them.
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_audio_tokens(self) -> int:
        return int(self.audio_positions.size)

    @property
    def audio_seconds(self) -> float:
        return sum(c.duration for c in self.clips)


def as_features(clip, name: str | None = None) -> AudioFeatures:
    """A path, a 16 kHz float array, or ready `AudioFeatures`."""
    if isinstance(clip, AudioFeatures):
        return clip
    if isinstance(clip, np.ndarray):
        return audio_features(clip, name or "audio")
    return audio_features(load_audio(clip), name or str(clip))


def prepare(
    model: Model,
    processor: Processor,
    clips: Sequence,
    question: str,
    system: str | None = None,
) -> Prompt:
    """Audio → features → encoder/projector; prompt → ids; merge. One call per question."""
    feats = [as_features(c) for c in clips]
    ids = processor.encode(messages_for(question, len(feats), system), [f.n_tokens for f in feats])
    limit = model.config.text_config.max_position_embeddings
    if len(ids) >= limit:
        raise ListenError(f"the prompt is {len(ids)} tokens, over the model's context of {limit}")
    tic = time.perf_counter()
    audio = [model.encode_audio(f.mel, f.n_frames) for f in feats]
    mx.eval(audio)
    encode_seconds = time.perf_counter() - tic
    emb = model.embed(ids, audio)
    positions = np.flatnonzero(np.asarray(ids) == model.config.audio_token_index)
    return Prompt(ids, emb, feats, positions, encode_seconds)


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield mlx-lm `GenerationResponse`s; `temp=0` is greedy (argmax)."""
    limit = model.config.text_config.max_position_embeddings
    max_tokens = min(max_tokens, limit - len(prompt.ids))
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    yield from mlx_lm_stream_generate(
        model,
        processor.tokenizer,
        mx.array(prompt.ids),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        input_embeddings=prompt.embeddings,
        **kwargs,
    )


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None
    audio_tokens: int
    audio_seconds: float
    encode_seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def generate(model: Model, processor: Processor, prompt: Prompt, on_text=None, **kw) -> Answer:
    """Run `stream_generate` to the end; `on_text(segment)` receives the streamed text."""
    text, tokens, last = [], [], None
    for r in stream_generate(model, processor, prompt, **kw):
        if on_text is not None and r.text:
            on_text(r.text)
        text.append(r.text)
        if r.finish_reason != "stop":  # the final response repeats the eos token; not output
            tokens.append(r.token)
        last = r
    return Answer(
        text="".join(text),
        tokens=tokens,
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        peak_memory=last.peak_memory,
        finish_reason=last.finish_reason,
        audio_tokens=prompt.n_audio_tokens,
        audio_seconds=prompt.audio_seconds,
        encode_seconds=prompt.encode_seconds,
    )
