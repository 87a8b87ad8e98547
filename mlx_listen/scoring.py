"""Option log-prob scoring: how likely the model finds each choice, written in the prompt's format.

For a multiple-choice item, option i scores log P(continuation(choice_i) | prompt): the sum, over
the continuation's tokens, of the log-softmax (float32) of the logits that predict each token,
exactly what the model would assign to answering with those tokens right after the prompt. The
continuation is what the preset asks the model to write: `<answer>{choice}</answer>` for the
R1-AQA presets (for `r1-aqa-think` that is the answer without the thinking before it), the
choice text itself for the `mmau` preset. `choice` (argmax) and `margin` (the correct option's
log-prob minus the best other's) turn these into an accuracy and a continuous, graded score.

Sharing: the options differ only after T (the last prompt position), so the prompt runs through
the decoder once (`generate.prefill`, whose cache holds every prompt position, T included), then
ONE batched forward of every option's tokens but its last, right-padded (causal attention: the
padding never reaches a real position, and padded positions are never read). Token j of option
i is predicted at T for j = 0 (the prefill's `final`) and at the option's own position T + j
after that. The prompt's keys are shared by the batch, not copied into one cache row per option,
and the prefill is left as it was (it can serve `generate.decode` as well). Only the positions
that predict a continuation token are unembedded, in chunks of rows, so at most
(rows x vocab) logits exist at once.

Conditions that edit only the last block's output (the baseline, steering at any α, fixed
vectors, random-head controls: `generate.Row(delta, every_step)`) change nothing upstream, so the
same forward serves them all: a row's logits are unembed(h + delta), the delta at T and, with
`every_step`, at every continuation position, the rule `generate.decode` follows, so a row's
score is the probability of that answer under the same edit as the row's greedy answer. A
condition that changes the forward pass itself (head ablation, patching: hooks over a whole
answer) is scored by `score_prompt` inside its hooks, which then act on the prompt's own
prefill and on the continuations.

Tokenisation: the prompt ends with `<|im_start|>assistant\\n` and the continuation is encoded on
its own. That equals tokenising prompt and answer as one text whenever the join is a
pre-tokenisation boundary, which holds for every MMAU choice (both versions) under Qwen2's
pre-tokenizer; `continuation_ids` checks it per text and otherwise uses the joint text's tail.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask

from . import mmau
from .errors import ListenError, ListenWarning
from .generate import Prefill, Row, prefill
from .prompt import Prompt

CHUNK_ELEMENTS = 1 << 25  # logits held at once (rows x vocab): 128 MB of float32


# -- what each option's answer looks like ----------------------------------------------------------

def continuation(preset: str, choice: str) -> str:
    """The answer text a preset asks for, for one choice (stripped, as `extract_answer` reads it)."""
    preset = mmau.ALIASES.get(preset, preset)
    if preset not in mmau.PROMPTS:
        raise ListenError(f"unknown prompt preset {preset!r}; choose one of {', '.join(mmau.PROMPTS)}")
    c = choice.strip()
    return c if preset == "mmau" else f"<answer>{c}</answer>"


def _special_ids(tok) -> set[int]:
    ids = set(getattr(tok, "all_special_ids", None) or [])
    ids |= set((getattr(tok, "added_tokens_decoder", None) or {}).keys())
    return ids


def continuation_ids(processor, prompt_ids: Sequence[int], text: str) -> list[int]:
    """Token ids of `text` written right after `prompt_ids`.

    Encoded on its own (no special tokens), checked against tokenising the prompt's last plain-text
    stretch (after its last special token, e.g. `assistant\\n`) joined with `text`: if the join
    tokenises differently there, the joint text's tail is used; if the join would change the
    prompt's own last tokens (a text starting with a newline, say), the text's own ids are used
    (a token sequence the model can produce after this prompt) and a ListenWarning says so."""
    tok = processor.tokenizer
    alone = list(tok.encode(text, add_special_tokens=False))
    special = _special_ids(tok)
    ids = list(prompt_ids)
    k = len(ids)
    while k > 0 and ids[k - 1] not in special:
        k -= 1
    tail = ids[k:]
    if not tail:
        return alone
    joint = list(tok.encode(tok.decode(tail) + text, add_special_tokens=False))
    if joint[: len(tail)] == tail:
        return joint[len(tail):]
    warnings.warn(f"the answer {text!r} merges with the end of the prompt when tokenised together; scoring "
                  "its own tokens", ListenWarning, stacklevel=2)
    return alone


def option_ids(processor, prompt: Prompt, choices: Sequence[str], preset: str, *, end: bool = False) -> list[list[int]]:
    """Each choice's continuation as token ids; `end`: followed by the end-of-turn token, so that a
    choice that is a prefix of another (possible with the bare choice text of `mmau`) is not favoured."""
    out = []
    eos = processor.tokenizer.eos_token_id
    for i, c in enumerate(choices):
        if not c.strip() and mmau.ALIASES.get(preset, preset) == "mmau":
            raise ListenError(f"choice {i} is empty: it has no answer to score")
        ids = continuation_ids(processor, prompt.ids, continuation(preset, c))
        out.append(ids + [eos] if end else ids)
    return out


# -- scoring -------------------------------------------------------------------------------------

class _Branch:
    """The KV cache of one decoder layer for a batch of continuations of a cached prompt: each call
    sees the prompt's keys (shared across the batch, read from the prefill's cache, which is not
    changed) followed by its own. One forward call."""

    def __init__(self, cache):
        self.keys = cache.keys[..., : cache.offset, :]
        self.values = cache.values[..., : cache.offset, :]
        self.offset = cache.offset

    def update_and_fetch(self, keys, values):
        B = keys.shape[0]
        k = mx.concatenate([mx.broadcast_to(self.keys, (B, *self.keys.shape[1:])), keys], axis=2)
        v = mx.concatenate([mx.broadcast_to(self.values, (B, *self.values.shape[1:])), values], axis=2)
        self.offset += keys.shape[2]
        return k, v

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return create_attention_mask(N, self.offset, return_array, window_size)


def _rows_of(rows) -> list[Row]:
    return [Row()] if rows is None else [r if isinstance(r, Row) else Row(r) for r in rows]


def score_options(model, pre: Prefill, options: Sequence[Sequence[int]], rows: Sequence[Row] | None = None, *,
                  per_token: bool = False, chunk_elements: int = CHUNK_ELEMENTS):
    """Log-probabilities of each option's tokens after the prompt, for each row (condition).

    `options`: token ids per option (`option_ids`). `rows`: `generate.Row(delta, every_step)` per
    condition, the delta (hidden,) added to the last block's output at T and, with `every_step`,
    at every continuation position (None: the plain model; `rows=None`: one plain row).
    Hooks installed on the model act on the continuations' forward call (batch = the options).

    Returns (n_rows, n_options) float64: per option the sum of its tokens' log-probs (each the
    float32 log-softmax of float32 logits). `per_token=True`: also (n_rows, n_options, longest)
    float32, NaN past each option's end."""
    lm = model.language_model
    rows = _rows_of(rows)
    n, C = len(options), len(rows)
    lengths = np.array([len(o) for o in options], np.int64)
    if n == 0 or C == 0:
        empty = np.zeros((C, n))
        return (empty, np.zeros((C, n, 0), np.float32)) if per_token else empty
    if lengths.min() < 1:
        raise ValueError(f"option {int(np.argmin(lengths))} has no tokens")
    T, Lmax = pre.prompt.last, int(lengths.max())
    limit = model.config.text_config.max_position_embeddings
    if T + Lmax > limit:
        raise ListenError(f"the prompt ({T + 1} tokens) and its longest option ({Lmax}) exceed the model's context "
                          f"of {limit}")
    dt, hidden = pre.final.dtype, pre.final.shape[-1]
    h = mx.broadcast_to(pre.final[None, None], (n, 1, hidden))
    if Lmax > 1:  # every option's tokens but its last, right-padded, at positions T+1 ...
        fed = np.zeros((n, Lmax - 1), np.int32)
        for i, o in enumerate(options):
            fed[i, : len(o) - 1] = o[:-1]
        x = lm.model.blocks(lm.model.embed_tokens(mx.array(fed)), [_Branch(c) for c in pre.cache])
        h = mx.concatenate([h, x], axis=1)  # (n, Lmax, hidden): position j predicts token j
    oi, pj = np.nonzero(np.arange(Lmax)[None] < lengths[:, None])  # the positions that predict a token
    flat = h.reshape(n * Lmax, hidden)[mx.array(oi * Lmax + pj)]
    mx.eval(flat)
    targets = mx.array(np.array([options[i][j] for i, j in zip(oi, pj)], np.int32))
    at_T = mx.array(pj == 0)[:, None]
    edited = []
    for r in rows:
        if r.delta is None:
            edited.append(flat)
            continue
        d = r.delta.astype(dt)
        edited.append(flat + (d if r.every_step else mx.where(at_T, d, mx.zeros_like(d))))
    N = flat.shape[0]
    step = max(1, chunk_elements // lm.config.vocab_size)
    lp = np.empty(C * N, np.float32)
    X = mx.concatenate(edited, axis=0) if C > 1 else edited[0]
    tgt = mx.concatenate([targets] * C) if C > 1 else targets
    for a in range(0, C * N, step):
        logits = lm.unembed(X[a:a + step]).astype(mx.float32)
        got = mx.take_along_axis(logits, tgt[a:a + step, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
        lp[a:a + step] = np.array(got)
    tokens = np.full((C, n, Lmax), np.nan, np.float32)
    tokens[:, oi, pj] = lp.reshape(C, N)
    sums = np.nansum(tokens.astype(np.float64), axis=-1)
    return (sums, tokens) if per_token else sums


def score_prompt(model, prompt: Prompt, options: Sequence[Sequence[int]], rows: Sequence[Row] | None = None,
                 **kw):
    """`score_options` after the prompt's own prefill: for a condition that changes the forward pass,
    call it inside that condition's hooks (they act on the prompt and on every continuation; the
    continuations run as one batch, one row per option)."""
    return score_options(model, prefill(model, prompt), options, rows, **kw)


def option_logprobs(model, processor, prompt: Prompt, choices: Sequence[str], preset: str, *,
                    rows: Sequence[Row] | None = None, pre: Prefill | None = None, end: bool = False, **kw):
    """Each choice's log-prob in the preset's answer format, (n_rows, n_choices); `pre`: a prefill of
    this prompt to reuse (else one is run, with any installed hooks acting)."""
    options = option_ids(processor, prompt, choices, preset, end=end)
    return score_options(model, pre if pre is not None else prefill(model, prompt), options, rows, **kw)


# -- from log-probs to answers -----------------------------------------------------------------

def choice(logprobs) -> np.ndarray | int:
    """The chosen option (argmax over the last axis; the first on ties)."""
    c = np.argmax(np.asarray(logprobs), axis=-1)
    return int(c) if np.ndim(c) == 0 else c


def margin(logprobs, correct: int):
    """The correct option's log-prob minus the best other's (> 0: the correct option wins), over the
    last axis; NaN when there is no other option."""
    lp = np.asarray(logprobs, np.float64)
    others = np.delete(lp, correct, axis=-1)
    if others.shape[-1] == 0:
        out = np.full(lp.shape[:-1], np.nan)
    else:
        out = lp[..., correct] - others.max(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def option_probs(logprobs) -> np.ndarray:
    """The log-probs renormalised over the options (softmax over the last axis)."""
    lp = np.asarray(logprobs, np.float64)
    e = np.exp(lp - lp.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def answer_index(item: dict) -> int:
    """The index of an item's answer among its choices (compared stripped, as `load_items` checks)."""
    a = item["answer"].strip()
    for i, c in enumerate(item["choices"]):
        if c.strip() == a:
            return i
    raise ListenError(f"item {item.get('id')}: answer {item['answer']!r} is not one of its choices")


# -- per-item records and run summaries (eval, heads) ------------------------------------------

def row_fields(item: dict, logprobs) -> dict:
    """What a prediction row records of one item's option log-probs (n_options,)."""
    lp = np.asarray(logprobs, np.float64)
    correct = answer_index(item)
    best = choice(lp)
    return {"option_logprobs": [round(float(x), 6) for x in lp], "logprob_choice": best,
            "logprob_correct": best == correct, "margin": round(margin(lp, correct), 6)}


def summary(rows: Sequence[dict]) -> dict | None:
    """Log-prob accuracy (overall and per task, with 95% Wilson intervals), the margin's mean and
    median, and, where the rows also hold a generated answer (`choice`), how often the two agree.
    None when no row was scored."""
    rows = [r for r in rows if "logprob_choice" in r]
    if not rows:
        return None
    out = {"n": len(rows), "scorer": "option log-prob (argmax over the choices' continuations)"}
    groups = {"overall": rows} | {t: [r for r in rows if r.get("task") == t] for t in mmau.TASKS}
    acc, ci = {}, {}
    for name, g in groups.items():
        if g:
            k = sum(bool(r["logprob_correct"]) for r in g)
            acc[name], ci[name] = k / len(g), list(mmau.wilson(k, len(g)))
    m = np.array([r["margin"] for r in rows], np.float64)
    m = m[np.isfinite(m)]
    out.update(accuracy=acc, ci95=ci, correct=sum(bool(r["logprob_correct"]) for r in rows),
               margin_mean=float(m.mean()) if m.size else None, margin_median=float(np.median(m)) if m.size else None)
    gen = [r for r in rows if "raw_output" in r and "correct" in r]
    if gen:
        out["generation_accuracy"] = sum(bool(r["correct"]) for r in gen) / len(gen)
        out["agreement"] = sum(r.get("choice") == r["logprob_choice"] for r in gen) / len(gen)
    return out


def summary_line(s: dict | None) -> str:
    """One terminal line of `summary`."""
    if not s:
        return "log-prob scoring: no item scored"
    a = s["accuracy"]
    line = (f"log-prob accuracy {100 * a['overall']:.1f}% over {s['n']} items ("
            + ", ".join(f"{t} {100 * a[t]:.1f}" for t in mmau.TASKS if t in a) + ")")
    if s.get("margin_mean") is not None:
        line += f"; margin mean {s['margin_mean']:+.3f}, median {s['margin_median']:+.3f}"
    if "generation_accuracy" in s:
        line += f"; generation {100 * s['generation_accuracy']:.1f}%, same choice on {100 * s['agreement']:.1f}%"
    return line
