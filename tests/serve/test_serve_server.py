"""`mlx-listen serve` as clients use it: the real `openai` package and curl against a server on
127.0.0.1, answers identical to `ask`, conformant logprobs, the listening score through the
extension, the prompt cache, 400s for bad requests, a client that leaves mid-stream, and many
clients at once."""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import openai  # the real client (the test extra installs it)
import pytest
import soundfile as sf
from support import SR, tone

from mlx_listen.asking import ask
from mlx_listen.headset import HeadSet
from mlx_listen.interp.ablation import Ablation
from mlx_listen.method.directions import from_heads
from mlx_listen.serve.engine import Engine
from mlx_listen.serve.server import Server

Q = "What is making this sound?"
HEADS = HeadSet([(0, 1), (1, 2)])


def flac(seconds: float, freq: float = 440.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, freq), SR, format="FLAC")
    return buf.getvalue()


def messages(audio: bytes, question: str = Q, fmt: str = "wav"):  # the format is advisory: the bytes are FLAC
    return [{"role": "user", "content": [{"type": "input_audio",
                                          "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def server(tiny_gqa):
    engine = Engine(tiny_gqa.mlx, heads={"spec": HEADS}, name="tiny")
    httpd = Server(("127.0.0.1", 0), engine, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)


def expected(tiny_gqa, audio: bytes, max_tokens: int, **kw):
    model, processor = tiny_gqa.mlx
    samples, _ = sf.read(io.BytesIO(audio), dtype="float32")
    return ask(model, processor, [samples], Q, max_tokens=max_tokens, **kw)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny+listen", "tiny+steer-a1"]
    out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{server.server_address[1]}/health"], capture_output=True,
                         text=True, timeout=30)
    assert json.loads(out.stdout)["status"] == "ok"


def test_answer_equals_ask_with_listening_and_logprobs(client, tiny_gqa):
    audio = flac(2.0)
    r = client.chat.completions.create(model="tiny+listen", messages=messages(audio), max_tokens=8, logprobs=True,
                                       top_logprobs=4)
    want = expected(tiny_gqa, audio, 8, heads=HEADS)
    assert r.choices[0].message.content == want.text
    ext = r.model_extra["mlx_listen"]
    assert ext["listening"] == pytest.approx(want.listening_tokens, abs=1e-6)
    assert ext["listening_summary"]["at_T"] == pytest.approx(want.listening, abs=1e-6)
    assert ext["audio_tokens"] == want.audio_tokens == r.usage.prompt_tokens_details.audio_tokens
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.tokens)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.tokens)
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 4
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-6  # greedy: the best one
        assert entry.logprob == pytest.approx(tops[0], abs=1e-6)
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-5
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined == want.text  # the tokens' bytes spell the answer


def test_streaming_gives_the_same_tokens_and_usage(client, tiny_gqa):
    audio = flac(1.5, 330.0)
    stream = client.chat.completions.create(model="tiny+listen", messages=messages(audio), max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    text, logprobs, listening, usage, finish = [], [], [], None, None
    for c in stream:
        if not c.choices:
            usage = c.usage
            continue
        text.append(c.choices[0].delta.content or "")
        if c.choices[0].logprobs and c.choices[0].logprobs.content:
            logprobs += c.choices[0].logprobs.content
        listening += (c.model_extra.get("mlx_listen") or {}).get("listening", [])
        finish = c.choices[0].finish_reason or finish
    want = expected(tiny_gqa, audio, 10, heads=HEADS)
    assert "".join(text) == want.text and len(logprobs) == len(want.tokens)
    assert listening == pytest.approx(want.listening_tokens, abs=1e-6)
    assert usage.completion_tokens == len(want.tokens) and finish in ("stop", "length")


def test_second_question_about_the_same_clip_prefills_only_its_text(client, tiny_gqa):
    audio = flac(2.5, 550.0)
    first = client.chat.completions.create(model="tiny", messages=messages(audio, "What is it?"), max_tokens=4)
    second = client.chat.completions.create(model="tiny", messages=messages(audio, "How loud is it?"), max_tokens=4)
    n_audio = second.usage.prompt_tokens_details.audio_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < n_audio  # a new clip: nothing of it cached
    assert second.usage.prompt_tokens_details.cached_tokens > n_audio  # the clip and the template before the text
    model, processor = tiny_gqa.mlx
    samples, _ = sf.read(io.BytesIO(audio), dtype="float32")
    assert second.choices[0].message.content == ask(model, processor, [samples], "How loud is it?", max_tokens=4).text
    other = client.chat.completions.create(model="tiny", messages=messages(flac(2.5, 200.0), "How loud is it?"),
                                           max_tokens=4)
    assert other.usage.prompt_tokens_details.cached_tokens < n_audio  # same length, other content: not reused


def test_steering_and_ablation_through_the_extension(client, tiny_gqa):
    audio = flac(2.0, 700.0)
    steered = client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=6,
                                             extra_body={"mlx_listen": {"steer": {"alpha": 4.0}}})
    assert steered.choices[0].message.content == expected(tiny_gqa, audio, 6, steer=from_heads(HEADS, alpha=4.0)).text
    assert steered.model_extra["mlx_listen"]["steering"]["alpha"] == 4.0
    alias = client.chat.completions.create(model="tiny+steer-a4", messages=messages(audio), max_tokens=6)
    assert alias.choices[0].message.content == steered.choices[0].message.content
    ablated = client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=6,
                                             extra_body={"mlx_listen": {"ablate": {"mode": "audio"}}})
    want = expected(tiny_gqa, audio, 6, ablate=Ablation(HEADS.heads, audio=True))
    assert ablated.choices[0].message.content == want.text
    assert ablated.model_extra["mlx_listen"]["ablation"]["mode"] == "audio-mask"
    sil = client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=4,
                                         extra_body={"mlx_listen": {"conditions": ["silence"]}})
    assert isinstance(sil.model_extra["mlx_listen"]["conditions"]["silence"]["text"], str)


def test_stop_strings_and_seeded_sampling(client, tiny_gqa):
    audio = flac(2.0)
    full = client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=12).choices[0].message.content
    stop = full[3:5]
    cut = client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages(audio), max_tokens=12, stop=[stop], stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]
    a, b = (client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=8, temperature=1.0,
                                           seed=7).choices[0].message.content for _ in range(2))
    assert a == b


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": messages(b"not audio at all")}).encode(), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": messages(b"RIFF")}).encode(), 400, "messages"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30,
                 "logprobs": True}).encode(), 400, "top_logprobs"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                 "mlx_listen": {"heads": [[9, 9]]}}).encode(), 400, "mlx_listen.heads"),
])
def test_bad_requests_get_400_from_curl(server, payload, status, param):
    port = server.server_address[1]
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                          "--data-binary", "@-", f"http://127.0.0.1:{port}/v1/chat/completions"],
                         input=payload, capture_output=True, timeout=60)
    body, code = out.stdout.rsplit(b"\n", 1)
    assert int(code) == status, body
    err = json.loads(body)["error"]
    assert err["message"] and err["param"] == param


def test_curl_streams_sse(server, tiny_gqa):
    port = server.server_address[1]
    audio = flac(1.0, 880.0)
    req = json.dumps({"model": "tiny", "messages": messages(audio), "max_tokens": 5, "stream": True}).encode()
    out = subprocess.run(["curl", "-sN", "-H", "Content-Type: application/json", "--data-binary", "@-",
                          f"http://127.0.0.1:{port}/v1/chat/completions"], input=req, capture_output=True, timeout=60)
    events = [line[6:] for line in out.stdout.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected(tiny_gqa, audio, 5).text


def test_a_client_that_leaves_mid_stream_frees_the_model(server, client, tiny_gqa):
    port = server.server_address[1]
    req = json.dumps({"model": "tiny", "messages": messages(flac(2.0)), "max_tokens": 200, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(req)}\r\n\r\n".encode() + req)
    assert b"200" in s.recv(200)
    s.close()  # gone after the first bytes
    time.sleep(0.2)
    audio = flac(1.0)
    r = client.chat.completions.create(model="tiny", messages=messages(audio), max_tokens=4)
    assert r.choices[0].message.content == expected(tiny_gqa, audio, 4).text


def test_a_full_queue_answers_503_at_once(server, tiny_gqa):
    """With one request answered and `max_queue` = 1 waiting, the next gets a 503 with Retry-After at once
    (curl), and the two queued ones are answered in full once the model is free."""
    engine = server.engine
    busy = Server(("127.0.0.1", 0), engine, max_queue=1, quiet=True)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    port = busy.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    audio = flac(1.0)
    body = json.dumps({"model": "tiny", "messages": messages(audio), "max_tokens": 3})
    pool = ThreadPoolExecutor(2)
    try:
        with engine.lock:  # the model is busy: both requests wait on it
            queued = [pool.submit(client.chat.completions.create, model="tiny", messages=messages(audio), max_tokens=3)
                      for _ in range(2)]
            deadline = time.time() + 30
            while busy.slots._value > 0 and time.time() < deadline:  # both have taken their slots
                time.sleep(0.01)
            tic = time.perf_counter()
            out = subprocess.run(["curl", "-s", "-i", "-H", "Content-Type: application/json", "-d", body,
                                  f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True,
                                 timeout=30)
            waited = time.perf_counter() - tic
            assert not any(f.done() for f in queued)
        head, _, payload = out.stdout.partition("\n\n")  # text mode: CRLF read as LF
        assert head.startswith("HTTP/1.1 503") and "Retry-After: 1" in head and waited < 10
        err = json.loads(payload)["error"]
        assert err["code"] == "queue_full" and "1 waiting" in err["message"]
        want = expected(tiny_gqa, audio, 3).text
        assert [f.result(timeout=120).choices[0].message.content for f in queued] == [want, want]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        busy.shutdown()
        busy.server_close()


@pytest.mark.slow
def test_many_clients_at_once(client, tiny_gqa):
    """8 streaming clients x 5 requests each: every answer is `ask`'s, and memory is back after."""
    clips = {f: flac(1.0 + 0.25 * (f % 3), 200.0 + 60 * f) for f in range(4)}
    want = {f: expected(tiny_gqa, a, 6).text for f, a in clips.items()}

    def one(k):
        f = k % 4
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=messages(clips[f]), max_tokens=6, stream=True) if c.choices]
        return f, "".join(parts)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))  # warm: the prompt cache and MLX's buffers reach their size
        mx.clear_cache()
        before = mx.get_active_memory()
        results = list(pool.map(one, range(40)))
    assert all(text == want[f] for f, text in results)
    mx.clear_cache()
    grown = (mx.get_active_memory() - before) / 2**20
    assert grown < 64, f"active memory grew by {grown:.1f} MB over 40 requests"


def test_view_route_renders_the_page(server):
    port = server.server_address[1]
    req = json.dumps({"model": "tiny", "messages": messages(flac(1.0)), "max_tokens": 4}).encode()
    out = subprocess.run(["curl", "-s", "-H", "Content-Type: application/json", "--data-binary", "@-",
                          f"http://127.0.0.1:{port}/view"], input=req, capture_output=True, timeout=60)
    page = out.stdout.decode()
    assert page.startswith("<!doctype html>") and "window.RECORD" in page and "listening" in page


def test_several_clips_system_and_history(client, tiny_gqa):
    """Two clips in one message are placed as the chat template places them (the same answer as `ask`
    with both clips); a system message and earlier turns count in the prompt."""
    a, b = flac(1.0, 300.0), flac(1.5, 600.0)
    two = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(a).decode(), "format": "flac"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b).decode(), "format": "flac"}},
        {"type": "text", "text": "Which clip is louder?"}]}]
    r = client.chat.completions.create(model="tiny", messages=two, max_tokens=5)
    model, processor = tiny_gqa.mlx
    clips = [sf.read(io.BytesIO(x), dtype="float32")[0] for x in (a, b)]
    want = ask(model, processor, clips, "Which clip is louder?", max_tokens=5)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens
    history = [{"role": "system", "content": "Answer in one word."}, *two,
               {"role": "assistant", "content": r.choices[0].message.content},
               {"role": "user", "content": "Are you sure?"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, max_tokens=3)
    rendered = processor.render([{"role": "system", "content": "Answer in one word."},
                                 {"role": "user", "content": [{"type": "audio", "audio": "clip0"},
                                                              {"type": "audio", "audio": "clip1"},
                                                              {"type": "text", "text": "Which clip is louder?"}]},
                                 {"role": "assistant", "content": r.choices[0].message.content},
                                 {"role": "user", "content": "Are you sure?"}])
    assert rendered.count("Audio 1:") == 1 and rendered.count("Audio 2:") == 1
    n_text = len(processor.tokenizer.encode(rendered.replace("<|AUDIO|>", ""), add_special_tokens=True))
    assert r2.usage.prompt_tokens == n_text + want.audio_tokens
