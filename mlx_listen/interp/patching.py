"""Activation patching, audio ↔ silence: where does the audio evidence enter the decoder?

The prompt runs with equal-length digital silence (the *target*), and one piece of the audio run's
(the *source*) activations is written over it: the residual stream after block l (`hook_resid_post`)
over one position group, or one head's attention output before `o_proj` (`attn.hook_z`) at T. How
much of the audio run's answer comes back is the effect of that piece.

What is measured: `Patcher.measure` scores continuations (a, b, ...) teacher-forced after the
prompt under every patch; `method.patch_map` picks a and b (the audio run's answer and the
silence run's) and turns m = log p(a) - log p(b) into a restored fraction.

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

Reference: `mlx_listen_convert.reference.patching.run_patched` does the same patches with PyTorch forward hooks on
transformers' Qwen2-Audio; `patched_logits` below is the plain definition in MLX (one full forward
pass per patch), the check of the fast path.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..answers import PREFILL_STEP, Prefill, decode
from ..errors import ListenError
from ..hooks import RESID, RESID_PRE, Capture, Z
from ..kvcache import SharedPrefix
from ..prompt import Prompt
from .edit import Row

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

def _log_softmax(model, h: mx.array) -> mx.array:
    logits = model.unembed(h).astype(mx.float32)
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
        blocks = model.blocks
        self.cache = make_prompt_cache(model)
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
        x = self.model.embed_tokens(list(tokens))[None]
        with ExitStack() as stack:
            for c in captures:
                stack.enter_context(c)
            h = self.model.blocks(x, self.cache)
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
            x = self.model.embed_tokens(mx.array(tok))
            with ExitStack() as stack:
                for c in captures:
                    stack.enter_context(c)
                h = self.model.blocks(x, SharedPrefix.of(self.cache, P))
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
        prefills (answers.decode); an answer that ends sooner keeps its end-of-answer token (the
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
        L = model.n_layers

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
                caches = SharedPrefix.of(self.target.cache, p0, s)
                hooks = self._hooks(chunk, p0, n1, src_resid, src_z) if edit else []
                with model.hooks.using(hooks):
                    h = model.blocks(mx.broadcast_to(x_in[None], (R,) + x_in.shape), caches, start=s)
                first = _log_softmax(model, h[:, -1])  # (R, V)
                tot = mx.where(mx.array(first_valid[:, 0])[None],
                               mx.take(first, mx.array(first_tok[:, 0]), axis=1), 0.0)  # (R, K)
                if n2 > 0:
                    forks = [c.fork(K) for c in caches]
                    x2 = mx.tile(tgt_suf[s], (R, 1, 1))  # row r*K + k: continuation k
                    h2 = model.blocks(x2, forks, start=s)
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
    cont = [int(t) for t in continuation]
    T = target.last
    extra = model.embed_tokens(cont[:-1])[None] if len(cont) > 1 else None

    def seq(prompt):
        return prompt.embeddings[None] if extra is None else mx.concatenate([prompt.embeddings[None], extra], axis=1)

    with model.hooks.suspended():
        positions = sorted({int(q) for p in patches for q in p.positions})
        hooks = []
        if patches:
            cap = Capture(model, sorted({p.point for p in patches}), at=positions)
            with cap:
                mx.eval(model.blocks(seq(source)))
            n = T + len(cont)
            masks: dict[str, np.ndarray] = {}
            for p in patches:
                if p.head is None:
                    m = masks.setdefault(p.point, np.zeros((1, n), bool))
                    m[0, list(p.positions)] = True
                else:
                    H = model.n_heads
                    m = masks.setdefault(p.point, np.zeros((1, n, H), bool))
                    m[0, list(p.positions), p.head] = True
            for name, mask in masks.items():
                src_shape = cap.get(name).shape[2:]
                src = mx.zeros((1, n) + tuple(src_shape), cap.get(name).dtype)
                src[:, mx.array(cap.recorded(name))] = cap.get(name)
                hooks.append((name, _replace(mask, src, 0, n)))
        with model.hooks.using(hooks):
            h = model.blocks(seq(target))
        logits = model.unembed(h[:, T:T + len(cont)])[0].astype(mx.float32)
        mx.eval(logits)
    return np.array(logits)


def logp_of(logits: np.ndarray, continuation: Sequence[int]) -> float:
    """log p of a continuation from its logits (k, vocab), float64."""
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    return float(sum(lg[i, t] - lse[i] for i, t in enumerate(continuation)))
