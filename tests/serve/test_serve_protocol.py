"""Parsing chat requests (`mlx_listen.serve.protocol`): what a client sends, and the 400 it gets for
anything wrong, before any model work."""

from __future__ import annotations

import base64
import io

import pytest
import soundfile as sf
from support import SR, tone

from mlx_listen.serve.protocol import MAX_TOP_LOGPROBS, BadRequest, parse


def wav_b64(seconds=1.0, fmt="WAV") -> str:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds), SR, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def body(*parts, **kw):
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **kw}


AUDIO = {"type": "input_audio", "input_audio": {"data": wav_b64(), "format": "wav"}}
TEXT = {"type": "text", "text": "What is it?"}


def test_audio_parts_in_every_form(tmp_path):
    raw = base64.b64decode(AUDIO["input_audio"]["data"])
    uri = "data:audio/wav;base64," + AUDIO["input_audio"]["data"]
    f = tmp_path / "a.wav"
    f.write_bytes(raw)
    req = parse(body(AUDIO, {"type": "input_audio", "input_audio": {"data": uri, "format": "mp3"}},
                     {"type": "audio_url", "audio_url": {"url": uri}},
                     {"type": "audio_url", "audio_url": {"url": f.as_uri()}}, TEXT), allow_dir=tmp_path)
    assert [c.data for c in req.clips] == [raw] * 4
    assert [p["type"] for p in req.messages[0]["content"]] == ["audio"] * 4 + ["text"]
    assert [p.get("audio") for p in req.messages[0]["content"][:4]] == ["clip0", "clip1", "clip2", "clip3"]


def test_history_and_options():
    b = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": [AUDIO, TEXT]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
                                    {"role": "user", "content": "Sure?"}],
         "max_completion_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 3,
         "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
         "mlx_listen": {"listening": "summary", "steer": {"alpha": 2}, "conditions": ["silence"]}}
    req = parse(b)
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[2]["content"] == "A dog." and req.messages[3]["content"] == "Sure?"
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.min_p, req.seed) == (7, 0.7, 0.9, 5, 0.1, 3)
    assert req.stop == ["\n"] and req.stream and req.include_usage and req.logprobs and req.top_logprobs == 2
    assert req.ext.listening == "summary" and req.ext.steer == {"alpha": 2} and req.ext.conditions == ["silence"]


@pytest.mark.parametrize("mutate, param", [
    (lambda b: b.pop("messages"), "messages"),
    (lambda b: b.update(messages=[{"role": "robot", "content": "x"}]), "messages[0]"),
    (lambda b: b["messages"][0]["content"].append({"type": "image_url", "image_url": {}}), "messages[0].content[2]"),
    (lambda b: b["messages"][0]["content"].__setitem__(0, {"type": "input_audio", "input_audio": {"data": "@@@"}}),
     "messages[0].content[0]"),
    (lambda b: b["messages"][0]["content"].__setitem__(0, {"type": "audio_url", "audio_url": {"url": "https://x/a.wav"}}),
     "messages[0].content[0]"),
    (lambda b: b["messages"][0]["content"].__setitem__(0, {"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}),
     "messages[0].content[0]"),
    (lambda b: b.update(temperature=-1), "temperature"),
    (lambda b: b.update(temperature=float("nan")), "temperature"),
    (lambda b: b.update(max_tokens=0), "max_tokens"),
    (lambda b: b.update(max_tokens=2.5), "max_tokens"),
    (lambda b: b.update(top_logprobs=MAX_TOP_LOGPROBS + 1, logprobs=True), "top_logprobs"),
    (lambda b: b.update(top_logprobs=3), "top_logprobs"),
    (lambda b: b.update(logprobs="yes"), "logprobs"),
    (lambda b: b.update(stop=["a", "b", "c", "d", "e"]), "stop"),
    (lambda b: b.update(n=2), "n"),
    (lambda b: b.update(seed=-1), "seed"),
    (lambda b: b.update(mlx_listen={"listening": "loud"}), "mlx_listen.listening"),
    (lambda b: b.update(mlx_listen={"conditions": ["noise"]}), "mlx_listen.conditions"),
    (lambda b: b.update(mlx_listen={"steer": {"alpha": 1}, "ablate": {}}), "mlx_listen"),
    (lambda b: b.update(mlx_listen={"what": 1}), "mlx_listen"),
    (lambda b: b["messages"].append({"role": "assistant", "content": "x"}), "messages"),
])
def test_bad_requests_name_what_is_wrong(mutate, param):
    b = body(AUDIO, TEXT)
    mutate(b)
    with pytest.raises(BadRequest) as e:
        parse(b)
    assert e.value.param == param and e.value.status == 400 and e.value.to_json()["error"]["message"]


def test_files_only_under_the_allowed_folder(tmp_path):
    outside = tmp_path / "outside.wav"
    outside.write_bytes(base64.b64decode(AUDIO["input_audio"]["data"]))
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    part = {"type": "audio_url", "audio_url": {"url": outside.as_uri()}}
    with pytest.raises(BadRequest, match="--allow-files"):
        parse(body(part, TEXT))
    with pytest.raises(BadRequest, match="under the allowed folder"):
        parse(body(part, TEXT), allow_dir=allowed)
    sneaky = {"type": "audio_url", "audio_url": {"url": (allowed / ".." / "outside.wav").as_uri()}}
    with pytest.raises(BadRequest, match="under the allowed folder"):
        parse(body(sneaky, TEXT), allow_dir=allowed)
