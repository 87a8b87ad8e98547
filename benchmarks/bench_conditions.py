"""Cost per item of answering one prompt under many conditions, against one plain answer.

A random model at the real widths (decoder hidden 4096, 32 heads, 32 KV heads, FFN 11008;
encoder d_model 1280, 20 heads, FFN 5120), few layers, bf16, with the tiny byte-level tokenizer
of `mlx_listen_convert.reference.tiny` padded to `--vocab` entries (the padding ids decode but are never produced
by encoding, so prompts are exactly the tiny tokenizer's). One prompt: a 10 s clip (250 audio
tokens) and a short question through the real chat template and `prompt.prepare`.

Rows (one process, same weights; each trial runs every variant, the order reversed on every
other trial, after a warm-up on a 1 s clip; times are medians, ratios medians of per-trial ratios).
Times are this process's CPU seconds (`time.process_time`, all threads): on a 2-core machine
shared with other jobs, wall time swings by 2-3× with their load while CPU time follows the work;
wall times are reported next to them.

- A: one plain answer, `Answerer([baseline()])`, N greedy tokens;
- B: `eval --compare` = `Answerer([baseline(), steered(cfg)])` in one call (one prefill, one
  silence pass, one batched decode) vs the old way, a separate answer per condition
  (`Answerer([baseline()])` + `Answerer([steered(cfg)])`);
- C: a sweep row set, baseline + 5 α (0.5, 1, 2, 3, 4) + a random-head control at α = 1 (`--k` heads
  drawn uniformly, `headset.random_heads(seed + 1)`, as `sweep.py` drew them before its controls
  were layer-matched (`headset.control_sets`), so its layers spread over the decoder), 7 answers in one
  `Answerer` vs 7 separate ones.
  The old way is timed as its parts: A and each steered condition alone, every one of them run
  in every trial (the α = 1 answer serves B and C).
- D: the heads pass on a long answer (`--heads-tokens`, 256): peak memory and time of
  `Answerer([baseline()], audio_mass=True)` (what `heads.calibrate` runs) and of
  `Answerer(..., listen_heads=…)` (eval's per-token listening) vs `Answerer([baseline()])`, and of
  `ask(..., heads=…)` (capture at every answer token) vs plain `generate.generate` (mlx-lm).
- S: the silence pass alone: the previous pass over the whole silent prompt vs `Silence.residuals`
  on a prefix miss (the first item of a clip length) and a hit (every later one). Rows B and C
  run in the steady state: one Silence shared by every answerer, its store warm for the clip's
  length (from another question).

For every variant: prompt tokens through the decoder (rows entering layer 0 at prompt positions,
the silence pass included), the same summed over layers / n_layers (full-depth equivalents: what
the compute follows, since the silence pass stops at the deepest read layer), decode rows, peak
memory (`mx.get_peak_memory` after `mx.reset_peak_memory`, weights included), and whether each
answer's tokens equal the same condition answered alone.

    python benchmarks/bench_conditions.py                          # 4+4 layers, 16 tokens, 2 trials (~1 h, 2-core CPU)
    python benchmarks/bench_conditions.py --layers 2 --encoder-layers 2 --tokens 128 --trials 1 --rows A,B,C
    python benchmarks/bench_conditions.py --quick                  # tiny widths, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_listen.answers import generate
from mlx_listen.asking import ask
from mlx_listen.audio import SAMPLE_RATE
from mlx_listen.chat import Processor
from mlx_listen.eval.conditions import Answerer, baseline, steered
from mlx_listen.headset import HeadSet, random_heads
from mlx_listen.hooks import RESID, Capture
from mlx_listen.interp.steering import Silence, SteerConfig
from mlx_listen.models.qwen2 import DecoderLayer
from mlx_listen.models.qwen2_audio import Model, ModelConfig
from mlx_listen.prompt import prepare

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0)
QUESTION = "Which is it? (A) dog (B) cat"  # byte-level tokens: the prompt has the size of a real MMAU item's


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (real model: 32)")
    p.add_argument("--encoder-layers", type=int, default=4, help="encoder layers (real: 32)")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size (real: 156032; tiny tokenizer padded to it)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per answer in rows A-C")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--read-layers", default=None,
                   help="L* of the steering heads, e.g. 1,2 (default: the second quarter to the third of the decoder)")
    p.add_argument("--k", type=int, default=20, help="heads per head set (the random control draws this many)")
    p.add_argument("--seed", type=int, default=0, help="the control's heads are headset.random_heads(seed + 1)")
    p.add_argument("--rows", default="A,B,C,D,S", help="which rows to run")
    p.add_argument("--heads-layers", type=int, default=2, help="decoder (and encoder) layers of the model for row D")
    p.add_argument("--heads-tokens", type=int, default=256, help="answer length in row D")
    p.add_argument("--quick", action="store_true", help="tiny widths: checks the script runs")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args()


# -- model, tokenizer, prompt ----------------------------------------------------------------------

def tiny_processor(vocab_size: int, folder: Path) -> Processor:
    """mlx_listen_convert.reference.tiny's byte-level tokenizer (1 byte = 1 token, the six specials at 256-261),
    its vocab padded with decodable filler entries up to `vocab_size`."""
    from mlx_lm.utils import load_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from mlx_listen_convert.reference.tiny import SPECIALS

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for t in SPECIALS:
        vocab[t] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"t{i}"] = i
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                                               "audio_eos_token": "<|audio_eos|>"})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    tok.save_pretrained(folder)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    return Processor(load_tokenizer(folder, eos_token_ids=eos))


def build_model(a, layers: int, encoder_layers: int, audio_token: int) -> Model:
    if a.quick:
        text = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
        audio = dict(d_model=128, encoder_attention_heads=2, encoder_ffn_dim=512)
    else:  # real Qwen2-Audio-7B widths and head layout; depth and vocab cut
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        audio = dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120)
    cfg = {"model_type": "qwen2_audio", "audio_token_index": audio_token,
           "audio_config": dict(audio, encoder_layers=encoder_layers, num_mel_bins=128),
           "text_config": dict(text, num_hidden_layers=layers, vocab_size=a.vocab, rms_norm_eps=1e-5,
                               rope_theta=10000.0, tie_word_embeddings=False)}
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(cfg))
    model.set_dtype(DTYPES[a.dtype])
    mx.eval(model.parameters())
    return model


def clip(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


# -- counting rows through the decoder ------------------------------------------------------------

class Rows:
    """Rows through each decoder layer, split into prompt positions and generated ones. Installed
    on the layer class (not as a hook), so it also sees the silence pass, which runs with every
    hook suspended. Costs a few integer additions per layer call."""

    def __init__(self):
        self.n_prompt = 0
        self.reset()
        orig, rows = DecoderLayer.__call__, self

        def counted(layer, x, mask=None, cache=None, offset=0):
            B, L = x.shape[0], x.shape[1]
            p = max(0, min(offset + L, rows.n_prompt) - offset)
            rows.prompt[layer.index] += B * p
            rows.gen[layer.index] += B * (L - p)
            return orig(layer, x, mask, cache, offset)

        DecoderLayer.__call__ = counted

    def reset(self):
        self.prompt, self.gen = defaultdict(int), defaultdict(int)

    def snapshot(self, n_layers: int) -> dict:
        return {"layer0": self.prompt[0], "equiv": sum(self.prompt.values()) / n_layers, "decode_rows": self.gen[0]}


def measure(fn, rows: Rows, n_layers: int):
    """CPU seconds of this process (`cpu`, every thread: the work, what the ratios use; on a shared
    machine wall time also counts the other jobs), wall seconds (`s`), the result, rows through the
    decoder and peak memory (GB) of fn()."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    rows.reset()
    tic, cpu = time.perf_counter(), time.process_time()
    out = fn()
    mx.synchronize()
    t, c = time.perf_counter() - tic, time.process_time() - cpu
    return {"cpu": c, "s": t, "out": out, **rows.snapshot(n_layers), "peak_gb": mx.get_peak_memory() / 1e9}


def share_silence(answerers, silence: Silence):
    """Give every answerer one Silence (its encodings per clip length and its prefix KV caches): the
    steady state of a run, where both are warm after the first item of that clip length."""
    for a in answerers:
        a.silence = silence
        for st in a.steerers.values():
            st.silence = silence


# -- rows A-C -----------------------------------------------------------------------------------------

def steer_cfg(read, alpha, heads=None):
    return SteerConfig(layers=sorted({l for l, _ in heads}) if heads else list(read), alpha=alpha,
                       heads=list(heads) if heads else [(l, 0) for l in read])


def bench_conditions(a, model, processor, rows: Rows, read, control) -> dict:
    n_layers, N = model.n_layers, a.tokens
    mk = lambda conds: Answerer(model, processor, conds, max_tokens=N)  # noqa: E731
    variants = {"A": mk([baseline()])}
    want_b, want_c = "B" in a.row_set, "C" in a.row_set
    alone = [1.0] if want_b and not want_c else list(ALPHAS) if want_c else []
    for al in alone:
        variants[f"alone alpha={al:g}"] = mk([steered(steer_cfg(read, al), "steered")])
    if want_c:
        variants["alone control"] = mk([steered(steer_cfg(read, 1.0, control), "steered")])
    if want_b:
        variants["B one call"] = mk([baseline(), steered(steer_cfg(read, 1.0), "steered")])
    if want_c:
        variants["C one call"] = mk([baseline()] + [steered(steer_cfg(read, al), f"alpha={al:g}") for al in ALPHAS]
                                    + [steered(steer_cfg(read, 1.0, control), "alpha=1-random0")])
    audio = clip(a.clip_seconds)
    prompt = prepare(model, processor, [audio], QUESTION)
    rows.n_prompt = len(prompt.ids)
    tic = time.perf_counter()
    variants["A"].silence.features(prompt.clips[0].n_frames)
    silence_encode_s = time.perf_counter() - tic
    share_silence(variants.values(), variants["A"].silence)
    other = prepare(model, processor, [audio], "Which animal is it: a dog, a cat or a cow?")
    variants["A"].silence.residuals(other, sorted(set(read) | {l for l, _ in control}))  # the store, warm

    warm = prepare(model, processor, [clip(1.0)], QUESTION)  # warm-up: first-call allocations, cheap
    rows.n_prompt = len(warm.ids)
    paths = [n for n in ("A", "alone alpha=1", "alone control", "B one call", "C one call") if n in variants]
    for n in paths:  # one answerer per code path (plain, steered alone, batched)
        Answerer(model, processor, variants[n].conditions, max_tokens=2)(warm)

    names = list(variants)
    res = {n: [] for n in names}
    prep = []
    for trial in range(a.trials):
        cpu = time.process_time()
        prompt = prepare(model, processor, [audio], QUESTION)  # the item's own work: log-mel, encoder, embed
        mx.eval(prompt.embeddings)
        prep.append(time.process_time() - cpu)
        rows.n_prompt = len(prompt.ids)
        for n in (names if trial % 2 == 0 else names[::-1]):
            m = measure(lambda: variants[n](prompt), rows, n_layers)
            m["timing"] = {c: ans.timing for c, ans in m["out"].items()}
            m["tokens"] = {c: ans.tokens for c, ans in m["out"].items()}
            del m["out"]
            res[n].append(m)
            print(f"  trial {trial}: {n:<16} cpu {m['cpu']:7.1f} s  wall {m['s']:7.1f} s  prompt rows {m['layer0']:>5} "
                  f"(full-depth {m['equiv']:7.1f})  decode rows {m['decode_rows']:>4}  peak {m['peak_gb']:.2f} GB",
                  flush=True)
    return summarise(a, res, prep, prompt, silence_encode_s, read, control)


def summarise(a, res, prep, prompt, silence_encode_s, read, control) -> dict:
    trials = range(a.trials)
    t = {n: [r["cpu"] for r in rs] for n, rs in res.items()}
    w = {n: [r["s"] for r in rs] for n, rs in res.items()}
    med = lambda xs: statistics.median(xs)  # noqa: E731
    A, Aw = t["A"], w["A"]
    out = {"prompt_tokens": len(prompt.ids), "audio_tokens": prompt.n_audio_tokens, "tokens": a.tokens,
           "prepare_cpu_s": med(prep), "silence_encode_s": silence_encode_s, "read_layers": list(read),
           "control_heads": [list(h) for h in control], "control_layers": sorted({l for l, _ in control}),
           "variants": {}}

    def row(name, times, parts, n_answers):
        r0 = [res[p][0] for p in parts]
        wall = [sum(w[p][i] for p in parts) for i in trials]
        ratio = [times[i] / A[i] for i in trials]
        ratio_item = [(times[i] + prep[i]) / (A[i] + prep[i]) for i in trials]
        out["variants"][name] = {
            "cpu_s": med(times), "ratio_to_A": med(ratio), "ratio_to_A_with_prepare": med(ratio_item),
            "wall_s": med(wall), "wall_ratio_to_A": med([wall[i] / Aw[i] for i in trials]),
            "answers": n_answers, "prompt_rows_layer0": sum(r["layer0"] for r in r0),
            "prompt_rows_full_depth": sum(r["equiv"] for r in r0), "decode_rows": sum(r["decode_rows"] for r in r0),
            "peak_gb": max(max(x["peak_gb"] for x in res[p]) for p in parts),
            "timing": {p: res[p][-1]["timing"] for p in parts}, "per_trial_cpu_s": times, "per_trial_wall_s": wall,
        }

    row("A: one plain answer", A, ["A"], 1)
    if "B one call" in res:
        old = [A[i] + t["alone alpha=1"][i] for i in trials]
        row("B: eval --compare, one Answerer", t["B one call"], ["B one call"], 2)
        row("B: old way, an answer per condition", old, ["A", "alone alpha=1"], 2)
        same = res["B one call"][0]["tokens"]["steered"] == res["alone alpha=1"][0]["tokens"]["steered"] and \
            res["B one call"][0]["tokens"]["base"] == res["A"][0]["tokens"]["base"]
        out["B_same_tokens"] = same
        out["B_speedup"] = med([old[i] / t["B one call"][i] for i in trials])
    if "C one call" in res:
        parts = ["A"] + [f"alone alpha={al:g}" for al in ALPHAS] + ["alone control"]
        old = [sum(t[p][i] for p in parts) for i in trials]
        row("C: sweep (base + 5 α + control), one Answerer", t["C one call"], ["C one call"], 7)
        row("C: old way, an answer per condition", old, parts, 7)
        got = res["C one call"][0]["tokens"]
        ref = {"base": res["A"][0]["tokens"]["base"], "alpha=1-random0": res["alone control"][0]["tokens"]["steered"],
               **{f"alpha={al:g}": res[f"alone alpha={al:g}"][0]["tokens"]["steered"] for al in ALPHAS}}
        out["C_same_tokens"] = {k: got[k] == v for k, v in ref.items()}
        out["C_speedup"] = med([old[i] / t["C one call"][i] for i in trials])
    for n in ("alone alpha=1", "alone control"):
        if n in res:
            row(f"({n.replace('alone', 'steered answer alone,')})", t[n], [n], 1)
    return out


def previous_pass(model, prompt, layers) -> dict:
    """The silence pass before the prefix cache: the whole silent prompt through blocks 0..max(L*)."""
    layers = sorted(set(layers))
    T = prompt.last
    with model.hooks.suspended(), Capture(model, [RESID.format(l) for l in layers], at=T) as cap:
        model.blocks(prompt.embeddings[None], n_layers=max(layers) + 1)
        out = {l: cap.resid(l, T).astype(mx.float32) for l in layers}
        mx.eval(out)
    return out


# -- row S: the silence pass alone ---------------------------------------------------------------------

def bench_silence(a, model, processor, rows: Rows, read, control) -> dict:
    """The silence pass three ways, with a plain answer timed in the same trials for ratios:
    the previous library pass (`previous_pass`: the whole silent prompt), the library's
    `Silence.residuals` on a prefix miss (the first item of a clip length: the prefix computed, rows
    before T into the cache only, T alone) and on a hit (every later item of that length: only
    the question's text after the audio)."""
    n_layers = model.n_layers
    union = sorted(set(read) | {l for l, _ in control})
    audio = clip(a.clip_seconds)
    plain = Answerer(model, processor, [baseline()], max_tokens=a.tokens)
    silence = plain.silence
    miss = Silence(model, prefix_size=0)  # keeps no prefix: every call is a miss
    miss._features = silence._features
    prompt = prepare(model, processor, [audio], QUESTION)
    other = prepare(model, processor, [audio], "Which animal is it: a dog, a cat or a cow?")
    warm = prepare(model, processor, [clip(1.0)], QUESTION)
    rows.n_prompt = len(warm.ids)
    plain(warm), silence.residuals(warm, union), miss.residuals(warm, union)
    rows.n_prompt = len(prompt.ids)
    silence.residuals(other, union)  # the store holds this clip length (another question)
    old = lambda layers: previous_pass(model, silence.prompt(prompt), layers)  # noqa: E731
    variants = {"A: one plain answer": lambda: plain(prompt),
                "previous pass (whole silent prompt), L*": lambda: old(read),
                "library, prefix miss, L*": lambda: miss.residuals(prompt, read),
                "library, prefix hit, L*": lambda: silence.residuals(prompt, read),
                "previous pass (whole silent prompt), union with control": lambda: old(union),
                "library, prefix miss, union with control": lambda: miss.residuals(prompt, union),
                "library, prefix hit, union with control": lambda: silence.residuals(prompt, union)}
    res = {n: [] for n in variants}
    outs = {}
    for trial in range(a.trials):
        for n in (list(variants) if trial % 2 == 0 else list(variants)[::-1]):
            m = measure(variants[n], rows, n_layers)
            outs[n] = m.pop("out")
            res[n].append(m)
            print(f"  silence trial {trial}: {n:<56} cpu {m['cpu']:7.1f} s  wall {m['s']:7.1f} s  prompt rows "
                  f"{m['layer0']:>4} (full-depth {m['equiv']:6.1f})", flush=True)
    A = [m["cpu"] for m in res["A: one plain answer"]]
    out = {"read_layers": list(read), "union_layers": union, "prompt_tokens": len(prompt.ids),
           "suffix_tokens": len(prompt.ids) - int(prompt.audio_positions.max()) - 1, "variants": {}}
    for n, ms in res.items():
        t = [m["cpu"] for m in ms]
        out["variants"][n] = {"cpu_s": statistics.median(t), "wall_s": statistics.median(m["s"] for m in ms),
                              "ratio_to_A": statistics.median(x / y for x, y in zip(t, A)),
                              "rows_layer0": ms[0]["layer0"], "rows_full_depth": ms[0]["equiv"]}
    for which, layers in (("L*", read), ("union with control", union)):
        ref = outs[f"previous pass (whole silent prompt), {which}"]
        for kind in ("prefix miss", "prefix hit"):
            got, v = outs[f"library, {kind}, {which}"], out["variants"][f"library, {kind}, {which}"]
            v["max_abs_diff"] = max(float(mx.abs(ref[l] - got[l]).max()) for l in layers)
            v["max_rel_diff"] = max(float(mx.abs(ref[l] - got[l]).max() / mx.abs(ref[l]).max()) for l in layers)
    return out


# -- row D ----------------------------------------------------------------------------------------------

def bench_heads(a, model, processor, rows: Rows) -> dict:
    n_layers, N = model.n_layers, a.heads_tokens
    n_heads = model.n_heads
    hs = HeadSet(random_heads(n_layers, n_heads, min(a.k, n_layers * n_heads), a.seed))
    prompt = prepare(model, processor, [clip(a.clip_seconds)], QUESTION)
    warm = prepare(model, processor, [clip(1.0)], QUESTION)
    variants = {
        "Answerer([baseline()]) (plain)": lambda p, n: Answerer(model, processor, [baseline()], max_tokens=n)(p)["base"],
        "Answerer(audio_mass=True) (heads pass)":
            lambda p, n: Answerer(model, processor, [baseline()], max_tokens=n, audio_mass=True)(p)["base"],
        "Answerer(listen_heads=…) (eval, listening per token)":
            lambda p, n: Answerer(model, processor, [baseline()], max_tokens=n, listen_heads=hs.heads)(p)["base"],
        "generate.generate (mlx-lm, plain)": lambda p, n: generate(model, processor, p, max_tokens=n),
        "ask(heads=…) (capture at every answer token)":
            lambda p, n: ask(model, processor, [], QUESTION, prompt=p, heads=hs, max_tokens=n),
    }
    for fn in variants.values():
        rows.n_prompt = len(warm.ids)
        fn(warm, 2)
    rows.n_prompt = len(prompt.ids)
    out = {"layers": n_layers, "tokens": N, "prompt_tokens": len(prompt.ids), "heads": [list(h) for h in hs.heads],
           "variants": {}}
    for name, fn in variants.items():
        m = measure(lambda: fn(prompt, N), rows, n_layers)
        ans = m.pop("out")
        m["generated"] = len(ans.tokens)
        m["finish_reason"] = ans.finish_reason
        m["tokens_head"] = ans.tokens[:8]
        out["variants"][name] = m
        print(f"  heads: {name:<52} cpu {m['cpu']:7.1f} s  wall {m['s']:7.1f} s  {m['generated']} tokens ({ans.finish_reason})  "
              f"peak {m['peak_gb'] * 1e3:.1f} MB", flush=True)
    v = out["variants"]
    plain, gen = v["Answerer([baseline()]) (plain)"], v["generate.generate (mlx-lm, plain)"]
    for name, m in v.items():
        ref = gen if name.startswith(("ask", "generate")) else plain
        m["peak_ratio"] = m["peak_gb"] / ref["peak_gb"]
        m["peak_extra_mb"] = (m["peak_gb"] - ref["peak_gb"]) * 1e3
        m["time_ratio"] = m["cpu"] / ref["cpu"]
    return out


# -- report ---------------------------------------------------------------------------------------------

def table(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['dtype']}, decoder {c['layers']} layers, encoder {c['encoder_layers']} layers, vocab {c['vocab']} "
             f"(tiny byte-level tokenizer, padded); {r['machine']}"]
    if "conditions" in r:
        s = r["conditions"]
        lines += [f"\nRows A–C: {s['prompt_tokens']}-token prompt ({s['audio_tokens']} audio tokens, "
                  f"{c['clip_seconds']:g} s clip), {s['tokens']} greedy tokens per answer, medians of {c['trials']} "
                  f"trials; L* = {s['read_layers']}, control layers {s['control_layers']} "
                  f"({len(s['control_heads'])} random heads); prepare (log-mel + encoder + embed) "
                  f"{s['prepare_cpu_s']:.1f} CPU s per item, not in the times below; ratios of CPU time\n",
                  "| variant | answers | CPU time | ratio to A | ratio to A, with prepare | wall time (ratio) | "
                  "decoder prompt rows (layer 0) | full-depth equiv. | decode rows | peak memory |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, v in s["variants"].items():
            lines.append(f"| {n} | {v['answers']} | {v['cpu_s']:.1f} s | {v['ratio_to_A']:.2f}× | "
                         f"{v['ratio_to_A_with_prepare']:.2f}× | {v['wall_s']:.0f} s ({v['wall_ratio_to_A']:.2f}×) | "
                         f"{v['prompt_rows_layer0']} | "
                         f"{v['prompt_rows_full_depth']:.0f} | {v['decode_rows']} | {v['peak_gb']:.3f} GB |")
        lines.append("")
        if "B_speedup" in s:
            lines.append(f"B: one call is {s['B_speedup']:.2f}× faster than the old way; same tokens as each "
                         f"condition alone: {s['B_same_tokens']}")
        if "C_speedup" in s:
            same = s["C_same_tokens"]
            lines.append(f"C: one call is {s['C_speedup']:.2f}× faster than the old way; same tokens as each "
                         f"condition alone: {all(same.values())}"
                         + ("" if all(same.values()) else f" ({', '.join(k for k, ok in same.items() if not ok)} differ)"))
        lines.append("\nWhere the time goes (wall seconds of the last trial, Answer.timing):\n")
        lines.append("| variant | prefill | silence pass | decode (batch) |\n|---|---|---|---|")
        for n, v in s["variants"].items():
            if "old way" in n:
                continue
            for p, tm in v["timing"].items():
                t0 = next(iter(tm.values()))
                lines.append(f"| {n} | {t0['prefill']:.1f} | {t0['silence']:.1f} | {t0['decode']:.1f} "
                             f"({t0['batch']} row{'s' if t0['batch'] > 1 else ''}, "
                             f"{t0['decode'] / max(s['tokens'], 1) * 1e3:.0f} ms/token) |")
        lines.append(f"\nSilence encoding of the clip's length (once per length, cached): {s['silence_encode_s']:.1f} s")
    if "silence" in r:
        z = r["silence"]
        lines += [f"\nRow S: the silence pass alone, {z['prompt_tokens']}-token prompt ({z['suffix_tokens']} after the "
                  f"audio run), L* = {z['read_layers']}, union with the control {z['union_layers']}; medians of "
                  f"{c['trials']} trials; diffs against the previous pass\n",
                  "| silence pass | CPU time | ratio to A | prompt rows (layer 0) | full-depth equiv. | max abs diff (rel.) |",
                  "|---|---|---|---|---|---|"]
        for n, v in z["variants"].items():
            d = f"{v['max_abs_diff']:.1e} ({v['max_rel_diff']:.1e})" if "max_abs_diff" in v else ""
            lines.append(f"| {n} | {v['cpu_s']:.1f} s | {v['ratio_to_A']:.3f}× | {v['rows_layer0']} | "
                         f"{v['rows_full_depth']:.0f} | {d} |")
    if "heads" in r:
        h = r["heads"]
        lines += [f"\nRow D: decoder {h['layers']} layers, {h['prompt_tokens']}-token prompt, answers of "
                  f"{h['tokens']} tokens, {len(h['heads'])} heads; one run each\n",
                  "| variant | tokens generated | CPU time | ratio | peak memory | vs plain | extra |",
                  "|---|---|---|---|---|---|---|"]
        for n, v in h["variants"].items():
            lines.append(f"| {n} | {v['generated']} ({v['finish_reason']}) | {v['cpu']:.1f} s | {v['time_ratio']:.3f}× | "
                         f"{v['peak_gb'] * 1e3:.1f} MB | {v['peak_ratio']:.4f}× | {v['peak_extra_mb']:+.1f} MB |")
        lines.append("\n(ratios: the Answerer rows against the plain Answerer, ask against generate.generate)")
    return "\n".join(lines)


def main():
    a = parse_args()
    a.row_set = set(a.rows.split(","))
    if a.quick:
        a.layers, a.encoder_layers, a.vocab, a.trials = 2, 1, 1024, 1
        a.tokens, a.heads_tokens, a.heads_layers, a.clip_seconds = 4, 12, 2, 2.0
    read = [int(x) for x in a.read_layers.split(",")] if a.read_layers else \
        list(range(a.layers // 4, max(a.layers // 4 + 1, (3 * a.layers) // 4)))
    res = {"config": {k: v for k, v in vars(a).items() if k not in ("json", "row_set")},
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__} {mx.default_device()}, "
                      f"load average {os.getloadavg()[0]:.1f} at start"}
    rows = Rows()
    with tempfile.TemporaryDirectory() as tmp:
        processor = tiny_processor(a.vocab, Path(tmp))
    audio_token = processor.audio_token_id
    if {"A", "B", "C", "S"} & a.row_set:
        model = build_model(a, a.layers, a.encoder_layers, audio_token)
        heads = model.n_heads
        # a uniform draw spread over the decoder (what sweep.py drew before its layer-matched controls)
        control = random_heads(a.layers, heads, min(a.k, a.layers * heads), a.seed + 1)
        if {"A", "B", "C"} & a.row_set:
            res["conditions"] = bench_conditions(a, model, processor, rows, read, control)
        if "S" in a.row_set:
            res["silence"] = bench_silence(a, model, processor, rows, read, control)
        del model
        gc.collect()
        mx.clear_cache()
    if "D" in a.row_set:
        model = build_model(a, a.heads_layers, a.heads_layers, audio_token)
        res["heads"] = bench_heads(a, model, processor, rows)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=float))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
