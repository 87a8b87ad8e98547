"""Benchmark each family (Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni) on random weights: decoder vs mlx-lm,
encoder work against clip length, and how much of a long file each front end reads.

Every model is built from a config dict with random weights at the family's real widths (decoder hidden
4096 / 3584, the 1280-wide Whisper-style encoder) and few layers, so it fits a small machine. Numbers are
MLX against MLX only, as ratios in one run: absolute times depend on the backend and BLAS, not on this code.

1. **Decoder** (per family): prefill and greedy decode tok/s of our model and of `mlx_lm.models.qwen2.Model`
   holding the very same decoder arrays (strict load), on a prompt with a 10 s clip's audio tokens;
   interleaved as `bench_model.py` does (prefills back to back, decode token by token), median paired
   ratio; logits and greedy tokens compared.
2. **Encoder** (per family, per clip length): what `ask` runs for a clip (`model.front_end.features` +
   `model.encode`, both evaluated): wall and CPU seconds, seconds per second of audio, and peak MLX memory
   (`mx.get_peak_memory` after `mx.reset_peak_memory`; above the weights, and in all). Clip lengths: 10 and
   30 s (Qwen2-Audio's limit), plus 120 and 600 s (AF3) / 300 s (Omni). Where transformers pads and we
   do not, the padded work is timed beside ours on the 10 s clip and the outputs compared: Qwen2-Audio's
   tower over its 30 s window, AF3's tower over each 30 s window, Omni's spectrogram over its 300 s.
3. **Long files**: each family's `front_end.load` + `features` on 3 h files (16 kHz mono and 44.1 kHz
   stereo), one fresh process per cell: wall time and growth of peak RSS, against what the family uses.

    python benchmarks/bench_families.py                 # ~35 min on a 2-core CPU
    python benchmarks/bench_families.py --quick         # tiny widths, < 1 min: checks the script runs
    python benchmarks/bench_families.py --parts encoder --families audioflamingo3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import bench_decoders  # noqa: E402  (the same interleaved A/B as bench_model.py)

from mlx_listen import models  # noqa: E402
from mlx_listen.mel import HOP_LENGTH, SAMPLE_RATE, _spectrogram, pad_or_trim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_audio", "audioflamingo3", "qwen2_5_omni")
LENGTHS = {"qwen2_audio": (10, 30), "audioflamingo3": (10, 30, 120, 600), "qwen2_5_omni": (10, 30, 120, 300)}
PARTS = ("decoder", "encoder", "load")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (real: 32 / 28)")
    p.add_argument("--encoder-layers", type=int, default=1, help="encoder layers (real: 32)")
    p.add_argument("--encoder-width", type=int, default=1280,
                   help="encoder d_model (real: 1280; ffn 4x, 20 heads kept) for a cheaper length sweep")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size (real: ~152k)")
    p.add_argument("--trials", type=int, default=3, help="timed generation runs per model")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--encoder-trials", type=int, default=1, help="timed runs per clip length (median)")
    p.add_argument("--hours", type=float, default=3.0, help="length of the long files (part 'load')")
    p.add_argument("--quick", action="store_true", help="tiny widths and a short file: checks the script runs")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return p.parse_args()


# -- models ----------------------------------------------------------------------------------------
def config(family: str, a) -> dict:
    """The family's config.json dict: real widths (Qwen2-Audio-7B; AF3 and Omni-7B: Qwen2-7B's decoder
    with GQA 28/4), `a.layers` decoder and `a.encoder_layers` encoder layers, vocab `a.vocab`."""
    if a.quick:
        dec = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=4 if family == "qwen2_audio" else 2)
        enc = dict(d_model=128, encoder_attention_heads=2, encoder_ffn_dim=512)
    elif family == "qwen2_audio":
        dec = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        enc = dict(d_model=a.encoder_width, encoder_attention_heads=20, encoder_ffn_dim=4 * a.encoder_width)
    else:
        dec = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
        enc = dict(d_model=a.encoder_width, encoder_attention_heads=20, encoder_ffn_dim=4 * a.encoder_width)
    text = dict(dec, num_hidden_layers=a.layers, vocab_size=a.vocab, tie_word_embeddings=False)
    audio_token = a.vocab - 1
    if family == "qwen2_audio":
        return {"model_type": family, "audio_token_index": audio_token,
                "audio_config": dict(enc, encoder_layers=a.encoder_layers, num_mel_bins=128),
                "text_config": dict(text, rms_norm_eps=1e-5, rope_theta=10000.0)}
    if family == "audioflamingo3":  # transformers-5 names in audio_config, as the hub's
        audio = dict(hidden_size=enc["d_model"], num_attention_heads=enc["encoder_attention_heads"],
                     intermediate_size=enc["encoder_ffn_dim"], num_hidden_layers=a.encoder_layers,
                     num_mel_bins=128, max_source_positions=1500)
        return {"model_type": family, "audio_token_id": audio_token, "audio_config": audio,
                "text_config": dict(text, rms_norm_eps=1e-6, rope_theta=1000000.0)}
    head_dim = dec["hidden_size"] // dec["num_attention_heads"]
    section = [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 2 - head_dim // 8 - head_dim // 8 * 3 // 2]
    text = dict(text, rms_norm_eps=1e-6, rope_theta=1000000.0,
                rope_scaling={"mrope_section": section, "type": "default", "rope_type": "default"})
    return {"model_type": family, "thinker_config": {
        "audio_token_index": audio_token, "text_config": text,
        "audio_config": dict(enc, encoder_layers=a.encoder_layers, num_mel_bins=128, n_window=100,
                             output_dim=dec["hidden_size"], max_source_positions=1500)}}


def build(family: str, a):
    cfg = config(family, a)
    Model, ModelConfig = models.classes(cfg)
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(cfg))
    model.set_dtype(DTYPES[a.dtype])  # init is lazy: only the cast weights get materialised
    mx.eval(model.parameters())
    return model


def mlx_lm_twin(model) -> qwen2.Model:
    """mlx-lm's qwen2 holding the same decoder arrays (shared, not copied); strict load checks the names."""
    twin = qwen2.Model(model.text_config.mlx_lm_args())
    twin.load_weights(tree_flatten(model.language_model.parameters()), strict=True)
    return twin


def clip(seconds: float) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# -- 1. decoder ----------------------------------------------------------------------------------
def bench_decoder(model, a) -> dict:
    """~290 positions: 20 text tokens, a 10 s clip's audio tokens (through the family's front end and
    encoder), 20 text tokens; then bench_model's interleaved A/B against mlx-lm's qwen2."""
    f = model.front_end.features(clip(10.0), "clip")
    audio = model.encode(f)[1]
    text = np.random.default_rng(1).integers(0, model.vocab_size - 1, 40)
    ids = np.concatenate([text[:20], np.full(f.n_tokens, model.audio_token_id), text[20:]])
    emb = model.embed(ids, [audio])
    mx.eval(emb)
    twin = mlx_lm_twin(model)
    n = min(32, len(ids))  # full logits on a prefix: embeddings, every layer and the head
    la, lb = model(None, input_embeddings=emb[None, :n]), twin(None, input_embeddings=emb[None, :n])
    res = {"prompt_tokens": len(ids),
           "logits_max_abs_diff": mx.abs(la.astype(mx.float32) - lb.astype(mx.float32)).max().item()}
    res.update(bench_decoders({"ours": model, "mlx_lm": twin}, emb, a.trials, a.decode_tokens))
    return res


# -- 2. encoder ------------------------------------------------------------------------------------
def run_encoder(model, audio: np.ndarray) -> tuple[dict, mx.array]:
    """`ask`'s path for one clip: front end, then encoder + projector; times and peak memory."""
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.synchronize()
    w, c = time.perf_counter(), time.process_time()
    f = model.front_end.features(audio, "clip")
    mx.eval(f.mel)
    fe_wall, fe_cpu = time.perf_counter() - w, time.process_time() - c
    enc, tok = model.encode(f)
    mx.eval(enc, tok)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    peak = mx.get_peak_memory()
    return {"wall_s": wall, "cpu_s": cpu, "front_end_wall_s": fe_wall, "front_end_cpu_s": fe_cpu,
            "peak_gb": peak / 1e9, "peak_above_weights_gb": (peak - base) / 1e9, "n_tokens": f.n_tokens,
            "n_frames": f.n_frames, "pieces": len(f.pieces())}, tok


def run_padded(model, audio: np.ndarray) -> tuple[dict, mx.array]:
    """The same clip the way transformers pads it, where it pads and we do not (see the module docstring)."""
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.synchronize()
    w, c = time.perf_counter(), time.process_time()
    front = model.front_end
    if model.family == "qwen2_5_omni":  # one spectrogram over the whole chunk_length (300 s), then the valid frames
        f = front.features(audio, "clip")
        n = front.limit
        x = np.pad(pad_or_trim(audio, n), 200, mode="reflect")
        mel = _spectrogram(x, n // HOP_LENGTH)[:, :f.n_frames]
        mx.eval(mel)
        fe_wall, fe_cpu = time.perf_counter() - w, time.process_time() - c
        tok = model.audio_tower(mel)[1]
    else:  # each 30 s window through the tower in full, its padded positions masked (HF's way)
        f = front.features(audio, "clip")
        mx.eval(f.mel)
        fe_wall, fe_cpu = time.perf_counter() - w, time.process_time() - c
        enc = [model.audio_tower(m, n, padded=True) for m, n in f.pieces()]
        enc = enc[0] if len(enc) == 1 else mx.concatenate(enc, axis=0)
        tok = model.multi_modal_projector(enc)
    mx.eval(tok)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    peak = mx.get_peak_memory()
    return {"wall_s": wall, "cpu_s": cpu, "front_end_wall_s": fe_wall, "front_end_cpu_s": fe_cpu,
            "peak_gb": peak / 1e9, "peak_above_weights_gb": (peak - base) / 1e9}, tok


PADDED_WHAT = {"qwen2_audio": "tower over the 30 s window", "audioflamingo3": "tower over each whole 30 s window",
               "qwen2_5_omni": "spectrogram over 300 s"}


def bench_encoder(model, a, lengths) -> dict:
    run_encoder(model, clip(2.0))  # warm-up: first-call allocations and kernels
    rows = {}
    for s in lengths:
        runs, padded = [], []
        audio = clip(s)
        for _ in range(a.encoder_trials):
            r, tok = run_encoder(model, audio)
            runs.append(r)
            if s == lengths[0]:  # the short clip: padded work beside ours, interleaved
                p, ptok = run_padded(model, audio)
                padded.append(p)
                diff = mx.abs(tok.astype(mx.float32) - ptok.astype(mx.float32)).max().item()
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row["seconds"] = s
        row["cpu_s_per_audio_s"] = row["cpu_s"] / s
        row["wall_s_per_audio_s"] = row["wall_s"] / s
        if padded:
            row["padded"] = {k: statistics.median(p[k] for p in padded) for k in padded[0]}
            row["padded"].update(what=PADDED_WHAT[model.family], max_abs_diff=diff,
                                 cpu_ratio=row["padded"]["cpu_s"] / row["cpu_s"])
        print(f"  {s:>4} s: {row['n_tokens']} tokens, {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU "
              f"({row['cpu_s_per_audio_s'] * 1e3:.0f} ms CPU per s of audio), peak {row['peak_gb']:.2f} GB"
              + (f"; padded: {row['padded']['cpu_s']:.1f} s CPU, max abs diff {diff:.1e}" if padded else ""),
              flush=True)
        rows[f"{s} s"] = row
    return rows


# -- 3. long files -----------------------------------------------------------------------------------
LOAD_CHILD = r"""
import json, resource, sys, time
import numpy as np, mlx.core as mx
from mlx_listen import models
front = models.front_end({"model_type": sys.argv[1]})
mx.eval(front.features(np.zeros(16000, np.float32), "warm-up").mel)
def status(key):  # kB in /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
try:  # reset the RSS high-water mark to the current RSS (Linux >= 4.0), so VmHWM is this load's peak
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    hwm = lambda: status("VmHWM")
except OSError:  # the process's own high-water mark (the warm-up's peak may hide the load's)
    hwm = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = status("VmRSS")
tic = time.perf_counter()
audio = front.load(sys.argv[2])
t_load = time.perf_counter() - tic
load_mb = hwm() - base
f = front.features(audio, "clip")
mx.eval(f.mel)
print(json.dumps({"load_s": t_load, "total_s": time.perf_counter() - tic, "rss_growth_mb": hwm() - base,
                  "load_rss_growth_mb": load_mb,
                  "rss_base_mb": base, "duration": f.duration, "seconds_used": f.seconds_used,
                  "samples": int(audio.shape[0]), "n_tokens": f.n_tokens, "truncated": f.truncated}))
"""


def bench_load(families, hours: float) -> list[dict]:
    from bench_audio import write_long  # a long file written block by block (benchmarks/ is on sys.path)

    tmp = Path(tempfile.mkdtemp(prefix="bench-families-load-", dir="/tmp"))
    rows = []
    try:
        files = [(tmp / "long16k_mono.wav", 16000, 1), (tmp / "long44k_stereo.wav", 44100, 2)]
        for path, sr, ch in files:
            write_long(path, sr, hours * 3600, ch)
        for path, sr, ch in files:
            for fam in families:
                r = subprocess.run([sys.executable, "-c", LOAD_CHILD, fam, str(path)], capture_output=True,
                                   text=True, cwd=ROOT)
                if r.returncode:
                    raise SystemExit(f"load child failed ({fam}, {path.name}):\n{r.stderr}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                # what the family uses, as the file's own samples (float32): the floor of any reader
                used_src_mb = res["seconds_used"] * sr * ch * 4 / 2**20
                whole_mb = hours * 3600 * sr * ch * 4 / 2**20
                res.update(family=fam, file=f"{hours:g} h {sr / 1000:g} kHz {'mono' if ch == 1 else 'stereo'}",
                           file_mb=path.stat().st_size / 2**20, used_src_f32_mb=used_src_mb,
                           whole_src_f32_mb=whole_mb)
                print(f"  {res['file']}, {fam}: {res['total_s']:.2f} s, RSS +{res['rss_growth_mb']:.0f} MB, "
                      f"{res['seconds_used']:g} s used", flush=True)
                rows.append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# -- report ------------------------------------------------------------------------------------------
NAMES = {"qwen2_audio": "Qwen2-Audio", "audioflamingo3": "Audio Flamingo 3", "qwen2_5_omni": "Qwen2.5-Omni"}


def tables(r: dict) -> str:
    c = r["config"]
    width = "real widths" if c["encoder_width"] == 1280 else f"encoder d_model {c['encoder_width']} (real: 1280)"
    out = [f"{c['dtype']}; decoder {c['layers']} layers, encoder {c['encoder_layers']} layer(s), vocab {c['vocab']} "
           f"({width if not c['quick'] else 'NO: --quick tiny widths'}); {r['machine']}", ""]
    dec = {f: v["decoder"] for f, v in r["families"].items() if "decoder" in v}
    if dec:
        out += ["| family | prompt | prefill ours | prefill mlx-lm | prefill ratio | decode ours | decode mlx-lm "
                "| decode ratio | check |", "|---|---|---|---|---|---|---|---|---|"]
        for f, d in dec.items():
            pre, de = d["prefill_tok_s"], d["decode_tok_s"]
            out.append(f"| {NAMES[f]} | {d['prompt_tokens']} tok | {pre['ours']:.2f} tok/s | {pre['mlx_lm']:.2f} tok/s "
                       f"| {d['prefill_ratio']:.3f}× | {de['ours']:.2f} tok/s | {de['mlx_lm']:.2f} tok/s "
                       f"| {d['decode_ratio']:.3f}× | logits diff {d['logits_max_abs_diff']:.1e}, "
                       f"{'same tokens' if d['same_tokens'] else 'TOKENS DIFFER'} |")
        out.append("")
    enc = {f: v["encoder"] for f, v in r["families"].items() if "encoder" in v}
    if enc:
        out += ["| family | clip | audio tokens | wall | CPU | CPU per s of audio | front end (CPU) "
                "| peak above weights | peak in all |", "|---|---|---|---|---|---|---|---|---|"]
        for f, rows in enc.items():
            for row in rows.values():
                out.append(f"| {NAMES[f]} | {row['seconds']} s | {row['n_tokens']} | {row['wall_s']:.1f} s "
                           f"| {row['cpu_s']:.1f} s | {row['cpu_s_per_audio_s'] * 1e3:.0f} ms "
                           f"| {row['front_end_cpu_s']:.2f} s | {row['peak_above_weights_gb'] * 1e3:.0f} MB "
                           f"| {row['peak_gb']:.2f} GB |")
        out += ["", "| family | 10 s clip: transformers pads | ours (CPU) | padded (CPU) | padded / ours "
                "| peak above weights ours / padded | max abs diff |", "|---|---|---|---|---|---|---|"]
        for f, rows in enc.items():
            row = next(iter(rows.values()))
            p = row.get("padded")
            if p:
                out.append(f"| {NAMES[f]} | {p['what']} | {row['cpu_s']:.1f} s | {p['cpu_s']:.1f} s "
                           f"| {p['cpu_ratio']:.2f}× | {row['peak_above_weights_gb'] * 1e3:.0f} / "
                           f"{p['peak_above_weights_gb'] * 1e3:.0f} MB | {p['max_abs_diff']:.1e} |")
        out.append("")
    if r.get("load"):
        out += ["| file | family | used | load + features | peak RSS growth: load / + features | used, as source float32 "
                "| whole file, as source float32 |", "|---|---|---|---|---|---|---|"]
        for x in r["load"]:
            out.append(f"| {x['file']} ({x['file_mb']:.0f} MiB) | {NAMES[x['family']]} | {x['seconds_used']:g} s "
                       f"({x['n_tokens']} tok) | {x['total_s']:.2f} s | {x['load_rss_growth_mb']:.0f} / {x['rss_growth_mb']:.0f} MB "
                       f"| {x['used_src_f32_mb']:.0f} MB | {x['whole_src_f32_mb']:.0f} MB |")
    return "\n".join(out)


def main():
    a = parse_args()
    fams = a.families.split(",")
    parts = a.parts.split(",")
    if bad := [f for f in fams if f not in FAMILIES] + [p for p in parts if p not in PARTS]:
        raise SystemExit(f"unknown family or part {bad}")
    if a.quick:
        a.layers, a.encoder_layers, a.vocab = min(a.layers, 2), min(a.encoder_layers, 1), 1024
        a.trials, a.decode_tokens, a.hours = 1, 8, min(a.hours, 0.05)
    res = {"config": {k: v for k, v in vars(a).items() if k != "json"},
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__} {mx.default_device()}",
           "families": {}}
    t0 = time.perf_counter()
    for fam in fams:
        if not {"decoder", "encoder"} & set(parts):
            break
        print(f"{NAMES[fam]}:", flush=True)
        model = build(fam, a)
        out = res["families"][fam] = {"weights_gb": nbytes(model) / 1e9}
        if "encoder" in parts:
            out["encoder"] = bench_encoder(model, a, LENGTHS[fam])
        if "decoder" in parts:
            out["decoder"] = bench_decoder(model, a)
        del model
        mx.clear_cache()
    if "load" in parts:
        print(f"long files ({a.hours:g} h):", flush=True)
        res["load"] = bench_load(fams, a.hours)
    res["total_s"] = time.perf_counter() - t0
    res["own_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(tables(res))
    print(f"\n{res['total_s'] / 60:.1f} min in all")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
