"""Activation patching, audio ↔ silence: where does the audio evidence enter the decoder?

The prompt runs with equal-length digital silence (the *target*), and one piece of the audio run's
(the *source*) activations is written over it: the residual stream after block l (`hook_resid_post`)
over one position group, or one head's attention output before `o_proj` (`attn.hook_z`) at T. How
much of the audio run's answer comes back is the effect of that piece.

Metric. A free-form answer's first token says little (R1-AQA's answers all start with `<answer>`),
so a run is scored on two whole answer continuations, teacher-forced after the prompt:

    m = log p(a) - log p(b)       (summed over each continuation's tokens, float32)

`a` is what the audio run answers, `b` what the silence run answers. With answer options (MMAU
items): the option with the highest log-probability under the audio run and under the silence
run (when both prefer the same one, `b` is the audio run's best other option); each option is
scored as its continuation text (`scoring.continuation`: `<answer>{choice}</answer>` for the
R1-AQA presets, the choice itself for `mmau`; tokenised by `scoring.option_ids`). Without options: the first `tokens` greedy tokens of each
run (with the end-of-answer token when an answer ends sooner). With `first_diff`, a and b are cut
after their first differing token: m is then that token's log-odds (the shared prefix
teacher-forced), every patch reaches it, and the heads cost about a third. A patch's restored fraction is `(m_patched - m_silence) / (m_audio - m_silence)`: 0 is the
silence run, 1 the audio run. When `|m_audio - m_silence|` is below `min_gap` the item is flagged
(raw m kept, no fraction averaged): the audio barely moves the answer there.

Position groups (absolute positions, T = the last prompt position):

| group | positions |
|---|---|
| `audio` | the `<|AUDIO|>` positions |
| `text` | every other position after the first audio position and before T (`<|audio_eos|>`, the question, the template) |
| `last` | T |
| `prefix` | the tokens `a` and `b` share at their start (`<answer>`), teacher-forced; only when there are any |

Positions before the first audio position are the same in both runs and never patched. Patching
every group at once at layer l gives the audio run's logits at the position that predicts the
first token where `a` and `b` differ; the tokens after it are positions of their own (different in
`a` and `b`, so never patched) that still read the silence run below layer l + 1, so even that
patch restores less than 1 when they carry audio evidence. Heads are patched at `last` (T), or
at T and the shared prefix (`head_at="last+prefix"`): with R1-AQA's `<answer>` the first differing
token is predicted at the prefix's last position, which a head's output at T alone reaches only
through later layers' attention to T.

Cost. Nothing a patch does not change is recomputed:
- each run (audio, silence) is prefilled once, as mlx-lm does (all positions but T in chunks, then
  T), keeping its KV cache and, recorded with `Capture`, the values patching reads: the audio run's
  `hook_resid_post` of every layer from the first audio position on and its `hook_z` from T on,
  the silence run's `hook_resid_pre` of every layer from the first audio position on;
- a patch at layer l that starts at position p changes nothing before layer l or before p, so it
  runs only blocks l..L-1 over positions p.. (the silence run's block-l input there, its KV cache
  before p), the patch written by a hook on its point that edits only its own batch rows;
- patches with the same layer and first position run together as rows of one batch (at T: the
  `last` patch and every head of the layer), at most `max_rows` rows at a time; the rows share
  the silence cache before p, kept once and broadcast, never copied per row;
- the continuations' shared prefix runs once per patch, then each patch forks into one row per
  continuation for the rest; logits are computed only where a continuation token is scored.

With n prompt tokens, n_text of them in `text`, L layers, H heads, j shared prefix tokens and r
more tokens per continuation, one item costs 2 prefills plus about
(L + 1) / 2 x (1 + n_text / n + (H + 2) (1 + j + 2r) / n) prefills' worth of blocks, and 1 + 2r
unembeddings per patch. For Qwen2-Audio (L = H = 32, vocabulary 156k), j = 3, r = 4: about 45 plain
prefills per item with a 10 s clip (groups 20, heads 23), 29 with a 30 s clip; `first_diff` (r = 0)
brings that to about 27 and 22 (heads 7 and 3). Every other installed hook is held off while patching runs; with
no patch the forward pass is the plain model's (no hook is installed).

Reference: `convert/reference.py:run_patched` does the same patches with PyTorch forward hooks on
transformers' Qwen2-Audio; `patched_logits` below is the plain definition in MLX (one full forward
pass per patch), the check of the fast path.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from . import mmau
from .capture import RESID, RESID_PRE, Capture, Z
from .errors import ListenError, ListenWarning
from .generate import PREFILL_STEP, Prefill, Row, decode
from .plots import heatmap
from .prompt import Prompt, prepare
from .records import append_jsonl, claim, locked, read_jsonl, write_json
from .scoring import continuation, option_ids  # the answer-option rule, shared with option scoring
from .steering import Silence

GROUPS = ("audio", "text", "last", "prefix")
HEAD_AT = ("last", "last+prefix")
METRIC = ("m = log p(a) - log p(b), each continuation's token log-probabilities summed (teacher-forced after "
          "the prompt, float32); a = the audio run's answer, b = the silence run's; restored fraction = "
          "(m_patched - m_silence) / (m_audio - m_silence)")


# -- continuations -----------------------------------------------------------------------------

def continuation_tokens(processor, text: str) -> list[int]:
    """`text` tokenised on its own (no special tokens). Options are tokenised by `scoring.option_ids`
    (which also checks the join with the prompt's end)."""
    return [int(t) for t in processor.tokenizer.encode(text, add_special_tokens=False)]


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


# -- patches -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Patch:
    """Set `positions` (absolute) of one point to the source run's values: block `layer`'s output
    (`head` None) or head `head`'s attention output before `o_proj`."""

    layer: int
    positions: tuple[int, ...]
    head: int | None = None
    label: str = ""

    @property
    def point(self) -> str:
        return (RESID if self.head is None else Z).format(self.layer)


def position_groups(prompt: Prompt, n_prefix: int = 0) -> dict[str, np.ndarray]:
    """The absolute positions of each group (module docstring) for a prompt continued by `n_prefix`
    shared continuation tokens."""
    audio = np.asarray(prompt.audio_positions, np.int64)
    if not audio.size:
        raise ListenError("patching audio against silence needs a prompt with audio")
    T = prompt.last
    text = np.setdiff1d(np.arange(audio.min() + 1, T), audio)
    return {"audio": audio, "text": text, "last": np.array([T]), "prefix": np.arange(T + 1, T + 1 + n_prefix)}


def standard_patches(n_layers: int, n_heads: int, groups: dict[str, np.ndarray], group_names: Sequence[str],
                     head_at: str = "last") -> list[Patch]:
    """resid_post of every layer over each group in `group_names`, then every head at `head_at`."""
    if head_at not in HEAD_AT:
        raise ListenError(f"heads are patched at one of {HEAD_AT}, not {head_at!r}")
    out = []
    for g in group_names:
        pos = tuple(int(p) for p in groups[g])
        if pos:
            out += [Patch(l, pos, None, g) for l in range(n_layers)]
    at = np.concatenate([groups["last"], groups["prefix"]]) if head_at == "last+prefix" else groups["last"]
    at = tuple(int(p) for p in at)
    out += [Patch(l, at, h, f"head {l}.{h}") for l in range(n_layers) for h in range(n_heads)]
    return out


# -- the batch machinery -------------------------------------------------------------------------

class _Rows:
    """One layer's KV cache for a batch whose rows share a prefix: the prefix (1, kv, P, d) is kept
    once and broadcast to the rows at each call; the rows' own keys and values follow it."""

    def __init__(self, keys, values, own_k=None, own_v=None):
        self.pk, self.pv, self.ok, self.ov = keys, values, own_k, own_v
        self.offset = keys.shape[2] + (0 if own_k is None else own_k.shape[2])

    @classmethod
    def of(cls, cache, n: int, start: int = 0) -> list["_Rows"]:
        """The first `n` positions of a batch-1 mlx-lm cache, from layer `start` on."""
        return [cls(c.keys[:, :, :n], c.values[:, :, :n]) for c in cache[start:]]

    def update_and_fetch(self, k, v):
        self.ok = k if self.ok is None else mx.concatenate([self.ok, k], axis=2)
        self.ov = v if self.ov is None else mx.concatenate([self.ov, v], axis=2)
        self.offset += k.shape[2]
        if self.pk.shape[2] == 0:
            return self.ok, self.ov
        R = self.ok.shape[0]
        pk = mx.broadcast_to(self.pk, (R,) + self.pk.shape[1:])
        pv = mx.broadcast_to(self.pv, (R,) + self.pv.shape[1:])
        return mx.concatenate([pk, self.ok], axis=2), mx.concatenate([pv, self.ov], axis=2)

    def fork(self, k: int) -> "_Rows":
        """Each row repeated k times (row r becomes rows r*k .. r*k + k-1)."""
        return _Rows(self.pk, self.pv, mx.repeat(self.ok, k, axis=0), mx.repeat(self.ov, k, axis=0))


def _blocks_from(model, h: mx.array, caches: list, start: int) -> mx.array:
    """Blocks start..L-1 on h (R, n, hidden) at the caches' offset; the last block's output."""
    offset = caches[0].offset
    mask = None if h.shape[1] == 1 else "causal"
    for layer, c in zip(model.layers[start:], caches):
        h = layer(h, mask, c, offset)
    return h


def _log_softmax(model, h: mx.array) -> mx.array:
    logits = model.language_model.unembed(h).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _pad(seqs: Sequence[Sequence[int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    tok = np.zeros((len(seqs), n), np.int32)
    valid = np.zeros((len(seqs), n), bool)
    for i, s in enumerate(seqs):
        tok[i, :len(s)] = s[:n]
        valid[i, :len(s)] = True
    return tok, valid


def _gather(lp: mx.array, tok: np.ndarray, valid: np.ndarray) -> mx.array:
    """Sum over the last-but-one axis of lp[..., tok] where valid: lp (R, n, V), tok/valid (R, n)."""
    got = mx.take_along_axis(lp, mx.array(tok)[..., None], axis=-1)[..., 0]
    return mx.where(mx.array(valid), got, 0.0).sum(-1)


def _replace(mask: np.ndarray, src: mx.array, offset: int, length: int):
    """A hook that sets the masked entries of its point to `src` (broadcast over rows) in the one
    forward call it is made for; anything unmasked is returned bit for bit."""
    m = mx.array(mask)[..., None]

    def hook(x, point):
        if point.offset != offset or point.length != length:
            raise RuntimeError(f"patch hook on {point.name} made for a call at {offset} (+{length}), "
                               f"called at {point.offset} (+{point.length})")
        return mx.where(m, src.astype(x.dtype), x)

    return hook


class _Run:
    """One prompt through the decoder the way mlx-lm prefills it (every position but T in chunks,
    then T alone), keeping the KV cache, the last block's output at the end, and what `captures`
    record."""

    def __init__(self, model, prompt: Prompt, captures: Sequence[Capture], step: int = PREFILL_STEP):

        self.model, self.prompt = model, prompt
        blocks = model.language_model.model.blocks
        self.cache = make_prompt_cache(model.language_model)
        emb, T = prompt.embeddings, prompt.last
        with ExitStack() as stack:
            for c in captures:
                stack.enter_context(c)
            for a in range(0, T, step):
                blocks(emb[None, a:min(a + step, T)], self.cache)
                mx.eval([c.state for c in self.cache])
            h = blocks(emb[None, T:], self.cache)
            mx.eval(h, [c.state for c in self.cache])
        self.final = h[0, -1]
        self.length = T + 1

    def extend(self, tokens: Sequence[int], captures: Sequence[Capture] = ()) -> mx.array:
        """Feed `tokens` after what the cache holds; the last block's output at the new end."""
        if not len(tokens):
            return self.final
        x = self.model.language_model.model.embed_tokens(mx.array(list(tokens)))[None]
        with ExitStack() as stack:
            for c in captures:
                stack.enter_context(c)
            h = self.model.language_model.model.blocks(x, self.cache)
            mx.eval(h, [c.state for c in self.cache])
        return h[0, -1]

    def rewind(self):
        """Back to the prompt alone (drop what `extend` added)."""
        for c in self.cache:
            c.trim(c.offset - self.length)

    def continue_rows(self, end: mx.array, seqs: Sequence[Sequence[int]], captures: Sequence[Capture] = ()) -> mx.array:
        """log p of each token sequence (one batch row each) after what the cache holds, `end` being
        the last block's output at the cache's last position: (len(seqs),) float32."""
        P = self.cache[0].offset
        first = _log_softmax(self.model, end[None])  # (1, V): predicts every sequence's first token
        tok0, valid0 = _pad([s[:1] for s in seqs], 1)
        total = _gather(mx.broadcast_to(first[:, None], (len(seqs), 1, first.shape[-1])), tok0, valid0)
        n = max(len(s) for s in seqs) - 1
        if n > 0:
            tok, _ = _pad([s[:-1] for s in seqs], n)
            x = self.model.language_model.model.embed_tokens(mx.array(tok))
            with ExitStack() as stack:
                for c in captures:
                    stack.enter_context(c)
                h = _blocks_from(self.model, x, _Rows.of(self.cache, P), 0)
            tgt, valid = _pad([s[1:] for s in seqs], n)
            total = total + _gather(_log_softmax(self.model, h), tgt, valid)
        mx.eval(total)
        return total


@dataclass
class Measured:
    """What `Patcher.measure` returns. `logp[i, k]`: log p under patch i of continuation k's tokens
    after the prefix all continuations share (`prefix` tokens). Under one patch (or run) the shared
    prefix scores the same for every continuation, so differences such as `m` are those of the
    whole continuations, exactly; the prefix's own tokens are not scored."""

    patches: list[Patch]
    logp: np.ndarray  # (n_patches, K) float64 (computed in float32)
    logp_source: np.ndarray  # (K,) the audio run, unpatched
    logp_target: np.ndarray  # (K,) the silence run, unpatched
    prefix: int  # tokens the continuations share at their start
    seconds: dict = field(default_factory=dict)

    @property
    def m(self) -> np.ndarray:
        return self.logp[:, 0] - self.logp[:, 1]

    @property
    def m_source(self) -> float:
        return float(self.logp_source[0] - self.logp_source[1])

    @property
    def m_target(self) -> float:
        return float(self.logp_target[0] - self.logp_target[1])


class Patcher:
    """Activation patching of one prompt pair: `source` (the audio) written into `target` (the
    same prompt with silence). Both are prefilled once here; `score` and `greedy` choose the
    continuations, `measure` runs the patches."""

    def __init__(self, model, source: Prompt, target: Prompt, *, max_rows: int = 32):
        if list(source.ids) != list(target.ids):
            raise ValueError("source and target prompts must have the same tokens (audio and equal-length silence)")
        self.model, self.source_prompt, self.target_prompt = model, source, target
        self.max_rows = max(1, int(max_rows))
        self.T = source.last
        audio = np.asarray(source.audio_positions)
        if not audio.size:
            raise ListenError("patching audio against silence needs a prompt with audio")
        self.a0 = int(audio.min())
        tic = time.perf_counter()
        with model.hooks.suspended():
            self._src_resid = Capture(model, RESID.format("*"), at=slice(self.a0, None))
            self._src_z = Capture(model, Z.format("*"), at=slice(self.T, None))
            self._tgt_pre = Capture(model, RESID_PRE.format("*"), at=slice(self.a0, None))
            self.source = _Run(model, source, [self._src_resid, self._src_z])
            self.target = _Run(model, target, [self._tgt_pre])
        self.seconds = {"prefill": time.perf_counter() - tic}

    # -- choosing the continuations ------------------------------------------------------------
    def score(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """log p of each continuation after the prompt, under the audio run and the silence run."""
        with self.model.hooks.suspended():
            a = self.source.continue_rows(self.source.final, seqs)
            s = self.target.continue_rows(self.target.final, seqs)
        return np.array(a, np.float64), np.array(s, np.float64)

    def greedy(self, processor, max_tokens: int) -> tuple[list[int], list[int]]:
        """The first `max_tokens` greedy tokens of the audio run and of the silence run, from their
        prefills (generate.decode); an answer that ends sooner keeps its end-of-answer token (the
        tokenizer's eos), so a short answer is never a bare prefix of a longer one."""

        eos = getattr(processor.tokenizer, "eos_token_id", None)
        with self.model.hooks.suspended():
            out = []
            for run in (self.source, self.target):
                pre = Prefill(run.prompt, run.cache, run.final)
                d = decode(self.model, processor, pre, [Row()], max_tokens)[0]
                out.append(d.tokens + ([int(eos)] if d.finish_reason == "stop" and eos is not None else []))
        return out[0], out[1]

    # -- patching ------------------------------------------------------------------------------
    def measure(self, seqs: Sequence[Sequence[int]], patches: Sequence[Patch], *, _edit: bool = True) -> Measured:
        """log p of each continuation (a, b, ...) under every patch, and unpatched under both runs.

        A patch may only touch positions from the first audio position to the end of the
        continuations' shared prefix (the rest is the same in both runs, or not shared)."""
        with self.model.hooks.suspended():
            try:
                return self._measure([list(map(int, s)) for s in seqs], list(patches), _edit)
            finally:
                self.source.rewind()
                self.target.rewind()

    def _measure(self, seqs, patches, edit) -> Measured:
        model, T, a0 = self.model, self.T, self.a0
        if len(seqs) < 2 or any(not s for s in seqs):
            raise ValueError("measure needs at least two non-empty continuations")
        tic = time.perf_counter()
        if len({tuple(s) for s in seqs}) < len(seqs):
            raise ListenError("two continuations are the same tokens: nothing to tell apart")
        j = shared_prefix(seqs)
        prefix, rest = seqs[0][:j], [s[j:] for s in seqs]
        end = T + j  # the trunk's last position: predicts each continuation's first token after the prefix
        # the shared prefix through both runs, recording what patches read there
        src_caps = [Capture(model, RESID.format("*"), at=slice(T + 1, None)),
                    Capture(model, Z.format("*"), at=slice(T + 1, None))]
        tgt_cap = Capture(model, RESID_PRE.format("*"), at=slice(T + 1, None))
        src_end = self.source.extend(prefix, src_caps)
        tgt_end = self.target.extend(prefix, [tgt_cap])
        L = len(model.layers)

        def joined(prefill: Capture, ext: Capture, name: str) -> mx.array:
            parts = [prefill.get(name)[0]] + ([ext.get(name)[0]] if j else [])
            return mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

        src_resid = {l: joined(self._src_resid, src_caps[0], RESID.format(l)) for l in range(L)}  # a0..end
        src_z = {l: joined(self._src_z, src_caps[1], Z.format(l)) for l in range(L)}  # T..end
        tgt_pre = {l: joined(self._tgt_pre, tgt_cap, RESID_PRE.format(l)) for l in range(L)}  # a0..end
        # unpatched: both runs over the rest of each continuation (the silence run's block inputs there recorded)
        n2 = max(len(r) for r in rest) - 1
        suf_cap = Capture(model, RESID_PRE.format("*"), at=slice(end + 1, None))
        lp_src = np.array(self.source.continue_rows(src_end, rest), np.float64)
        lp_tgt = np.array(self.target.continue_rows(tgt_end, rest, [suf_cap] if n2 > 0 else []), np.float64)
        tgt_suf = {l: suf_cap.get(RESID_PRE.format(l)) for l in range(L)} if n2 > 0 else {}
        seconds = {"prefix_and_unpatched": time.perf_counter() - tic}
        tic = time.perf_counter()

        # group the patches by (layer, first position): each group is one batch (in chunks)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(patches):
            pos = np.asarray(p.positions, np.int64)
            if not pos.size:
                raise ValueError(f"patch {p} has no positions")
            if pos.min() < a0 or pos.max() > end:
                raise ValueError(f"patch {p.label or p} reaches outside positions {a0}..{end} (first audio position "
                                 "to the end of the continuations' shared prefix)")
            if p.head is not None and pos.min() < T:
                raise ValueError(f"head patches start at T ({T}); {p.label or p} starts at {pos.min()}")
            if not 0 <= p.layer < L:
                raise ValueError(f"patch {p} names a layer this {L}-layer model lacks")
            buckets[(p.layer, min(int(pos.min()), T))].append(i)
        logp = np.full((len(patches), len(seqs)), np.nan)
        K = len(seqs)
        first_tok, first_valid = _pad([r[:1] for r in rest], 1)
        if n2 > 0:
            rest_tok, rest_valid = _pad([r[1:] for r in rest], n2)
        for (s, p0), idx in sorted(buckets.items()):
            n1 = end + 1 - p0
            x_in = tgt_pre[s][p0 - a0:]  # the silence run's block-s input at p0..end
            for c0 in range(0, len(idx), self.max_rows):
                chunk = [patches[i] for i in idx[c0:c0 + self.max_rows]]
                R = len(chunk)
                caches = _Rows.of(self.target.cache, p0, s)
                hooks = self._hooks(chunk, p0, n1, src_resid, src_z) if edit else []
                with model.hooks.using(hooks):
                    h = _blocks_from(model, mx.broadcast_to(x_in[None], (R,) + x_in.shape), caches, s)
                first = _log_softmax(model, h[:, -1])  # (R, V)
                tot = mx.where(mx.array(first_valid[:, 0])[None],
                               mx.take(first, mx.array(first_tok[:, 0]), axis=1), 0.0)  # (R, K)
                if n2 > 0:
                    forks = [c.fork(K) for c in caches]
                    x2 = mx.tile(tgt_suf[s], (R, 1, 1))  # row r*K + k: continuation k
                    h2 = _blocks_from(model, x2, forks, s)
                    more = _gather(_log_softmax(model, h2), np.tile(rest_tok, (R, 1)), np.tile(rest_valid, (R, 1)))
                    tot = tot + more.reshape(R, K)
                mx.eval(tot)
                logp[idx[c0:c0 + self.max_rows]] = np.array(tot, np.float64)
        seconds["patches"] = time.perf_counter() - tic
        return Measured(list(patches), logp, lp_src, lp_tgt, j, seconds)

    def _hooks(self, chunk: list[Patch], p0: int, n1: int, src_resid: dict, src_z: dict):
        """One hook per point the chunk touches; row r's mask selects patch r's entries there."""
        R = len(chunk)
        masks: dict[str, np.ndarray] = {}
        sources: dict[str, mx.array] = {}
        for r, p in enumerate(chunk):
            rows = np.asarray(p.positions, np.int64) - p0
            if p.point not in masks:
                if p.head is None:
                    masks[p.point] = np.zeros((R, n1), bool)
                    sources[p.point] = src_resid[p.layer][p0 - self.a0:][None]  # (1, n1, hidden)
                else:
                    masks[p.point] = np.zeros((R, n1, src_z[p.layer].shape[1]), bool)
                    sources[p.point] = src_z[p.layer][p0 - self.T:][None]  # (1, n1, heads, head_dim)
            if p.head is None:
                masks[p.point][r, rows] = True
            else:
                masks[p.point][r, rows, p.head] = True
        return [(name, _replace(masks[name], sources[name], p0, n1)) for name in masks]


# -- the plain definition (one full forward pass per patch) -----------------------------------

def patched_logits(model, target: Prompt, source: Prompt, continuation: Sequence[int],
                   patches: Sequence[Patch] = ()) -> np.ndarray:
    """Logits (k, vocab), float32, at the k positions that predict each token of `continuation`
    (teacher-forced after the prompt) of the target prompt with every patch applied: the source
    run's values at the patch's positions, read from one full forward pass of the source. One full
    forward pass of the target, no cache: the definition the fast path is checked against."""
    lm = model.language_model
    cont = [int(t) for t in continuation]
    T = target.last
    extra = lm.model.embed_tokens(mx.array(cont[:-1]))[None] if len(cont) > 1 else None

    def seq(prompt):
        return prompt.embeddings[None] if extra is None else mx.concatenate([prompt.embeddings[None], extra], axis=1)

    with model.hooks.suspended():
        positions = sorted({int(q) for p in patches for q in p.positions})
        hooks = []
        if patches:
            cap = Capture(model, sorted({p.point for p in patches}), at=positions)
            with cap:
                mx.eval(lm.model.blocks(seq(source)))
            n = T + len(cont)
            masks: dict[str, np.ndarray] = {}
            for p in patches:
                if p.head is None:
                    m = masks.setdefault(p.point, np.zeros((1, n), bool))
                    m[0, list(p.positions)] = True
                else:
                    H = model.config.text_config.num_attention_heads
                    m = masks.setdefault(p.point, np.zeros((1, n, H), bool))
                    m[0, list(p.positions), p.head] = True
            for name, mask in masks.items():
                src_shape = cap.get(name).shape[2:]
                src = mx.zeros((1, n) + tuple(src_shape), cap.get(name).dtype)
                src[:, mx.array(cap.recorded(name))] = cap.get(name)
                hooks.append((name, _replace(mask, src, 0, n)))
        with model.hooks.using(hooks):
            h = lm.model.blocks(seq(target))
        logits = lm.unembed(h[:, T:T + len(cont)])[0].astype(mx.float32)
        mx.eval(logits)
    return np.array(logits)


def logp_of(logits: np.ndarray, continuation: Sequence[int]) -> float:
    """log p of a continuation from its logits (k, vocab), float64."""
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    return float(sum(lg[i, t] - lse[i] for i, t in enumerate(continuation)))


# -- one item -------------------------------------------------------------------------------------

@dataclass
class PatchConfig:
    """Every option of the patching pass (recorded with its results)."""

    groups: tuple[str, ...] = GROUPS
    head_at: str = "last"
    tokens: int = 8  # without answer options: greedy tokens compared
    min_gap: float = 0.5  # |m_audio - m_silence| below this (nats): flagged, not averaged
    first_diff: bool = False  # score a and b only up to their first differing token (cheaper; see the docstring)
    preset: str = mmau.DEFAULT_PRESET  # how an option is written as a continuation
    max_rows: int = 32

    def validate(self):
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise ListenError(f"position groups must be among {', '.join(GROUPS)}, not {', '.join(bad) or '(none)'}")
        if self.head_at not in HEAD_AT:
            raise ListenError(f"heads are patched at one of {', '.join(HEAD_AT)}, not {self.head_at!r}")
        if self.tokens < 1 or self.max_rows < 1 or not np.isfinite(self.min_gap) or self.min_gap < 0:
            raise ListenError("tokens and max_rows must be positive, min_gap a finite number >= 0")
        continuation(self.preset, "x")

    def to_json(self) -> dict:
        return {**self.__dict__, "groups": list(self.groups), "metric": METRIC}


def choose(lp_audio: np.ndarray, lp_silence: np.ndarray, seqs: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(a, b): the audio run's best option and the silence run's best, or, when they agree, the
    audio run's best option with other tokens."""
    a = int(np.argmax(lp_audio))
    order = [int(i) for i in np.argsort(-lp_silence, kind="stable")]
    b = order[0]
    if list(seqs[b]) == list(seqs[a]):
        others = [int(i) for i in np.argsort(-lp_audio, kind="stable") if list(seqs[i]) != list(seqs[a])]
        if not others:
            raise ListenError("every answer option is written with the same tokens: nothing to tell apart")
        b = others[0]
    return a, b


def patch_prompt(model, processor, prompt: Prompt, *, choices: Sequence[str] | None = None,
                 config: PatchConfig | None = None, silence=None) -> dict:
    """Patch one prompt (audio) into its silence twin: every group x layer and every head. Returns
    a JSON-able record: the continuations, m_audio / m_silence, per patch the raw m and the
    restored fraction (None when the item is flagged)."""

    cfg = config or PatchConfig()
    cfg.validate()
    silence = silence or Silence(model)
    tic = time.perf_counter()
    patcher = Patcher(model, prompt, silence.prompt(prompt), max_rows=cfg.max_rows)
    rec: dict = {"audio_tokens": prompt.n_audio_tokens, "prompt_tokens": len(prompt.ids)}
    if choices is not None:
        if len(choices) < 2:
            raise ListenError("patching needs at least two answer options to compare")
        texts = [continuation(cfg.preset, c) for c in choices]
        seqs = option_ids(processor, prompt, choices, cfg.preset)
        lp_a, lp_s = patcher.score(seqs)
        ia, ib = choose(lp_a, lp_s, seqs)
        a, b = seqs[ia], seqs[ib]
        rec.update(choice_audio=ia, choice_silence=int(np.argmax(lp_s)), choice_b=ib,
                   option_logp_audio=_round(lp_a), option_logp_silence=_round(lp_s))
        text_a, text_b = texts[ia], texts[ib]
    else:
        a, b = patcher.greedy(processor, cfg.tokens)
        if a == b:
            raise ListenError(f"the audio and silence runs give the same first {cfg.tokens} answer tokens "
                              f"({processor.decode(a)!r}): nothing for patching to restore")
        text_a, text_b = processor.decode(a), processor.decode(b)
    j = shared_prefix([a, b])
    if cfg.first_diff:  # the shared prefix and the first token where they differ
        a, b = a[:j + 1], b[:j + 1]
    groups = position_groups(prompt, j)
    L, H = len(model.layers), model.config.text_config.num_attention_heads
    patches = standard_patches(L, H, groups, cfg.groups, cfg.head_at)
    res = patcher.measure([a, b], patches)
    m = res.m
    gap = res.m_source - res.m_target
    flagged = abs(gap) < cfg.min_gap
    restored = None if flagged else (m - res.m_target) / gap
    by_group, by_head = _arrange(patches, m, L, H, cfg.groups)
    rec.update({
        "a": text_a, "b": text_b, "a_tokens": list(a), "b_tokens": list(b), "shared_prefix_tokens": res.prefix,
        "suffix_logp_audio": _round(res.logp_source), "suffix_logp_silence": _round(res.logp_target),
        "m_audio": round(res.m_source, 6), "m_silence": round(res.m_target, 6), "gap": round(gap, 6),
        "flagged": f"|m_audio - m_silence| = {abs(gap):.3g} < min_gap {cfg.min_gap:g}" if flagged else None,
        "groups": {g: len(groups[g]) for g in cfg.groups},
        "m_groups": {g: _round(v) for g, v in by_group.items()}, "m_heads": _round(by_head),
    })
    if restored is not None:
        rg, rh = _arrange(patches, restored, L, H, cfg.groups)
        rec.update(restored_groups={g: _round(v) for g, v in rg.items()}, restored_heads=_round(rh))
    rec["seconds"] = {**{k: round(v, 4) for k, v in {**patcher.seconds, **res.seconds}.items()},
                      "total": round(time.perf_counter() - tic, 4)}
    return rec


def _arrange(patches: list[Patch], values: np.ndarray, L: int, H: int, groups: Sequence[str]):
    """(per group: value per layer, NaN where the group is empty), (layers x heads)."""
    by_group = {g: np.full(L, np.nan) for g in groups}
    by_head = np.full((L, H), np.nan)
    for p, v in zip(patches, values):
        if p.head is None:
            by_group[p.label][p.layer] = v
        else:
            by_head[p.layer, p.head] = v
    return by_group, by_head


def _round(x, nd: int = 6):
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        return None if not np.isfinite(a) else round(float(a), nd)
    return [_round(v, nd) for v in a]


# -- a run: one clip, or a data set ----------------------------------------------------------------

RECORDS, META, SUMMARY = "items.jsonl", "items.meta.json", "patch.json"
GROUPS_PNG, HEADS_PNG = "patch.groups.png", "patch.heads.png"


def summarize(rows: list[dict], config: PatchConfig, n_layers: int, n_heads: int) -> dict:
    """Averages over the usable items (not failed, not flagged): restored fraction per layer and
    group, per layer and head, overall and per task, with their standard errors and counts."""
    used = [r for r in rows if "error" not in r and not r.get("flagged")]
    skipped = [{"id": r["id"], "reason": r.get("error") or r["flagged"]} for r in rows
               if "error" in r or r.get("flagged")]

    def block(rs: list[dict]) -> dict:
        if not rs:
            return {"n": 0}
        g = np.array([[[np.nan if v is None else v for v in r["restored_groups"][name]] for name in config.groups]
                      for r in rs], np.float64)  # (n, G, L)
        h = np.array([[[np.nan if v is None else v for v in row] for row in r["restored_heads"]] for r in rs],
                     np.float64)  # (n, L, H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty group is NaN throughout
            gm, hm = np.nanmean(g, 0), np.nanmean(h, 0)
            gse = np.nanstd(g, 0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.full_like(gm, np.nan)
            hse = np.nanstd(h, 0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.full_like(hm, np.nan)
        order = sorted(((-hm[l, k], l, k) for l in range(n_layers) for k in range(n_heads) if np.isfinite(hm[l, k])))
        best = {name: (int(np.nanargmax(gm[i])) if np.isfinite(gm[i]).any() else None)
                for i, name in enumerate(config.groups)}
        return {
            "n": len(rs),
            "restored_groups": {name: _round(gm[i]) for i, name in enumerate(config.groups)},
            "restored_groups_se": {name: _round(gse[i]) for i, name in enumerate(config.groups)},
            "restored_heads": _round(hm), "restored_heads_se": _round(hse),
            "best_layer": best,
            "top_heads": [{"layer": l, "head": k, "restored": _round(-v)} for v, l, k in order[:10]],
            "mean_gap": _round(np.mean([r["gap"] for r in rs])),
        }

    tasks = sorted({r.get("task") for r in used if r.get("task")})
    return {
        "metric": METRIC, "config": config.to_json(), "layers": n_layers, "heads": n_heads,
        "n_items": len(rows), "n_used": len(used), "n_skipped": len(skipped), "skipped": skipped,
        **block(used), "tasks": {t: block([r for r in used if r.get("task") == t]) for t in tasks},
    }


def plot(summary: dict, out: Path, config: PatchConfig, marked: Sequence[tuple[int, int]] = ()) -> list[Path]:
    """The layer x group and layer x head maps of a summary (nothing when no item was usable)."""

    if not summary.get("n"):
        return []
    L = summary["layers"]
    n = summary["n"]
    what = f"mean of {n} items" if n > 1 else "one item"
    names = [g for g in config.groups if any(v is not None for v in summary["restored_groups"][g])]  # e.g. no prefix
    g = np.array([[np.nan if v is None else v for v in summary["restored_groups"][name]] for name in names]).T
    h = np.array([[np.nan if v is None else v for v in row] for row in summary["restored_heads"]])
    paths = [Path(out) / GROUPS_PNG, Path(out) / HEADS_PNG]
    heatmap(g, paths[0], f"Audio restored by patching block outputs into the silence run ({what})",
            "restored fraction", center=True, xlabel="position group", xticklabels=names,
            yticklabels=[str(l) for l in range(L)] if L <= 40 else None, annotate=L * len(names) <= 400)
    at = "T" if config.head_at == "last" else "T and the answer prefix"
    heatmap(h, paths[1], f"Audio restored by patching one head's output at {at} ({what})"
            + ("; specialist heads boxed" if marked else ""), "restored fraction", marked=marked, center=True)
    return paths


def patch_run(model, processor, out, *, clip=None, question: str | None = None, system: str | None = None,
              name: str | None = None, items: Sequence[dict] | None = None, audio_dir=None,
              identity: dict | None = None, config: PatchConfig | None = None,
              marked: Sequence[tuple[int, int]] = (), progress: bool = True) -> dict:
    """`mlx-listen patch`: one clip (a path, a 16 kHz array or `AudioFeatures`; `name` for the
    record, default the path) and question, or (`items`, MMAU-format, with `audio_dir`) a data
    set, resumable: one fsync'd record per item in OUT/items.jsonl (an item that cannot be used is
    recorded with its `error`), a rerun with the same `identity` (model fingerprint, data hash…)
    skips what is done. Writes OUT/patch.json (the summary, and the item itself for one clip) and
    the two maps (patch.groups.png, patch.heads.png; `marked` heads boxed, e.g. the specialist
    heads). Returns the summary."""

    cfg = config or PatchConfig()
    cfg.validate()
    out = Path(out)
    L, H = len(model.layers), model.config.text_config.num_attention_heads
    if (items is None) == (clip is None):
        raise ListenError("patch one CLIP and QUESTION, or a data set (--data with --audio-dir), not both")
    with locked(out):
        if clip is not None:

            if not question:
                raise ListenError("give the QUESTION to ask about the clip")
            prompt = prepare(model, processor, [clip], question, system)
            rec = {"id": name or (str(clip) if isinstance(clip, (str, Path)) else "clip"), "question": question,
                   **patch_prompt(model, processor, prompt, config=cfg)}
            if rec["flagged"]:
                warnings.warn(f"the audio barely changes the answer ({rec['flagged']}): no restored fraction",
                              ListenWarning, stacklevel=2)
            rows = [rec]
        else:

            if audio_dir is None:
                raise ListenError("a data set needs --audio-dir (the folder its audio_id paths are relative to)")
            settings = {k: v for k, v in cfg.to_json().items() if k != "max_rows"}  # memory only: any value resumes
            claim(out / META, {**(identity or {}), "config": settings})
            records = out / RECORDS
            done = {r["id"]: r for r in read_jsonl(records, repair=True)}
            silence = Silence(model)
            todo = [it for it in items if it["id"] not in done]
            for item in tqdm(todo, desc="patch", unit="item", file=sys.stderr, disable=not progress):
                base = {"id": item["id"], "task": item.get("task")}
                try:
                    prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]],
                                     mmau.build_prompt(item, cfg.preset))
                    row = {**base, **patch_prompt(model, processor, prompt, choices=item["choices"], config=cfg,
                                                  silence=silence)}
                    row["answer_is_a"] = item.get("answer", "").strip() == item["choices"][row["choice_audio"]].strip()
                except ListenError as e:
                    row = {**base, "error": str(e)}
                append_jsonl(records, row)
                done[item["id"]] = row
            rows = [done[it["id"]] for it in items if it["id"] in done]
        summary = summarize(rows, cfg, L, H)
        if clip is not None:
            summary["item"] = rows[0]
        summary["files"] = [p.name for p in plot(summary, out, cfg, marked)]
        write_json(out / SUMMARY, summary)
    return summary


def patch_lines(summary: dict, marked: Sequence[tuple[int, int]] = ()) -> list[str]:
    """What `mlx-listen patch` prints: the items, where each group restores most, the top heads and,
    given `marked` heads (the specialist heads), how much they restore."""
    def f(v, spec="+.3f"):
        return "n/a" if v is None else format(v, spec)

    out = []
    item = summary.get("item")
    if item is not None:
        out.append(f"a (audio): {item['a']!r}  b (silence): {item['b']!r}")
        out.append(f"m_audio {item['m_audio']:+.3f}, m_silence {item['m_silence']:+.3f} (log p(a) - log p(b), nats)")
    else:
        n = summary["n_items"]
        out.append(f"{n} item{'s' if n != 1 else ''}: {summary['n_used']} used, {summary['n_skipped']} skipped"
                   + (f" (e.g. {summary['skipped'][0]['id']}: {summary['skipped'][0]['reason']})"
                      if summary["skipped"] else ""))
    if not summary.get("n"):
        out.append("no restored fractions: no usable item (see skipped / flagged)")
        return out
    for g, layer in summary["best_layer"].items():
        if layer is not None:
            out.append(f"{g:>7}: most restored at layer {layer:>2} ({f(summary['restored_groups'][g][layer])})")
    tops = ", ".join(f"{t['layer']}.{t['head']} {f(t['restored'])}" for t in summary["top_heads"][:5])
    out.append(f"top heads (layer.head restored): {tops}")
    if marked:
        hm = np.array([[np.nan if v is None else v for v in row] for row in summary["restored_heads"]])
        vals = np.array([hm[l, h] for l, h in marked])
        rank = np.argsort(np.argsort(-np.nan_to_num(hm.ravel(), nan=-np.inf)))
        ranks = sorted(int(rank[l * hm.shape[1] + h]) + 1 for l, h in marked)
        out.append(f"specialist heads ({len(marked)}): mean restored {f(float(np.nanmean(vals)))}, "
                   f"best rank {ranks[0]} of {hm.size}, layers {sorted({l for l, _ in marked})}")
    return out
