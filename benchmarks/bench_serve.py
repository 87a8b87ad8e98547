"""What the server costs on top of answering in process: one request against `ask` on the same
model and clip (the server's overhead: HTTP, JSON, base64 and decoding the clip, streaming), time
to first token, a second question about the same clip (the prompt cache) against the first, and
throughput with several clients at once. MLX against MLX on this machine's backend: read ratios.

    python benchmarks/bench_serve.py                        # tiny random model (seconds)
    python benchmarks/bench_serve.py --layers 2 --hidden 1024 --heads 16 --seconds 10 --tokens 16
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    a = p.parse_args()

    import numpy as np
    import soundfile as sf
    from openai import OpenAI

    from mlx_listen.asking import ask
    from mlx_listen.audio import load_audio
    from mlx_listen.load import load
    from mlx_listen.serve.engine import Engine
    from mlx_listen.serve.server import Server
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    build_tiny(work / "hf", layers=a.layers, heads=a.heads, kv_heads=a.heads, hidden=a.hidden,
               intermediate=2 * a.hidden, init_range=0.1, seed=0)
    convert(str(work / "hf"), str(work / "mlx"), progress=False)
    model, processor = load(work / "mlx")
    rng = np.random.default_rng(0)
    t = np.arange(int(a.seconds * 16000)) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, clip, 16000, format="WAV")
    wav = work / "clip.wav"
    wav.write_bytes(buf.getvalue())
    b64 = base64.b64encode(buf.getvalue()).decode()

    engine = Engine((model, processor), name="bench", cache_entries=1)
    httpd = Server(("127.0.0.1", 0), engine, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0)

    def msgs(q):
        return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                                             {"type": "text", "text": q}]}]

    def in_process():
        tic = time.perf_counter()
        ask(model, processor, [load_audio(wav)], "What is it?", max_tokens=a.tokens)
        return time.perf_counter() - tic

    def served(q="What is it?", fresh=True):
        if fresh:
            engine._entries.clear()  # no reuse: the same work as ask
            engine._encoded.clear()
        tic = time.perf_counter()
        first = None
        for c in client.chat.completions.create(model="bench", messages=msgs(q), max_tokens=a.tokens, stream=True):
            if first is None and c.choices and c.choices[0].delta.content:
                first = time.perf_counter() - tic
        return time.perf_counter() - tic, first

    in_process(), served()  # warm-up
    rows = {"ask in process": [], "served (stream)": [], "time to first token": [], "second question": []}
    for _ in range(a.trials):
        rows["ask in process"].append(in_process())
        total, ttft = served()
        rows["served (stream)"].append(total)
        rows["time to first token"].append(ttft)
        rows["second question"].append(served("And how loud is it?", fresh=False)[0])
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads; clip {a.seconds:g} s; {a.tokens} tokens; "
          f"median of {a.trials}")
    print("| request | median s | vs ask in process |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.4f} | {v / med['ask in process']:.3f}x |")

    def one(_):
        return served(fresh=False)[0]

    n = a.clients * 4
    tic = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - tic
    print(f"{a.clients} concurrent clients, {n} requests: {n / wall:.2f} requests/s, {n * a.tokens / wall:.1f} tokens/s "
          f"(requests take turns on the model; in process: {1 / med['ask in process']:.2f} requests/s)")
    httpd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
