"""The server's model session: one model, one request at a time (the hook registry and MLX's
stream are the model's, so requests take turns under one lock), answers streamed through mlx-lm's
`stream_generate` with the listening score, steering or ablation acting through the hooks, and a
prompt cache keyed by the audio's content (and each distinct clip encoded once).

Prompt cache: each finished request leaves its KV cache (prompt and answer) with a key per position:
the token id for text, the clip's sha256 and index for an audio position. A later request reuses
the longest common prefix (a second question about the same clip prefills only its own text; a
follow-up turn of a conversation only the new turn), never its last token, which must run to give
the first logits. Steering edits only the last block's output, so the cache serves steered and
plain answers alike; an ablated answer changes every key and value, so it neither reads nor
leaves a cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .. import __version__
from ..answers import generate, stream_generate
from ..audio import audio_features, load_audio
from ..errors import ListenError
from ..headset import HeadSet, listening
from ..hooks import AUDIO_MASS, Capture
from ..identity import model_signature
from ..interp.ablation import from_options as ablation_from_options
from ..interp.steering import Silence, SteerConfig, Steerer
from ..kvcache import views
from ..load import ModelRef
from ..method.directions import from_heads, load_vector
from ..prompt import Prompt
from .protocol import BadRequest, ChatRequest
from .tokens import token_bytes


@dataclass
class Event:
    """One streamed token (`text` may be empty while a stop string is undecided), or the end."""

    text: str = ""
    token: int | None = None
    logprob: dict | None = None  # the OpenAI logprobs entry of this token
    listening: float | None = None
    finish: str | None = None
    usage: dict | None = None
    extension: dict | None = None


@dataclass
class _Entry:
    keys: list  # one key per cached position
    cache: list


@dataclass
class Session:
    """What one request resolved to: its prompt, head set, steering or ablation."""

    prompt: Prompt
    keys: list
    heads: HeadSet | None
    listening: str
    steer: SteerConfig | None = None
    ablation: object | None = None
    ext: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, *, heads: dict[str, HeadSet] | None = None, vectors: dict[str, Path] | None = None,
                 name: str | None = None, cache_entries: int = 4):
        self.ref = ModelRef.of(model)
        self.model, self.processor = self.ref.get()
        self.name = name or Path(str(self.ref)).name or "mlx-listen"
        self.heads = dict(heads or {})
        self.vectors = dict(vectors or {})
        for label, hs in self.heads.items():
            hs.check(self.model.n_layers, self.model.n_heads)
        self.lock = threading.Lock()
        self.silence = Silence(self.model)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._encoded: OrderedDict[str, tuple] = OrderedDict()  # clip sha256 -> (features, tower output, tokens)
        self._cache_entries, self._next = cache_entries, 0
        self.signature = model_signature(self.model)["config_hash"]

    # -- names -------------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """The model's id and its aliases for apps that can only pick a model name."""
        ids = [self.name]
        if self.heads:
            ids += [f"{self.name}+listen", f"{self.name}+steer-a1"]
        return ids

    def defaults(self, model_id: str) -> dict:
        """What an alias asks for: `+listen` the listening score per token, `+steer-aA` steering at A."""
        if not model_id or model_id == self.name:
            return {}
        if model_id == f"{self.name}+listen" and self.heads:
            return {"listen": True}
        prefix = f"{self.name}+steer-a"
        if model_id.startswith(prefix) and self.heads:
            try:
                return {"listen": True, "alpha": float(model_id[len(prefix):])}
            except ValueError:
                pass
        raise BadRequest(f"unknown model {model_id!r}; this server has {', '.join(self.model_ids())}", "model",
                         status=404)

    # -- the request -------------------------------------------------------------------------------
    def _head_set(self, spec) -> HeadSet | None:
        if spec is None:
            return next(iter(self.heads.values()), None)
        if isinstance(spec, str):
            if spec not in self.heads:
                raise BadRequest(f"no head set named {spec!r} (this server has {sorted(self.heads) or 'none'})",
                                 "mlx_listen.heads")
            return self.heads[spec]
        try:
            hs = HeadSet([tuple(h) for h in spec])
            hs.check(self.model.n_layers, self.model.n_heads)
        except (ListenError, TypeError, ValueError) as e:
            raise BadRequest(f"mlx_listen.heads: {e}", "mlx_listen.heads") from None
        return hs

    def session(self, req: ChatRequest) -> Session:
        """The request resolved against the model: audio decoded, prompt built, options checked."""
        alias = self.defaults(req.model)
        ext = req.ext
        listen_wanted = ext.heads is not None or alias.get("listen") or ext.steer is not None
        heads = self._head_set(ext.heads) if (listen_wanted or self.heads) else None
        steer = None
        if ext.steer is not None or "alpha" in alias:
            spec = ext.steer or {}
            alpha = float(spec.get("alpha", alias.get("alpha", 1.0)))
            at = spec.get("at", "all")
            if at not in ("all", "prompt"):
                raise BadRequest("mlx_listen.steer.at must be all or prompt", "mlx_listen.steer.at")
            if spec.get("vector"):
                if spec["vector"] not in self.vectors:
                    raise BadRequest(f"no vector named {spec['vector']!r}", "mlx_listen.steer.vector")
                vec, layer, _ = load_vector(self.vectors[spec["vector"]], self.model.hidden_size, self.model.n_layers)
                steer = SteerConfig(vector=vec, apply_layer=layer, alpha=alpha, at=at)
            elif heads is None:
                raise BadRequest("steering needs a head set: start the server with --heads, or name one",
                                 "mlx_listen.steer")
            else:
                steer = from_heads(heads, alpha=alpha, at=at)
            try:
                steer.validate(self.model.n_layers, self.model.hidden_size, self.model.n_heads)
            except ListenError as e:
                raise BadRequest(str(e), "mlx_listen.steer") from None
        ablation = None
        if ext.ablate is not None:
            spec = ext.ablate
            target = spec.get("heads", None)
            hs = heads if target is None else self._head_set(target)
            if hs is None:
                raise BadRequest("ablation needs heads (mlx_listen.ablate.heads or the server's --heads)",
                                 "mlx_listen.ablate")
            try:
                ablation = ablation_from_options(",".join(f"{l}.{h}" for l, h in hs.heads),
                                                 str(spec.get("mode", "zero")))
                ablation.check(self.model)
            except ListenError as e:
                raise BadRequest(str(e), "mlx_listen.ablate") from None
        prompt, keys = self.prompt(req)
        mode = ext.listening if heads is not None else "off"
        return Session(prompt, keys, heads, mode, steer, ablation)

    @staticmethod
    def samples(clip, i: int = 0):
        """A clip's bytes decoded to 16 kHz mono (libsndfile sniffs the container); BadRequest if not audio."""
        fd, tmp = tempfile.mkstemp(prefix="mlx-listen-", suffix=".audio")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(clip.data)
            return load_audio(tmp)
        except ListenError as e:
            raise BadRequest(str(e).replace(tmp, f"audio {i + 1}"), "messages") from None
        finally:
            os.unlink(tmp)

    def prompt(self, req: ChatRequest) -> tuple[Prompt, list]:
        """The messages rendered with the folder's chat template, each clip decoded (any container
        libsndfile reads, any rate) and encoded (once per distinct clip content: a second question
        about a clip reuses its encoding); and the cache key of every position."""
        digests = [hashlib.sha256(clip.data).hexdigest() for clip in req.clips]
        todo = {d: (i, c) for i, (d, c) in enumerate(zip(digests, req.clips)) if d not in self._encoded}
        fresh = {d: audio_features(self.samples(c, i), f"audio {i + 1}") for d, (i, c) in todo.items()}
        feats = [fresh[d] if d in fresh else self._encoded[d][0] for d in digests]
        try:
            ids = self.processor.encode(req.messages, [f.n_tokens for f in feats])
        except ListenError as e:
            raise BadRequest(str(e), "messages") from None
        if len(ids) >= self.model.max_positions:
            raise BadRequest(f"the prompt is {len(ids)} tokens, over the model's context of {self.model.max_positions}",
                             "messages")
        with self.lock:
            tic = time.perf_counter()
            for d, f in fresh.items():
                enc, audio = self.model.encode(f.mel, f.n_frames)
                mx.eval(enc, audio)
                self._encoded[d] = (f, enc, audio)
            seconds = time.perf_counter() - tic
            for d in digests:
                self._encoded.move_to_end(d)
            pairs = [self._encoded[d] for d in digests]
            while len(self._encoded) > 2 * self._cache_entries:
                self._encoded.popitem(last=False)
            emb = self.model.embed(ids, [a for _, _, a in pairs])
        positions = self.model.audio_positions(ids)
        keys, k = list(ids), 0
        for c, f in enumerate(feats):
            for j in range(f.n_tokens):
                keys[int(positions[k])] = (digests[c], j)
                k += 1
        return Prompt(ids, emb, feats, positions, [e for _, e, _ in pairs], [a for _, _, a in pairs], seconds), keys

    # -- the prompt cache ----------------------------------------------------------------------------
    def _reuse(self, keys: list) -> tuple[list, int]:
        best, n = None, 0
        for idx, e in self._entries.items():
            m = 0
            for a, b in zip(e.keys, keys):
                if a != b:
                    break
                m += 1
            if m > n:
                best, n = idx, m
        n = min(n, len(keys) - 1)  # the last prompt position always runs: it gives the first logits
        if best is None or n <= 0:
            return make_prompt_cache(self.model), 0
        self._entries.move_to_end(best)
        return views(self._entries[best].cache, upto=n), n

    def _keep(self, keys: list, cache: list):
        self._entries[self._next] = _Entry(keys[: cache[0].offset], cache)
        self._next += 1
        while len(self._entries) > self._cache_entries:
            self._entries.popitem(last=False)

    # -- answering ------------------------------------------------------------------------------------
    def run(self, req: ChatRequest, s: Session, cancelled=lambda: False) -> Iterator[Event]:
        """The answer, token by token, then one final event (finish reason, usage, extension)."""
        with self.lock:
            yield from self._run(req, s, cancelled)

    def _run(self, req: ChatRequest, s: Session, cancelled) -> Iterator[Event]:
        m, p = self.model, s.prompt
        T = p.last
        fresh = s.ablation is not None or req.repetition_penalty  # the penalty reads the prompt's own last tokens
        cache, cached = (make_prompt_cache(m), 0) if fresh else self._reuse(s.keys)
        heads = s.heads if s.listening != "off" else None
        text, emitted, tokens, scores, finish = "", 0, [], [], "length"
        with ExitStack() as stack:
            if s.ablation is not None:
                stack.enter_context(s.ablation.hooks(m, p))
            if s.steer is not None:
                stack.enter_context(Steerer(m, s.steer, self.silence).applied(p))
            cap = None
            if heads is not None:
                cap = stack.enter_context(Capture(m, [AUDIO_MASS.format(l) for l in sorted({l for l, _ in heads.heads})],
                                                  audio_positions=p.audio_positions, at=slice(T, None)))
            stream = stream_generate(m, self.processor, p, start=cached, prompt_cache=cache, max_tokens=req.max_tokens,
                                     temp=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                     repetition_penalty=req.repetition_penalty, seed=req.seed)
            for r in stream:
                if cancelled():
                    finish = "cancelled"
                    break
                eos = r.finish_reason == "stop"  # mlx-lm repeats the end token with the detokenizer's last bytes
                score = None
                if not eos:
                    tokens.append(r.token)
                    if cap is not None:
                        score = listening(cap.audio_mass(T + len(tokens) - 1), heads.heads)
                        scores.append(score)
                text += r.text
                if r.finish_reason is not None:
                    finish = r.finish_reason
                cut = _stop_at(text, req.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                safe = len(text) if cut is not None or r.finish_reason is not None else len(text) - _held(text, req.stop)
                if safe > emitted or not eos:
                    yield Event(text[emitted:safe], None if eos else r.token,
                                None if eos else self._logprob(r, req), score)
                emitted = max(emitted, safe)
                if cut is not None:
                    break
        if finish != "cancelled" and emitted < len(text):
            yield Event(text[emitted:])
        if s.ablation is None and finish != "cancelled":
            self._keep(s.keys + tokens, cache)
        ext = self._extension(s, scores, cached)
        if "silence" in req.ext.conditions and finish != "cancelled":
            sil = generate(m, self.processor, self.silence.prompt(p), max_tokens=req.max_tokens)
            ext["conditions"] = {"silence": {"text": sil.text}}
        usage = {"prompt_tokens": len(p.ids), "completion_tokens": len(tokens),
                 "total_tokens": len(p.ids) + len(tokens),
                 "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": p.n_audio_tokens}}
        yield Event(finish=finish, usage=usage, extension=ext)

    def _logprob(self, r, req: ChatRequest) -> dict | None:
        if not req.logprobs:
            return None
        lp = np.array(r.logprobs.astype(mx.float32))
        entry = self._entry(r.token, float(lp[r.token]))
        top = []
        if req.top_logprobs:
            idx = np.argpartition(-lp, req.top_logprobs - 1)[: req.top_logprobs]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [self._entry(int(i), float(lp[i])) for i in idx]
        entry["top_logprobs"] = top
        return entry

    def _entry(self, token: int, logprob: float) -> dict:
        raw = token_bytes(self.processor.tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def _extension(self, s: Session, scores: list[float], cached: int) -> dict:
        out = {"audio_tokens": s.prompt.n_audio_tokens, "cached_tokens": cached, "model_signature": self.signature,
               "mlx_listen_version": __version__}
        if s.heads is not None and s.listening != "off":
            out["heads"] = [list(h) for h in s.heads.heads]
            out["listening_summary"] = {"at_T": scores[0] if scores else None,
                                        "mean": float(np.mean(scores)) if scores else None}
            if s.listening == "per_token":
                out["listening"] = [round(x, 6) for x in scores]
        if s.steer is not None:
            out["steering"] = s.steer.to_json()
        if s.ablation is not None:
            out["ablation"] = s.ablation.to_json()
        return out


def _stop_at(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _held(text: str, stops: list[str]) -> int:
    """How many trailing characters could still begin a stop string (held back from the stream)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best
