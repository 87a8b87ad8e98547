"""Answers: one at a time through mlx-lm's `stream_generate`, or many answers to one prompt that
share its prefill and decode together as one batch.

One answer (`generate`): mlx-lm does the work (chunked prefill, KV cache, async decode, sampler,
eos handling); we hand it the prompt ids with the merged audio+text embeddings. Hooks installed
on the model (capture, steering, ablation) act inside it.

Many answers (`prefill` + `decode`): conditions that differ only by an edit of the last block's
output (the baseline, every steering strength, random-head controls, fixed vectors) see the same
KV cache for the whole prompt, so the prompt runs through the decoder once. Each answer is a row
of one batch: at T its logits are `unembed(h_final[T] + delta)`, and every decode step adds each
row's delta to the last block's output. The steps mirror mlx-lm's `generate_step` (every prompt
position but T in chunks, then T alone, greedy argmax of the log-probabilities), so each row's
tokens are the ones `generate` gives with the same edit applied through a hook.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .chat import Processor
from .headset import listening
from .hooks import AUDIO_MASS, RESID, Capture
from .interp.edit import Row, add
from .kvcache import keep_rows, repeat
from .prompt import Prompt

PREFILL_STEP = 2048  # mlx-lm's prefill chunk


def stream_generate(
    model,
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
    start: int = 0,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield mlx-lm `GenerationResponse`s; `temp=0` is greedy (argmax). `start` > 0 with a
    `prompt_cache` (mlx-lm's keyword) that holds the prompt's first `start` positions already:
    only the rest is prefilled."""
    max_tokens = min(max_tokens, model.max_positions - len(prompt.ids))
    if seed is not None:
        mx.random.seed(seed)
    if top_k >= model.vocab_size:  # keeping every token is no top-k at all
        top_k = 0
    sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    yield from mlx_lm_stream_generate(
        model,
        processor.tokenizer,
        mx.array(prompt.ids[start:]),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        input_embeddings=prompt.embeddings[start:],
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
    listening: float | None = None  # the listening score at T, when heads were given
    listening_tokens: list[float] | None = None  # at the position that chose each answer token
    audio_mass: np.ndarray | None = field(default=None, repr=False)  # (layers, heads) at T, when asked for
    timing: dict | None = None  # seconds of the shared work behind this answer (prefill, silence, decode, batch)

    def to_json(self) -> dict:
        optional = ("listening", "listening_tokens", "timing")
        d = {k: v for k, v in self.__dict__.items() if k != "audio_mass" and not (k in optional and v is None)}
        if self.audio_mass is not None:
            d["audio_mass"] = np.round(self.audio_mass.astype(np.float64), 7).tolist()
        return d


def generate(model, processor: Processor, prompt: Prompt, on_text=None, **kw) -> Answer:
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
        text="".join(text), tokens=tokens, prompt_tokens=last.prompt_tokens, prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens, generation_tps=last.generation_tps,
        peak_memory=last.peak_memory, finish_reason=last.finish_reason, audio_tokens=prompt.n_audio_tokens,
        audio_seconds=prompt.audio_seconds, encode_seconds=prompt.encode_seconds,
    )


# -- one prefill, many answers ---------------------------------------------------------------------

@dataclass
class Prefill:
    """A prompt run once through the decoder with no edit."""

    prompt: Prompt
    cache: list  # the KV cache of every prompt position, T included
    final: mx.array  # (hidden,) the last block's output at T, before the final norm (model dtype)
    resid: dict[int, mx.array] = field(default_factory=dict)  # {layer: block output at T, float32}
    audio_mass: np.ndarray | None = None  # (layers, heads) at T
    seconds: float = 0.0


def prefill(model, prompt: Prompt, *, layers: Sequence[int] = (), audio_mass: bool = False,
            step: int = PREFILL_STEP) -> Prefill:
    """Run the prompt as `generate_step` does (all positions but T in chunks, then T alone), keep
    the cache, and read at T the residual of `layers` and, if asked, every head's audio mass."""
    tic = time.perf_counter()
    blocks = model.blocks
    cache = make_prompt_cache(model)
    emb, T = prompt.embeddings, prompt.last
    for a in range(0, T, step):
        blocks(emb[None, a:min(a + step, T)], cache)
        mx.eval([c.state for c in cache])
    names = [RESID.format(l) for l in sorted(set(layers))] + ([AUDIO_MASS.format("*")] if audio_mass else [])
    with Capture(model, names, audio_positions=prompt.audio_positions, at=T) as cap:
        h = blocks(emb[None, T:], cache)
        mx.eval(h, [c.state for c in cache])
    resid = {l: cap.resid(l, T).astype(mx.float32) for l in set(layers)}
    mass = cap.audio_mass(T) if audio_mass else None
    mx.eval(resid)
    return Prefill(prompt, cache, h[0, -1], resid, mass, time.perf_counter() - tic)


@dataclass
class Decoded:
    tokens: list[int]
    finish_reason: str
    listening_tokens: list[float] | None = None


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # as generate_step, before the argmax


def decode(model, processor: Processor, pre: Prefill, rows: Sequence[Row], max_tokens: int, *,
           listen_heads: Sequence[tuple[int, int]] = ()) -> list[Decoded]:
    """Greedy answers for `rows` from one prefill, decoded together; a row leaves the batch when it
    ends (eos or `max_tokens`). `pre` is left as it was, so it can serve again.

    `listen_heads`: also record, per row, the listening score (mean audio mass of these heads) at
    the position that chose each answer token (T for the first)."""
    T, n = pre.prompt.last, len(rows)
    max_tokens = max(0, min(max_tokens, model.max_positions - len(pre.prompt.ids)))
    out = [Decoded([], "length") for _ in rows]
    if max_tokens == 0 or n == 0:
        return out
    if listen_heads and pre.audio_mass is None:
        raise ValueError("listening per token needs a prefill with audio_mass=True")
    dt = pre.final.dtype
    zero = mx.zeros_like(pre.final)
    first = mx.stack([zero if r.delta is None else r.delta.astype(dt) for r in rows])  # (n, hidden)
    later = mx.stack([zero if r.delta is None or not r.every_step else r.delta.astype(dt) for r in rows])
    steered = any(r.delta is not None and r.every_step for r in rows)
    y = mx.argmax(_logprobs(model.unembed(add(pre.final[None], first)[:, None])[:, -1]), axis=-1)
    mx.async_eval(y)

    eos = set(processor.tokenizer.eos_token_ids)
    cache = repeat(pre.cache, n)
    alive = list(range(n))
    state = {"delta": later}

    def steer(h, point):  # each row's edit of the last block's output, at every decode step
        return add(h, state["delta"][:, None])

    layers = sorted({l for l, _ in listen_heads})
    listen = Capture(model, [AUDIO_MASS.format(l) for l in layers], audio_positions=pre.prompt.audio_positions,
                     at=slice(T + 1, None)) if listen_heads else None
    history: list[list[int]] = []  # which rows were in the batch at each decode step
    hooks = [(RESID.format(model.n_layers - 1), steer)] if steered else []
    with model.hooks.using(hooks):
        if listen is not None:
            listen.__enter__()
        try:
            for step in range(max_tokens):
                last_step = step == max_tokens - 1
                nxt = None
                if not last_step:  # build the next step before reading this one (mlx-lm's pipelining)
                    logits = model(y[:, None], cache=cache)
                    nxt = mx.argmax(_logprobs(logits[:, -1]), axis=-1)
                    mx.async_eval(nxt)
                    history.append(list(alive))
                keep = []
                for k, (i, t) in enumerate(zip(alive, y.tolist())):
                    if t in eos:
                        out[i].finish_reason = "stop"
                        continue
                    out[i].tokens.append(t)
                    if not last_step:
                        keep.append(k)
                if last_step or not keep:
                    break
                if len(keep) < len(alive):
                    idx = mx.array(keep)
                    keep_rows(cache, idx)
                    nxt = nxt[idx]
                    state["delta"] = state["delta"][idx]
                    alive = [alive[k] for k in keep]
                y = nxt
        finally:
            if listen is not None:
                listen.__exit__(None, None, None)
    if listen_heads:
        _listening(out, pre, listen, history, listen_heads, T)
    return out


def _listening(out: list[Decoded], pre: Prefill, cap: Capture, history, heads, T: int):
    at_T = listening(pre.audio_mass, heads) if pre.audio_mass is not None else None
    steps = {l: [np.array(v[:, 0]) for v in cap.values.get(AUDIO_MASS.format(l), [])] for l, _ in heads}
    for i, d in enumerate(out):
        scores = [at_T]
        for s, rows in enumerate(history[: max(0, len(d.tokens) - 1)]):
            k = rows.index(i)
            mass = np.full(pre.audio_mass.shape, np.nan, np.float32)  # this row's heads at this step
            for l in steps:
                mass[l] = steps[l][s][k]
            scores.append(listening(mass, heads))
        d.listening_tokens = scores[: len(d.tokens)] if d.tokens else []


def detokenize(processor: Processor, tokens: Sequence[int]) -> str:
    """The text `stream_generate` would have streamed for these tokens."""
    detok = processor.tokenizer.detokenizer
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    return detok.text
