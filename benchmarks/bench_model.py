"""Benchmark mlx-listen's pipeline on random weights, and its decoder against mlx-lm's qwen2.

Everything runs in one process on the same random weights and is compared MLX against MLX only
(ratios): absolute numbers depend on the MLX backend and BLAS, not on this code.

Rows: log-mel time; audio tower on the valid frames only vs HF's padded 30 s window (time and
max |diff|); prefill and greedy decode tok/s and peak memory for a ~290-token audio prompt (fed
as input_embeddings, KV cache as mlx-lm's generate_step uses it), for our model and for
`mlx_lm.models.qwen2.Model` holding the very same arrays, interleaved (decode token by token) so
load from other processes hits both alike.

    python benchmarks/bench_model.py                # mid-size: real widths, few layers (~7 min, 2-core CPU)
    python benchmarks/bench_model.py --quick        # tiny smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache

from mlx_listen.audio import SAMPLE_RATE, audio_features, log_mel
from mlx_listen.models.qwen2_audio import Model, ModelConfig

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (real model: 32)")
    p.add_argument("--encoder-layers", type=int, default=2, help="encoder layers (real: 32)")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size (real: 156032)")
    p.add_argument("--trials", type=int, default=3, help="timed generation runs per model")
    p.add_argument("--encoder-trials", type=int, default=1, help="timed runs per encoder path "
                   "(the padded path takes ~35 s a run at the default size on a 2-core CPU)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="tiny widths: checks the script runs")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return p.parse_args()


def build_model(a) -> Model:
    # Real Qwen2-Audio-7B widths and head layout; only depth and vocab are cut to fit a laptop.
    if a.quick:
        text = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
        audio = dict(d_model=128, encoder_attention_heads=2, encoder_ffn_dim=512)
    else:
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        audio = dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120)
    cfg = {
        "model_type": "qwen2_audio",
        "audio_token_index": a.vocab - 1,
        "audio_config": dict(audio, encoder_layers=a.encoder_layers, num_mel_bins=128),
        "text_config": dict(text, num_hidden_layers=a.layers, vocab_size=a.vocab, rms_norm_eps=1e-5,
                            rope_theta=10000.0, tie_word_embeddings=False),
    }
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(cfg))
    model.set_dtype(DTYPES[a.dtype])  # init is lazy: only the cast weights get materialised
    mx.eval(model.parameters())
    return model


def mlx_lm_twin(model: Model) -> qwen2.Model:
    """mlx-lm's qwen2 holding the same arrays (shared, not copied); strict load checks the names."""
    t = model.text_config  # the decoder's config (AudioLM interface)
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        intermediate_size=t.intermediate_size, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        vocab_size=t.vocab_size, rope_theta=t.rope_theta, tie_word_embeddings=False,
    )
    twin = qwen2.Model(args)
    twin.load_weights(tree_flatten(model.language_model.parameters()), strict=True)
    return twin


def timed(fn):
    """Seconds for fn(), forcing evaluation (MLX is lazy), and its result."""
    mx.synchronize()
    tic = time.perf_counter()
    out = fn()
    mx.eval(out)
    return time.perf_counter() - tic, out


def clip(seconds: float) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def bench_encoder(model: Model, seconds: float, trials: int) -> dict:
    f = audio_features(clip(seconds))
    tower = model.audio_tower
    valid, padded = [], []
    timed(lambda: tower(f.mel, f.n_frames))  # warm-up (first-call allocations), on the cheap path
    for _ in range(trials):  # interleaved, like the decoder A/B below
        t, out_v = timed(lambda: tower(f.mel, f.n_frames))
        valid.append(t)
        t, out_p = timed(lambda: tower(f.mel, f.n_frames, padded=True))
        padded.append(t)
    diff = mx.abs(out_v.astype(mx.float32) - out_p.astype(mx.float32)).max().item()
    return dict(valid_s=statistics.median(valid), padded_s=statistics.median(padded),
                speedup=statistics.median(padded) / statistics.median(valid), max_abs_diff=diff,
                n_tokens=f.n_tokens)


def audio_prompt(model: Model, n_text: int = 40):
    """~290 positions: 20 text tokens, a 10 s clip's 250 <|AUDIO|> tokens, 20 text tokens."""
    f = audio_features(clip(10.0))
    feats = model.encode_audio(f.mel, f.n_frames)
    rng = np.random.default_rng(1)
    text = rng.integers(0, model.vocab_size - 1, n_text)
    ids = np.concatenate([text[: n_text // 2], np.full(f.n_tokens, model.audio_token_id),
                          text[n_text // 2:]])
    emb = model.embed(ids, [feats])
    mx.eval(emb)
    return ids, emb


def prefill(lm, emb):
    """As mlx-lm's generate_step does it: all but the last position into the KV cache, then the
    logits of the last one only (the LM head on every prompt position would cost as much as a layer)."""
    cache = make_prompt_cache(lm)
    mx.synchronize()
    tic = time.perf_counter()
    lm(None, cache, input_embeddings=emb[None, :-1])
    mx.eval([c.state for c in cache])
    y = lm(None, cache, input_embeddings=emb[None, -1:])[:, -1].argmax(-1)
    mx.eval(y)
    return time.perf_counter() - tic, cache, y


def decode_step(lm, cache, y):
    tic = time.perf_counter()
    y = lm(y[None], cache)[:, -1].argmax(-1)  # greedy
    mx.eval(y)
    return time.perf_counter() - tic, y


def bench_decoders(lms: dict, emb: mx.array, trials: int, n_tokens: int) -> dict:
    """Prefill and greedy decode for each model, interleaved: the prefills back to back in each
    trial, then the decodes token by token, so load from other processes on a shared machine
    hits both alike. Ratios are medians of the paired (back-to-back) timings."""
    names = list(lms)
    for lm in lms.values():  # warm-up: first-call allocations, on a short prompt
        _, cache, y = prefill(lm, emb[:16])
        decode_step(lm, cache, y)
    pre, dec, peak, toks = ({n: [] for n in names} for _ in range(4))
    for trial in range(trials):
        order = names if trial % 2 == 0 else names[::-1]  # A B, B A, …: neither always first
        state = {}
        for name in order:
            mx.clear_cache()
            mx.reset_peak_memory()
            t, cache, y = prefill(lms[name], emb)
            pre[name].append(t)
            peak[name].append(mx.get_peak_memory() / 1e9)
            state[name] = (cache, y)
            toks[name].append([y.item()])
        for i in range(n_tokens - 1):
            for name in order if i % 2 == 0 else order[::-1]:
                cache, y = state[name]
                t, y = decode_step(lms[name], cache, y)
                state[name] = (cache, y)
                dec[name].append(t)
                toks[name][-1].append(y.item())
        print(f"  trial {trial}: " + "  ".join(
            f"{n} prefill {pre[n][-1]:.1f} s, decode {np.median(dec[n][-(n_tokens - 1):]) * 1e3:.0f} ms/tok"
            for n in names), flush=True)
    a, b = names
    return dict(
        prefill_tok_s={n: emb.shape[0] / statistics.median(pre[n]) for n in names},
        decode_tok_s={n: 1 / statistics.median(dec[n]) for n in names},
        peak_gb={n: max(peak[n]) for n in names},
        prefill_ratio=statistics.median(tb / ta for ta, tb in zip(pre[a], pre[b])),
        decode_ratio=statistics.median(tb / ta for ta, tb in zip(dec[a], dec[b])),
        same_tokens=all(t == toks[a][0] for n in names for t in toks[n]),
        tokens=toks[a][0],
    )


def main():
    a = parse_args()
    if a.quick:
        a.layers, a.encoder_layers, a.vocab = min(a.layers, 2), min(a.encoder_layers, 1), 1024
        a.trials, a.encoder_trials, a.decode_tokens = 1, 1, 8
    model = build_model(a)
    res = {"config": {k: v for k, v in vars(a).items() if k != "json"},
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__} {mx.default_device()}"}

    audio10 = clip(10.0)
    timed(lambda: log_mel(audio10))
    res["log_mel_s"] = statistics.median(timed(lambda: log_mel(audio10))[0] for _ in range(max(a.trials, 5)))
    res["encoder"] = {f"{s} s": bench_encoder(model, s, a.encoder_trials) for s in (3, 10)}

    ids, emb = audio_prompt(model)
    ours, twin = model, mlx_lm_twin(model)  # the whole Model: what generate.py hands mlx-lm
    n = min(32, len(ids))  # full logits on a prefix: cheap, and covers embeddings, layers and head
    la, lb = ours(None, input_embeddings=emb[None, :n]), twin(None, input_embeddings=emb[None, :n])
    res["logits_max_abs_diff"] = mx.abs(la.astype(mx.float32) - lb.astype(mx.float32)).max().item()

    res["prompt_tokens"] = len(ids)
    res.update(bench_decoders({"ours": ours, "mlx_lm": twin}, emb, a.trials, a.decode_tokens))
    print(table(res))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


def table(r: dict) -> str:
    c, pre, dec, peak = r["config"], r["prefill_tok_s"], r["decode_tok_s"], r["peak_gb"]
    rows = [
        ("log-mel, 10 s clip", f"{r['log_mel_s'] * 1e3:.1f} ms", "", "", ""),
        *[(f"audio tower, {k} clip ({e['n_tokens']} tok): valid frames (A) vs padded 30 s (B)",
           f"{e['valid_s']:.2f} s", f"{e['padded_s']:.2f} s", f"{e['speedup']:.2f}× faster",
           f"max abs diff {e['max_abs_diff']:.1e}") for k, e in r["encoder"].items()],
        (f"prefill, {r['prompt_tokens']}-token audio prompt: ours (A) vs mlx-lm qwen2 (B)",
         f"{pre['ours']:.2f} tok/s", f"{pre['mlx_lm']:.2f} tok/s", f"{r['prefill_ratio']:.3f}×",
         f"logits max abs diff {r['logits_max_abs_diff']:.1e}"),
        (f"decode, {c['decode_tokens']} tokens greedy: ours (A) vs mlx-lm qwen2 (B)",
         f"{dec['ours']:.2f} tok/s", f"{dec['mlx_lm']:.2f} tok/s", f"{r['decode_ratio']:.3f}×",
         "same tokens" if r["same_tokens"] else "TOKENS DIFFER"),
        ("peak memory, prefill (weights included)", f"{peak['ours']:.2f} GB", f"{peak['mlx_lm']:.2f} GB", "", ""),
    ]
    head = (f"{c['dtype']}, decoder {c['layers']} layers, encoder {c['encoder_layers']} layers, "
            f"vocab {c['vocab']}; medians of {c['trials']} generation / {c['encoder_trials']} encoder runs; "
            f"{r['machine']}\n\n"
            "| measurement | A | B | ratio (A speed / B speed) | check |\n|---|---|---|---|---|\n")
    return head + "\n".join("| " + " | ".join(row) + " |" for row in rows)


if __name__ == "__main__":
    main()
