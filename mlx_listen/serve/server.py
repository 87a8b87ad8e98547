"""`mlx-listen serve`: an OpenAI-compatible HTTP server on the standard library's threaded server.

Routes: `POST /v1/chat/completions` (streaming SSE or one JSON object), `GET /v1/models`,
`GET /health`, `POST /view` (the viewer page for a chat request: the same body, an HTML answer).
Each connection has its own thread; model work takes turns under the engine's lock, so concurrent
clients queue and never share a KV cache or a hook. The queue is bounded: past `max_queue` requests
waiting behind the one being answered, a request gets a 503 at once (with Retry-After) instead of
waiting without end. A bad request is a 400 with OpenAI's error
object before any model work; a client that goes away mid-stream stops its answer and frees the
model for the next; an unexpected failure is a 500 and the server goes on.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .. import __version__
from ..view import render
from ..view.record import build
from . import protocol
from .engine import Engine
from .protocol import BadRequest


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine: Engine, *, allow_dir: Path | None = None, max_body: int = 64 << 20,
                 max_queue: int = 16, quiet: bool = False):
        super().__init__(address, Handler)
        self.engine, self.allow_dir, self.max_body, self.quiet = engine, allow_dir, max_body, quiet
        self.max_queue = max_queue
        self.slots = threading.BoundedSemaphore(max_queue + 1)  # the request being answered + those waiting


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write(f"[INFO] {self.address_string()} {fmt % args}\n")

    # -- plumbing ---------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json", close: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def _error(self, e: BadRequest):
        self._json(e.status, e.to_json())

    def _body(self):
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if n <= 0:
            raise BadRequest("the request has no body")
        if n > self.server.max_body:
            raise BadRequest(f"the body is {n} bytes, over this server's limit of {self.server.max_body}", status=413)
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not JSON ({e})") from None

    # -- routes -------------------------------------------------------------------------------------
    def do_OPTIONS(self):  # browsers' preflight for local apps
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        engine = self.server.engine
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._json(200, {"status": "ok", "model": engine.name, "mlx_listen_version": __version__})
        elif path == "/v1/models":
            now = int(time.time())
            self._json(200, {"object": "list", "data": [{"id": i, "object": "model", "created": now,
                                                         "owned_by": "mlx-listen"} for i in engine.model_ids()]})
        else:
            self._json(404, {"error": {"message": f"no route {path}", "type": "not_found", "param": None,
                                       "code": None}})

    def do_POST(self):
        if not self.server.slots.acquire(blocking=False):
            self.rfile.read(min(int(self.headers.get("Content-Length", "0") or 0), self.server.max_body))
            self.send_response(503)
            body = json.dumps({"error": {"message": f"the server is busy (the queue is full: "
                                                   f"{self.server.max_queue} waiting); retry later", "type": "server_busy",
                                         "param": None, "code": "queue_full"}}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(body)
            return
        try:
            self._post()
        finally:
            self.server.slots.release()

    def _post(self):
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/v1/chat/completions", "/view"):
                raise BadRequest(f"no route {path}", status=404)
            req = protocol.parse(self._body(), self.server.allow_dir)
            session = self.server.engine.session(req)
        except BadRequest as e:
            return self._error(e)
        except Exception:  # a bug, not the client's fault: say so, keep serving
            traceback.print_exc()
            return self._json(500, {"error": {"message": "internal error (see the server's log)",
                                              "type": "server_error", "param": None, "code": None}})
        if path == "/view":
            return self._view(req)
        if req.stream:
            return self._stream(req, session)
        self._whole(req, session)

    def _whole(self, req, session):
        text, logprobs, final = [], [] if req.logprobs else None, None
        for ev in self.server.engine.run(req, session):
            if ev.finish is not None:
                final = ev
                break
            text.append(ev.text)
            if logprobs is not None and ev.logprob is not None:
                logprobs.append(ev.logprob)
        self._json(200, protocol.completion(protocol.new_id(), req.model or self.server.engine.name, "".join(text),
                                            final.finish, final.usage, logprobs, final.extension))

    def _stream(self, req, session):
        cid, created, model = protocol.new_id(), int(time.time()), req.model or self.server.engine.name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        gone = threading.Event()

        def send(obj):
            try:
                self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, OSError):
                gone.set()

        events = self.server.engine.run(req, session, cancelled=gone.is_set)
        try:
            send(protocol.chunk(cid, model, created, {"role": "assistant", "content": ""}))
            for ev in events:
                if gone.is_set():
                    break
                if ev.finish is not None:  # per-token values went with their chunks; the rest comes last
                    final = {k: v for k, v in ev.extension.items() if k != "listening"}
                    send(protocol.chunk(cid, model, created, {}, ev.finish, extension=final))
                    if req.include_usage:
                        send(protocol.usage_chunk(cid, model, created, ev.usage))
                    break
                ext = {"listening": [round(ev.listening, 6)]} if ev.listening is not None else None
                send(protocol.chunk(cid, model, created, {"content": ev.text},
                                    logprobs=[ev.logprob] if ev.logprob is not None else ([] if req.logprobs else None),
                                    extension=ext))
            if not gone.is_set():
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            events.close()  # frees the model for the next request, also when the client left

    def _view(self, req):
        engine = self.server.engine
        heads = engine._head_set(req.ext.heads) if engine.heads else None
        question = next((p["text"] for m in reversed(req.messages) if m["role"] == "user" and isinstance(m["content"], list)
                         for p in m["content"] if p["type"] == "text"), "")
        samples = engine.samples(req.clips[0])
        with engine.lock:
            record = build((engine.model, engine.processor), samples, question, heads=heads,
                           max_tokens=req.max_tokens, name=Path(req.clips[0].source).name)
        self._send(200, render(record).encode("utf-8"), "text/html; charset=utf-8")


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080, *, allow_dir: Path | None = None,
          max_queue: int = 16, quiet: bool = False, ready=None) -> None:
    """Serve until interrupted; `ready(server)` is called once the socket listens (tests, `port=0`)."""
    httpd = Server((host, port), engine, allow_dir=allow_dir, max_queue=max_queue, quiet=quiet)
    if ready is not None:
        ready(httpd)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
