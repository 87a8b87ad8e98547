"""Cost of head-level capture and of audio–silence steering, MLX against MLX on the same weights.

Rows (interleaved trials, medians, so machine noise hits both sides equally):
1. prefill of a ~290-token audio prompt (a 10 s clip): plain vs capturing every head's audio mass
   at the last prompt token, and the peak memory each adds;
2. a whole answer (encoder + prefill + N decoded tokens) for a 10 s clip: unsteered vs steered
   (per-input direction: silence pass up to max(L*), silence encoding cached after the first
   item of that length), and the first steered answer with a cold silence cache.

    python benchmarks/bench_capture_steer.py               # real widths, few layers
    python benchmarks/bench_capture_steer.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np
from bench_model import DTYPES, build_model  # same random mid-size model as bench_model.py

from mlx_listen.audio import SAMPLE_RATE, audio_features
from mlx_listen.hooks import AUDIO_MASS, Capture
from mlx_listen.interp.steering import SteerConfig, Steerer
from mlx_listen.prompt import Prompt


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (real model: 32)")
    p.add_argument("--encoder-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--read-layers", default=None, help="L* for steering, e.g. 1,2 (default: the first half)")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rows", default="prefill,answer", help="which rows to run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args()


def make_prompt(model, feats, n_text=40) -> Prompt:
    """What prompt.prepare returns, built without a tokenizer: random text around the audio run."""
    n_tok, audio_id = feats.n_tokens, model.audio_token_id
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(0, audio_id - 1, 10)] + [audio_id] * n_tok + \
          [int(x) for x in rng.integers(0, audio_id - 1, n_text - 10)]
    emb = model.embed(ids, [model.encode_audio(feats.mel, feats.n_frames)])
    mx.eval(emb)
    return Prompt(ids, emb, [feats], np.arange(10, 10 + n_tok))


def prefill(model, prompt, capture: bool):
    """The prompt's forward pass and the next-token logits (as generation needs: last row only)."""
    def run():
        h = model.blocks(prompt.embeddings[None])
        return model.unembed(h[:, -1])

    mx.reset_peak_memory()
    tic = time.perf_counter()
    if capture:
        with Capture(model, AUDIO_MASS.format("*"), audio_positions=prompt.audio_positions, at=prompt.last) as cap:
            mx.eval(run(), dict(cap.values))
    else:
        mx.eval(run())
    return time.perf_counter() - tic, mx.get_peak_memory()


def answer(model, feats, n_tokens: int, steerer=None):
    """Encoder + prefill + greedy decode of n tokens (mlx-lm's generate_step), steered or not."""
    from contextlib import nullcontext

    from mlx_lm.generate import generate_step

    tic = time.perf_counter()
    prompt = make_prompt(model, feats)
    with steerer.applied(prompt) if steerer else nullcontext():
        for n, _ in zip(range(n_tokens), generate_step(mx.array(prompt.ids), model, max_tokens=n_tokens,
                                                       input_embeddings=prompt.embeddings)):
            pass
    return time.perf_counter() - tic


def main():
    a = parse_args()
    if a.quick:
        a.layers, a.trials, a.decode_tokens = 2, 2, 4
    model = build_model(a)
    n_layers = model.n_layers
    read = [int(x) for x in a.read_layers.split(",")] if a.read_layers else list(range(max(1, n_layers // 2)))
    clip = (0.3 * np.sin(2 * np.pi * 440 * np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    feats = audio_features(clip)
    prompt = make_prompt(model, feats)
    rows = {}
    print("| measurement | off / unsteered | on / steered | ratio |\n|---|---|---|---|", flush=True)

    if "prefill" in a.rows:
        prefill(model, prompt, False), prefill(model, prompt, True)  # warm-up
        t_off, t_on, m_off, m_on = [], [], [], []
        for _ in range(a.trials):
            t, m = prefill(model, prompt, False)
            t_off.append(t), m_off.append(m)
            t, m = prefill(model, prompt, True)
            t_on.append(t), m_on.append(m)
        rows["prefill"] = {"tokens": len(prompt.ids), "off_s": statistics.median(t_off),
                           "capture_s": statistics.median(t_on), "ratio": statistics.median(t_on) / statistics.median(t_off),
                           "extra_peak_mb": (max(m_on) - max(m_off)) / 2**20}
        p = rows["prefill"]
        print(f"| prefill, {p['tokens']} tokens, all heads' audio mass | {p['off_s']:.3f} s | {p['capture_s']:.3f} s | "
              f"{p['ratio']:.3f}x (peak {p['extra_peak_mb']:+.1f} MB) |", flush=True)
    if "answer" not in a.rows:
        return

    steerer = Steerer(model, SteerConfig(layers=read, alpha=1.0))
    cold = answer(model, feats, a.decode_tokens, steerer)  # the silence encoding for this length is computed here
    answer(model, feats, a.decode_tokens)
    t_base, t_steer = [], []
    for _ in range(a.trials):
        t_base.append(answer(model, feats, a.decode_tokens))
        t_steer.append(answer(model, feats, a.decode_tokens, steerer))
    rows["answer"] = {"decode_tokens": a.decode_tokens, "read_layers": read, "n_layers": n_layers,
                      "unsteered_s": statistics.median(t_base), "steered_s": statistics.median(t_steer),
                      "ratio": statistics.median(t_steer) / statistics.median(t_base), "steered_cold_s": cold}

    s = rows["answer"]
    print(f"| answer, 10 s clip, {s['decode_tokens']} tokens, L* = {read} of {n_layers} layers | {s['unsteered_s']:.3f} s | "
          f"{s['steered_s']:.3f} s | {s['ratio']:.3f}x (cold silence cache: {s['steered_cold_s']:.3f} s) |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), **rows}, f, indent=2)


if __name__ == "__main__":
    main()
