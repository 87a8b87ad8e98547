"""Option log-prob scoring: how likely the model finds each choice, written in the prompt's format.

For a multiple-choice item, option i scores log P(continuation(choice_i) | prompt): the sum, over
the continuation's tokens, of the log-softmax (float32) of the logits that predict each token,
exactly what the model would assign to answering with those tokens right after the prompt. The
continuation is what the preset asks the model to write: `<answer>{choice}</answer>` for the
R1-AQA presets (for `r1-aqa-think` that is the answer without the thinking before it), the
choice text itself for the `mmau` preset. `choice` (argmax) and `margin` (the correct option's
log-prob minus the best other's) turn these into an accuracy and a continuous, graded score.

Sharing: the options differ only after T (the last prompt position), so the prompt runs through
the decoder once (`answers.prefill`, whose cache holds every prompt position, T included), then
ONE batched forward of every option's tokens but its last, right-padded (causal attention: the
padding never reaches a real position, and padded positions are never read). Token j of option
i is predicted at T for j = 0 (the prefill's `final`) and at the option's own position T + j
after that. The prompt's keys are shared by the batch, not copied into one cache row per option,
and the prefill is left as it was (it can serve `answers.decode` as well). Only the positions
that predict a continuation token are unembedded, in chunks of rows, so at most
(rows x vocab) logits exist at once.

Conditions that edit only the last block's output (the baseline, steering at any α, fixed
vectors, random-head controls: `steering.Row(delta, every_step)`) change nothing upstream, so the
same forward serves them all: a row's logits are unembed(h + delta), the delta at T and, with
`every_step`, at every continuation position, the rule `answers.decode` follows, so a row's
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

from .. import presets
from ..answers import Prefill, prefill
from ..errors import ListenError, ListenWarning
from ..kvcache import SharedPrefix
from ..prompt import Prompt
from .edit import Row, add

CHUNK_ELEMENTS = 1 << 25  # logits held at once (rows x vocab): 128 MB of float32


# -- what each option's answer looks like (the preset's answer format: `presets.continuation`) -----

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
        if not c.strip() and presets.canonical(preset) == "mmau":
            raise ListenError(f"choice {i} is empty: it has no answer to score")
        ids = continuation_ids(processor, prompt.ids, presets.continuation(preset, c))
        out.append(ids + [eos] if end else ids)
    return out


# -- scoring -------------------------------------------------------------------------------------

def _rows_of(rows) -> list[Row]:
    return [Row()] if rows is None else [r if isinstance(r, Row) else Row(r) for r in rows]


def score_options(model, pre: Prefill, options: Sequence[Sequence[int]], rows: Sequence[Row] | None = None, *,
                  per_token: bool = False, chunk_elements: int = CHUNK_ELEMENTS):
    """Log-probabilities of each option's tokens after the prompt, for each row (condition).

    `options`: token ids per option (`option_ids`). `rows`: `steering.Row(delta, every_step)` per
    condition, the delta (hidden,) added to the last block's output at T and, with `every_step`,
    at every continuation position (None: the plain model; `rows=None`: one plain row).
    Hooks installed on the model act on the continuations' forward call (batch = the options).

    Returns (n_rows, n_options) float64: per option the sum of its tokens' log-probs (each the
    float32 log-softmax of float32 logits); NaN where the forward pass was not finite (callers
    turn that into an error, never a score). `per_token=True`: also (n_rows, n_options, longest)
    float32, NaN past each option's end."""
    rows = _rows_of(rows)
    n, C = len(options), len(rows)
    lengths = np.array([len(o) for o in options], np.int64)
    if n == 0 or C == 0:
        empty = np.zeros((C, n))
        return (empty, np.zeros((C, n, 0), np.float32)) if per_token else empty
    if lengths.min() < 1:
        raise ValueError(f"option {int(np.argmin(lengths))} has no tokens")
    T, Lmax = pre.prompt.last, int(lengths.max())
    limit = model.max_positions
    if T + Lmax > limit:
        raise ListenError(f"the prompt ({T + 1} tokens) and its longest option ({Lmax}) exceed the model's context "
                          f"of {limit}")
    hidden = pre.final.shape[-1]
    h = mx.broadcast_to(pre.final[None, None], (n, 1, hidden))
    if Lmax > 1:  # every option's tokens but its last, right-padded, at positions T+1 ...
        fed = np.zeros((n, Lmax - 1), np.int32)
        for i, o in enumerate(options):
            fed[i, : len(o) - 1] = o[:-1]
        x = model.blocks(model.embed_tokens(mx.array(fed)), SharedPrefix.of(pre.cache))
        h = mx.concatenate([h, x], axis=1)  # (n, Lmax, hidden): position j predicts token j
    oi, pj = np.nonzero(np.arange(Lmax)[None] < lengths[:, None])  # the positions that predict a token
    flat = h.reshape(n * Lmax, hidden)[mx.array(oi * Lmax + pj)]
    mx.eval(flat)
    targets = mx.array(np.array([options[i][j] for i, j in zip(oi, pj)], np.int32))
    at_T = mx.array(pj == 0)[:, None]
    edited = [flat if r.delta is None else add(flat, r.delta, None if r.every_step else at_T) for r in rows]
    N = flat.shape[0]
    step = max(1, chunk_elements // model.vocab_size)
    lp = np.empty(C * N, np.float32)
    X = mx.concatenate(edited, axis=0) if C > 1 else edited[0]
    tgt = mx.concatenate([targets] * C) if C > 1 else targets
    for a in range(0, C * N, step):
        logits = model.unembed(X[a:a + step]).astype(mx.float32)
        got = mx.take_along_axis(logits, tgt[a:a + step, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
        lp[a:a + step] = np.array(got)
    tokens = np.full((C, n, Lmax), np.nan, np.float32)
    tokens[:, oi, pj] = lp.reshape(C, N)
    # the sum over each option's own tokens only: a NaN there (a forward pass that is not finite) stays
    # NaN, so no caller can read it as a log-prob of 0 (`np.nansum` made the first option win)
    real = np.arange(Lmax)[None, None] < lengths[None, :, None]
    sums = np.where(real, tokens.astype(np.float64), 0.0).sum(axis=-1)
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
