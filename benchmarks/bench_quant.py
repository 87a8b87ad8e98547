"""Every quantisation of `mlx-listen convert` on a random full-width Qwen2-Audio: conversion peak RSS and
time, size on disk, bits per weight per part, and decode speed of our model against mlx-lm's `qwen2`
holding the identical quantised decoder arrays, in one run (ratios).

1. Builds a random float checkpoint (bf16) with the real widths and head layout of Qwen2-Audio-7B
   (decoder hidden 4096, 32 heads, intermediate 11008; tower d_model 1280, 20 heads, ffn 5120), cut in
   depth and vocab (`--layers`, `--encoder-layers`, `--vocab`) so that a 2-core CPU box finishes in
   minutes: a full 7B decodes at well under 1 tok/s on the Linux CPU backend (reference BLAS).
2. Converts it once per mode, each in a child process; the child's peak RSS comes from `os.wait4`.
3. Loads each output, builds mlx-lm's `qwen2.Model`, quantises it with the folder's own per-path
   settings (as mlx-lm's loader would) and loads our decoder's arrays into it with a strict name check;
   then greedy decode, token by token, the two models alternating; the ratio is the median of paired
   step times (ours / theirs as speeds). The two must produce the same tokens.

    python benchmarks/bench_quant.py                      # all modes, 4 layers: ~15 min on 2 cores
    python benchmarks/bench_quant.py --layers 1 --modes affine4,mxfp4 --tokens 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "affine8": dict(q_bits=8), "affine6": dict(q_bits=6), "affine5": dict(q_bits=5), "affine4": dict(),
    "affine3": dict(q_bits=3), "affine2": dict(q_bits=2), "mxfp8": dict(q_mode="mxfp8"),
    "mxfp4": dict(q_mode="mxfp4"), "nvfp4": dict(q_mode="nvfp4"), "mixed_4_6": dict(quant_predicate="mixed_4_6"),
    "mixed_3_6": dict(quant_predicate="mixed_3_6"), "mixed_2_6": dict(quant_predicate="mixed_2_6"),
    "affine4+tower": dict(quantize_audio_tower=True),
}
CHILD = """
import json, sys, time
from mlx_listen_convert.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], quantize=True, **json.loads(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--encoder-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=12, help="decode steps per model and mode")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=None, help="work folder (default: a temp folder, deleted)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def build(a, folder: Path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_listen.models.qwen2_audio import Model, ModelConfig

    cfg = {
        "model_type": "qwen2_audio", "audio_token_index": a.vocab - 1, "dtype": "bfloat16",
        "audio_config": dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120,
                             encoder_layers=a.encoder_layers, num_mel_bins=128, max_source_positions=1500),
        "text_config": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                            num_hidden_layers=a.layers, vocab_size=a.vocab, rms_norm_eps=1e-5, rope_theta=10000.0,
                            tie_word_embeddings=False),
    }
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    folder.mkdir(parents=True)
    w = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), w, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return sum(v.size for v in w.values())


def convert_child(src: Path, dst: Path, kw: dict) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(kw)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"conversion failed: {err.strip().splitlines()[-1]}")
    r = json.loads(out.strip().splitlines()[-1])
    m = re.search(r"Bits per weight: (.*)$", err, re.M)
    r["bits"] = dict((k.strip(), float(v)) for k, v in (x.rsplit(" ", 1) for x in m.group(1).split(", ")))
    r["total_bits"] = float(re.search(r"with (\S+) bits per weight", err).group(1))
    r["size_gb"] = sum(f.stat().st_size for f in dst.iterdir()) / 1e9
    return r


def peak_rss_child(src: Path, dst: Path, kw: dict) -> dict:
    """Run the conversion as a child and read its peak RSS from wait4 (ru_maxrss, KB on Linux)."""
    pid = os.fork()
    if pid == 0:  # a small forked child that execs the converter: its own fresh high-water mark
        os.execv(sys.executable, [sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(kw)])
    t = time.perf_counter()
    _, status, usage = os.wait4(pid, 0)
    if status:
        raise SystemExit(f"conversion {kw} failed ({status})")
    return {"seconds": time.perf_counter() - t, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def twin(model, config):
    """mlx-lm's qwen2 with the same quantised arrays: quantised by the folder's settings, loaded strictly."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    t = model.text_config
    lm = qwen2.Model(qwen2.ModelArgs(
        model_type="qwen2", hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        intermediate_size=t.intermediate_size, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, vocab_size=t.vocab_size,
        rope_theta=t.rope_theta, tie_word_embeddings=False))
    q = config["quantization"]
    ours = dict(tree_flatten(model.language_model.parameters()))

    def pred(p, m):
        if f"language_model.{p}" in q:
            return q[f"language_model.{p}"]
        return f"{p}.scales" in ours

    nn.quantize(lm, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"), class_predicate=pred)
    lm.load_weights(list(ours.items()), strict=True)
    return lm


def decode(lms: dict, n: int) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    state, times, toks = {}, {k: [] for k in lms}, {k: [] for k in lms}
    for k, lm in lms.items():
        cache = make_prompt_cache(lm)
        y = lm(prompt, cache)[:, -1].argmax(-1)
        mx.eval(y)
        state[k] = (cache, y)
    names = list(lms)
    for i in range(n):
        for k in names if i % 2 == 0 else names[::-1]:
            cache, y = state[k]
            tic = time.perf_counter()
            y = lms[k](y[None], cache)[:, -1].argmax(-1)
            mx.eval(y)
            if i:  # the first step warms up
                times[k].append(time.perf_counter() - tic)
            toks[k].append(y.item())
            state[k] = (cache, y)
    a, b = names
    return {"ours_tok_s": 1 / statistics.median(times[a]), "mlx_lm_tok_s": 1 / statistics.median(times[b]),
            "ratio": statistics.median(tb / ta for ta, tb in zip(times[a], times[b])),
            "same_tokens": toks[a] == toks[b]}


def main():
    a = parse_args()
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench-quant-"))
    src = root / "src"
    params = build(a, src) if not src.exists() else None
    src_gb = sum(f.stat().st_size for f in src.iterdir()) / 1e9
    print(f"source: {src} ({src_gb:.2f} GB bf16, {params or 0:,} parameters)", flush=True)
    rows = {}
    try:
        for name in a.modes.split(","):
            kw = MODES[name]
            dst = root / name
            shutil.rmtree(dst, ignore_errors=True)
            r = peak_rss_child(src, dst, kw)
            shutil.rmtree(dst)
            r.update({k: v for k, v in convert_child(src, dst, kw).items() if k != "seconds"})
            from mlx_listen.load import load_model

            model, config = load_model(dst)
            r.update(decode({"ours": model, "mlx_lm": twin(model, config)}, a.tokens))
            rows[name] = r
            print(f"{name}: {json.dumps(r)}", flush=True)
            del model
            shutil.rmtree(dst)
    finally:
        if not a.out:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows, a, src_gb))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


def table(rows: dict, a, src_gb: float) -> str:
    lines = [f"Decoder {a.layers} layers x 4096 wide, vocab {a.vocab}; tower {a.encoder_layers} layers x 1280; "
             f"source {src_gb:.2f} GB bf16",
             "| mode | convert s | peak RSS GB | size GB | bpw tower / projector / LM | ours tok/s | mlx-lm tok/s "
             "| ratio | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        b = r["bits"]
        lines.append(f"| {n} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['size_gb']:.2f} | "
                     f"{b.get('audio tower', 0):.2f} / {b.get('projector', 0):.2f} / {b.get('language model', 0):.2f} | "
                     f"{r['ours_tok_s']:.2f} | {r['mlx_lm_tok_s']:.2f} | {r['ratio']:.3f} | {r['same_tokens']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
