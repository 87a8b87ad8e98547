"""The OpenAI chat-completions protocol, as mlx-listen reads and writes it: a request parsed and
checked into a `ChatRequest` (every problem a `BadRequest`, answered with a 400 before any model
work), and the response objects (whole, or streamed as chunks).

Audio arrives as the standard content part `{"type": "input_audio", "input_audio": {"data": <base64
or data: URI>, "format": ...}}` or as `{"type": "audio_url", "audio_url": {"url": "data:..." or
"file://..."}}` (files only under the folder the server allows). The container is sniffed from
the bytes by libsndfile, so `format` is advisory. The extension object `mlx_listen` (ignored by
every other server, tolerated by every client) asks for the listening score, steering, ablation or
extra conditions; the response carries a sibling `mlx_listen` object.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

MAX_TOP_LOGPROBS = 20
LISTENING = ("per_token", "summary", "off")


class BadRequest(Exception):
    """A request the server refuses with a 400: `message`, and the offending `param` if one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": None}}


@dataclass
class Clip:
    """One audio part of the conversation: its bytes and where it came from (for messages)."""

    data: bytes
    source: str


@dataclass
class Extension:
    """The request's `mlx_listen` object."""

    heads: str | list | None = None  # a named head set, or [[layer, head], ...]
    listening: str = "per_token"  # per_token | summary | off (with heads)
    steer: dict | None = None  # {"alpha": a, "vector": name?, "at": "all"|"prompt"}
    ablate: dict | None = None  # {"heads": ... or None (the server's), "mode": "zero|mean|scale:F|audio"}
    conditions: list[str] = field(default_factory=list)  # extra answers: "silence"


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # our chat format: content parts {"type": "text"} / {"type": "audio", "audio": "clipN"}
    clips: list[Clip]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    ext: Extension = field(default_factory=Extension)


def _number(body: dict, key: str, default, *, lo=None, hi=None, integer=False, open_lo=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, not {v!r}", key)
    if not math.isfinite(v):
        raise BadRequest(f"'{key}' must be finite, not {v!r}", key)
    if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be in {'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}], "
                         f"not {v!r}", key)
    return int(v) if integer else float(v)


_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?:;[\w=.-]+)*?(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def _decode_b64(text: str, param: str) -> bytes:
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("audio data is not valid base64", param) from None
    if not raw:
        raise BadRequest("audio data is empty", param)
    return raw


def _audio_bytes(part: dict, param: str, allow_dir: Path | None) -> Clip:
    kind = part.get("type")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise BadRequest("input_audio needs {'data': <base64>, 'format': ...}", param)
        data = spec["data"]
        m = _DATA_URI.match(data)
        if m:
            if not m.group("b64"):
                raise BadRequest("a data: URI for audio must be base64", param)
            return Clip(_decode_b64(m.group("data"), param), "input_audio")
        return Clip(_decode_b64(data, param), "input_audio")
    spec = part.get("audio_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise BadRequest("audio_url needs {'url': 'data:...' or 'file://...'}", param)
    m = _DATA_URI.match(url)
    if m:
        if not m.group("b64"):
            raise BadRequest("a data: URI for audio must be base64", param)
        return Clip(_decode_b64(m.group("data"), param), "data-uri")
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise BadRequest(f"audio_url must be a data: URI or a file:// URL, not {parsed.scheme or url!r} "
                         "(the server fetches nothing from a network)", param)
    if allow_dir is None:
        raise BadRequest("file:// audio is off on this server (start it with --allow-files DIR)", param)
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(allow_dir):
        raise BadRequest(f"file:// audio must be under the allowed folder {allow_dir}", param)
    if not path.is_file():
        raise BadRequest(f"audio file not found: {path}", param)
    return Clip(path.read_bytes(), str(path))


def _messages(body: dict, allow_dir: Path | None) -> tuple[list[dict], list[Clip]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    msgs, clips = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if isinstance(content, str):
            msgs.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("input_audio", "audio_url"):
                if role != "user":
                    raise BadRequest("audio goes in user messages", param)
                clips.append(_audio_bytes(part, param, allow_dir))
                parts.append({"type": "audio", "audio": f"clip{len(clips) - 1}"})
            else:
                raise BadRequest(f"unsupported content part {kind!r} (text, input_audio or audio_url)", param)
        if role != "user" and any(p["type"] != "text" for p in parts):
            raise BadRequest(f"messages[{i}]: only user messages carry audio", f"messages[{i}]")
        msgs.append({"role": role, "content": parts if role == "user" else "".join(p["text"] for p in parts)})
    if msgs[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", "messages")
    return msgs, clips


def _extension(body: dict) -> Extension:
    raw = body.get("mlx_listen")
    if raw is None:
        return Extension()
    if not isinstance(raw, dict):
        raise BadRequest("'mlx_listen' must be an object", "mlx_listen")
    unknown = set(raw) - {"heads", "listening", "steer", "ablate", "conditions"}
    if unknown:
        raise BadRequest(f"unknown mlx_listen fields {sorted(unknown)}", "mlx_listen")
    ext = Extension(heads=raw.get("heads"), listening=raw.get("listening", "per_token"), steer=raw.get("steer"),
                    ablate=raw.get("ablate"), conditions=list(raw.get("conditions") or []))
    if ext.listening not in LISTENING:
        raise BadRequest(f"mlx_listen.listening must be one of {', '.join(LISTENING)}", "mlx_listen.listening")
    if ext.heads is not None and not isinstance(ext.heads, (str, list)):
        raise BadRequest("mlx_listen.heads must be a head-set name or [[layer, head], ...]", "mlx_listen.heads")
    for key in ("steer", "ablate"):
        if getattr(ext, key) is not None and not isinstance(getattr(ext, key), dict):
            raise BadRequest(f"mlx_listen.{key} must be an object", f"mlx_listen.{key}")
    if ext.steer is not None:
        _number(ext.steer, "alpha", 1.0)
    bad = [c for c in ext.conditions if c != "silence"]
    if bad:
        raise BadRequest(f"unknown mlx_listen.conditions {bad} (known: silence)", "mlx_listen.conditions")
    if ext.steer is not None and ext.ablate is not None:
        raise BadRequest("steer or ablate, not both in one answer", "mlx_listen")
    return ext


def parse(body, allow_dir: Path | None = None) -> ChatRequest:
    """A request body (parsed JSON) as a `ChatRequest`; `BadRequest` for anything wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n = 1 is supported", "n")
    msgs, clips = _messages(body, allow_dir)  # no audio is allowed: the model answers text alone too
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or up to 4 non-empty strings", "stop")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be true or false", "logprobs")
    req = ChatRequest(
        model=str(body.get("model") or ""), messages=msgs, clips=clips,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 256, lo=1, integer=True),
        temperature=_number(body, "temperature", 0.0, lo=0, hi=2),
        top_p=_number(body, "top_p", 0.0, lo=0, hi=1), top_k=_number(body, "top_k", 0, lo=0, integer=True),
        min_p=_number(body, "min_p", 0.0, lo=0, hi=1),
        repetition_penalty=_number(body, "repetition_penalty", None, lo=0, open_lo=True),
        seed=_number(body, "seed", None, lo=0, hi=2**32 - 1, integer=True), stop=stop,
        stream=bool(body.get("stream", False)), include_usage=bool(opts.get("include_usage", False)),
        logprobs=logprobs, top_logprobs=_number(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS, integer=True),
        ext=_extension(body))
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if req.top_p == 1.0:
        req.top_p = 0.0  # keeping every token is no nucleus at all
    return req


# -- responses -----------------------------------------------------------------------------------

def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish: str, usage: dict, logprobs: list | None,
               extension: dict | None) -> dict:
    out = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
                        "finish_reason": finish}],
           "usage": usage}
    if extension is not None:
        out["mlx_listen"] = extension
    return out


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None, logprobs: list | None = None,
          extension: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta,
                        "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
                        "finish_reason": finish}]}
    if extension is not None:
        out["mlx_listen"] = extension
    return out


def usage_chunk(cid: str, model: str, created: int, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage}
