"""Conditions: the ways of answering one prompt that a run compares, and answering them together.

A `Condition` is the plain model (the baseline), a steering configuration (`steering.SteerConfig`:
per-input audio–silence direction, fixed vector, any α or head set), or an intervention that
changes the forward pass itself (`intervene`: a function `(model, prompt) -> context manager`
that installs hooks for one whole answer, e.g. head ablation).

`Answerer` answers one prompt under many conditions with the least work: every condition whose
edit is on the last block's output (the baseline, steering, random-head controls, vectors)
shares one prefill, one silence pass (over the union of their layers) and one batched decode;
the others each get their own prefill and decode with their hooks installed. Greedy decoding.

A forward pass that is not finite is an error, never an answer or a score: a prefill whose last
block output at T holds NaN or inf (every condition of that prefill), a steering edit whose
`h + α·d(x)` is not finite (that row: e.g. α = 1e308), or option log-probs that are not finite
give the condition's `Response.error` and no answer (`eval`, `heads`, `experiment` record the item
as failed for that condition). Rows decode in batches of at most `max_batch` (each row holds its
own copy of the prompt's KV cache while it decodes).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager, Sequence

import mlx.core as mx
import numpy as np

from ..answers import Answer, Decoded, Prefill, decode, detokenize, prefill
from ..errors import ListenError
from ..headset import control_sets, listening
from ..interp.ablation import Ablation
from ..interp.edit import Row, add
from ..interp.scoring import score_options
from ..interp.steering import Silence, SteerConfig, Steerer
from ..prompt import Prompt


@dataclass
class Condition:
    name: str
    steer: SteerConfig | None = None
    intervene: Callable[..., ContextManager] | None = None
    settings: dict = field(default_factory=dict)  # what identifies it (recorded in run.json and summaries)

    def describe(self) -> dict:
        d = {"decoding": "greedy", **self.settings}
        if self.steer is not None:
            d["steering"] = self.steer.to_json()
        return d


def baseline(name: str = "base") -> Condition:
    return Condition(name)


def steered(config: SteerConfig, name: str = "steered", settings: dict | None = None) -> Condition:
    return Condition(name, steer=config, settings=dict(settings or {}))


def ablated(spec: Ablation, name: str = "ablated") -> Condition:
    """An ablated condition (its own prefill: the edit changes every later layer's keys and values)."""
    return Condition(name, intervene=spec.hooks, settings={"ablation": spec.to_json()})


def ablation_controls(spec: Ablation, n_layers: int, n_heads: int, n: int, seed: int = 0) -> list[Condition]:
    """`n` random head sets matched to `spec` (`headset.control_sets`), ablated the same way."""
    sets = control_sets(spec.heads, n_layers, n_heads, n, seed) if n else []
    return [ablated(replace(spec, heads=hs), f"ablate-random-{i + 1}") for i, hs in enumerate(sets)]


def for_options(steer: SteerConfig | None = None, steer_settings: dict | None = None, ablation: Ablation | None = None,
                *, shape: tuple[int, int] | None = None, ablate_controls: int = 0, compare: bool = False,
                seed: int = 0) -> list[Condition]:
    """The conditions of `eval`'s options: steered and/or ablated (with `ablate_controls` matched
    random-head ablations; `shape` = (layers, heads) sizes them), the baseline first when
    comparing or when nothing else is asked."""
    if ablate_controls and ablation is None:
        raise ListenError("ablation controls need heads to ablate (--ablate)")
    conds = [steered(steer, settings=steer_settings)] if steer is not None else []
    if ablation is not None:
        conds.append(ablated(ablation))
        if ablate_controls:
            conds += ablation_controls(ablation, *shape, ablate_controls, seed)
    if compare and not conds:
        raise ListenError("--compare needs a condition to compare: --steer, --vector or --ablate")
    return ([baseline()] if compare or not conds else []) + conds


@dataclass
class Response:
    """One condition's result for one prompt: its greedy answer and/or each option's log-prob."""

    answer: Answer | None = None  # None when only scoring
    logprobs: np.ndarray | None = None  # (n_options,) float64, when options were given
    timing: dict = field(default_factory=dict)  # seconds of the shared work (prefill, silence, decode, score, batch)
    error: str | None = None  # why this condition has no answer (a forward pass that is not finite)


NONFINITE_PREFILL = "the forward pass gave NaN or inf at the last prompt token"
NONFINITE_EDIT = "the steering edit is not finite (h + alpha·d(x) overflows or holds NaN)"
NONFINITE_SCORES = "the option log-probs are not finite (NaN or inf in the forward pass)"


def _finite(x: mx.array, axis=None) -> mx.array:
    return mx.isfinite(x.astype(mx.float32)).all(axis=axis)


class Answerer:
    """Greedy answers to prompts under `conditions`, for one model (see the module docstring)."""

    def __init__(self, model, processor, conditions: Sequence[Condition], *, max_tokens: int = 256,
                 listen_heads: Sequence[tuple[int, int]] = (), audio_mass: bool = False, silence: Silence | None = None,
                 max_batch: int = 32):
        names = [c.name for c in conditions]
        if len(set(names)) != len(names):
            raise ValueError(f"condition names must be distinct: {names}")
        self.model, self.processor, self.max_tokens = model, processor, max_tokens
        self.max_batch = max(1, int(max_batch))
        self.conditions = list(conditions)
        self.listen_heads = list(listen_heads)
        self.audio_mass = audio_mass or bool(listen_heads)  # every head's audio mass at T, on each answer
        self.silence = silence or Silence(model)  # share one across answerers: the encodings are cached per length
        self.steerers = {c.name: Steerer(model, c.steer, self.silence) for c in conditions if c.steer is not None}
        n_layers = model.n_layers
        self._shared = [c for c in conditions if c.intervene is None
                        and (c.steer is None or c.steer.edits_final(n_layers))]

    def __call__(self, prompt: Prompt, only: Sequence[str] | None = None) -> dict[str, Answer]:
        """Answers by condition name (`only`: a subset, e.g. what a resumed run still lacks)."""
        return {name: r.answer for name, r in self.respond(prompt, only=only).items()}

    def score(self, prompt: Prompt, options: Sequence[Sequence[int]],
              only: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each option's log-prob (n_options,) by condition name, without answering."""
        return {name: r.logprobs for name, r in self.respond(prompt, options, only=only, generate=False).items()}

    def respond(self, prompt: Prompt, options: Sequence[Sequence[int]] | None = None,
                only: Sequence[str] | None = None, generate: bool = True) -> dict[str, Response]:
        """Greedy answers (`generate`) and/or each option's log-prob (`options`: token ids per option,
        `scoring.option_ids`) by condition name. Both come from the same prefills: one for every
        condition that edits only the last block's output, one per other condition inside its hooks."""
        want = set(only) if only is not None else {c.name for c in self.conditions}
        shared = [c for c in self._shared if c.name in want]
        own = [c for c in self.conditions if c.name in want and c not in self._shared]
        out = self._respond_shared(prompt, shared, options, generate) if shared else {}
        for c in own:
            out[c.name] = self._respond_own(prompt, c, options, generate)
        return {c.name: out[c.name] for c in self.conditions if c.name in out}

    def _respond_shared(self, prompt: Prompt, conds: list[Condition], options, generate: bool) -> dict[str, Response]:
        steer = [c.steer for c in conds if c.steer is not None]
        per_input = sorted({l for s in steer if s.reads_input for l in s.layers})
        need_mass = self.audio_mass or any(s.strength == "listening" for s in steer)
        pre = prefill(self.model, prompt, layers=per_input, audio_mass=need_mass)
        silence, silence_s = None, 0.0
        if per_input:
            tic = time.perf_counter()
            silence = self.silence.residuals(prompt, per_input)
            silence_s = time.perf_counter() - tic
        rows = []
        for c in conds:
            if c.steer is None:
                rows.append(Row())
            else:
                delta = self.steerers[c.name].delta(pre.resid, silence, pre.final, pre.audio_mass)
                rows.append(Row(delta, every_step=c.steer.at == "all"))
        mx.eval([r.delta for r in rows if r.delta is not None])
        errors = self._row_errors(pre, rows)
        good = [i for i, e in enumerate(errors) if e is None]
        logprobs, score_s, decoded, decode_s = None, 0.0, [None] * len(conds), 0.0
        if options is not None and good:  # every condition's option log-probs from one batched forward
            tic = time.perf_counter()
            lp = score_options(self.model, pre, options, [rows[i] for i in good])
            score_s = time.perf_counter() - tic
            logprobs = [None] * len(conds)
            for j, i in enumerate(good):
                logprobs[i] = lp[j]
                if not np.isfinite(lp[j]).all():
                    errors[i] = NONFINITE_SCORES
        if generate:
            tic = time.perf_counter()
            todo = [i for i, e in enumerate(errors) if e is None]
            for a in range(0, len(todo), self.max_batch):  # each row holds a copy of the cache: bounded batches
                part = todo[a:a + self.max_batch]
                for i, d in zip(part, decode(self.model, self.processor, pre, [rows[i] for i in part], self.max_tokens,
                                             listen_heads=self.listen_heads)):
                    decoded[i] = d
            decode_s = time.perf_counter() - tic
        timing = {"prefill": pre.seconds, "silence": silence_s, "decode": decode_s,
                  **({"score": score_s} if options is not None else {}), "batch": len(conds)}
        return {c.name: Response(self._answer(prompt, pre, d, timing) if d is not None and errors[i] is None else None,
                                 logprobs[i] if logprobs is not None and errors[i] is None else None, timing, errors[i])
                for i, (c, d) in enumerate(zip(conds, decoded))}

    def _row_errors(self, pre: Prefill, rows: list[Row]) -> list[str | None]:
        """Per row, why it cannot be answered: a prefill that is not finite at T, or an edit that is not."""
        if not _finite(pre.final).item() or (pre.audio_mass is not None and not np.isfinite(pre.audio_mass).all()):
            return [NONFINITE_PREFILL] * len(rows)
        edited = [i for i, r in enumerate(rows) if r.delta is not None]
        out: list[str | None] = [None] * len(rows)
        if edited:
            ok = _finite(mx.stack([add(pre.final, rows[i].delta) for i in edited]), axis=-1).tolist()
            for i, fine in zip(edited, ok):
                out[i] = None if fine else NONFINITE_EDIT
        return out

    def _respond_own(self, prompt: Prompt, cond: Condition, options, generate: bool) -> Response:
        if cond.steer is not None:
            ctx = self.steerers[cond.name].applied(prompt)
        else:
            ctx = cond.intervene(self.model, prompt) if cond.intervene else nullcontext()
        decoded, logprobs, score_s, decode_s, error = None, None, 0.0, 0.0, None
        with ctx:  # the condition's hooks act on the prefill, on the continuations and on the decode
            pre = prefill(self.model, prompt, audio_mass=self.audio_mass)
            if not _finite(pre.final).item() or (pre.audio_mass is not None and not np.isfinite(pre.audio_mass).all()):
                error = NONFINITE_PREFILL
            if options is not None and error is None:
                tic = time.perf_counter()
                logprobs = score_options(self.model, pre, options)[0]
                score_s = time.perf_counter() - tic
                if not np.isfinite(logprobs).all():
                    error, logprobs = NONFINITE_SCORES, None
            if generate and error is None:
                tic = time.perf_counter()
                decoded = decode(self.model, self.processor, pre, [Row()], self.max_tokens,
                                 listen_heads=self.listen_heads)[0]
                decode_s = time.perf_counter() - tic
        timing = {"prefill": pre.seconds, "silence": 0.0, "decode": decode_s,
                  **({"score": score_s} if options is not None else {}), "batch": 1}
        return Response(self._answer(prompt, pre, decoded, timing) if decoded is not None else None, logprobs, timing,
                        error)

    def _answer(self, prompt: Prompt, pre: Prefill, d: Decoded, timing: dict) -> Answer:
        n_gen = len(d.tokens) + (d.finish_reason == "stop")
        score = d.listening_tokens[0] if d.listening_tokens else (
            listening(pre.audio_mass, self.listen_heads) if self.listen_heads else None)
        return Answer(
            text=detokenize(self.processor, d.tokens), tokens=d.tokens, prompt_tokens=len(prompt.ids),
            prompt_tps=len(prompt.ids) / pre.seconds if pre.seconds else 0.0, generation_tokens=n_gen,
            generation_tps=n_gen / timing["decode"] if timing["decode"] else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=d.finish_reason,
            audio_tokens=prompt.n_audio_tokens, audio_seconds=prompt.audio_seconds,
            encode_seconds=prompt.encode_seconds, listening=score, listening_tokens=d.listening_tokens,
            audio_mass=pre.audio_mass if self.audio_mass else None, timing=timing,
        )
