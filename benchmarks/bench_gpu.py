"""GPU numbers for mlx-listen on MLX's CUDA backend: a full-size random Qwen2-Audio-7B, bf16 and 4-bit.

Made for one short session on a lent NVIDIA machine (`benchmarks/gpu.sh`, README "GPU"), and
runnable anywhere: `--quick` builds a tiny model of the same layout and runs every step on the CPU.

Phases, each in its own process, in this order, each bounded by its own cap and by `--deadline`
(seconds for the whole run); every measurement is written as soon as it is done, to
`OUT/results.json` and the tables to `OUT/table.md`, so a run cut short still returns what it did:

1. build: a random bf16 checkpoint in the hub layout, shard by shard (`bench_convert.build_checkpoint`:
   16.8 GB in 4 shards at full size), then a 4-bit MLX copy (`mlx_listen_convert.convert.convert(...,
   quantize=True)`); both timed. The tokenizer is byte-level (`mlx_listen_convert.reference.tiny`'s) with Qwen2-Audio's
   special-token ids (151643-151648) in a vocab padded with entries that encoding never produces,
   so prompts go through the real chat template and loader.
2. mlx-bf16: ours vs `mlx_lm.models.qwen2.Model` holding the very same arrays: prefill tok/s on a
   290-token (10 s clip) and a 790-token (30 s clip) prompt, greedy decode tok/s over N tokens after
   each (pipelined as mlx-lm's generate_step), alternating ours/theirs, warm-up first, medians;
   a device-to-device copy and a read-only sum (bandwidth); the encoder (tower + projector) on 10 s
   and 30 s clips, valid frames only and HF's padded 30 s window; artefacts for the torch phase.
3. mlx-q4: the same A/B on the 4-bit folder (mlx-lm's twin quantised alike, then the same arrays).
4. torch: transformers on CUDA in bf16 (eager, sdpa, DynamicCache, a manual greedy cached loop)
   on the same embeddings: prefill and decode tok/s, the audio tower (HF always runs the padded
   30 s window), a copy/sum bandwidth, and a check against our logits.
5. answerer: items/s of an MMAU-like run: `make-demo-set` questions with clips padded to 10 s
   (MMAU's length), `prepare` + `conditions.Answerer` with [baseline] and with [baseline + 5 steered
   α] (the shared-prefill path), max 32 tokens.

Decode vs the bandwidth limit: bytes read per token = the language model's weights (bf16, or the
4-bit weights with scales and biases; the embedding table is left out, one row is read) + the KV
cache at the mean context of the decode; limit tok/s = bandwidth / bytes.

    python benchmarks/bench_gpu.py --quick                 # tiny model, CPU is fine (~2-4 min here)
    python benchmarks/bench_gpu.py --out DIR               # full size (needs ~25 GB disk, a GPU)
    python benchmarks/bench_gpu.py --prepare-side DIR      # side files for the GPU machine (gpu_prepare.sh)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_convert
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import bench_convert  # noqa: E402  (imports no MLX at module level)

PHASES = ("build", "mlx-bf16", "mlx-q4", "torch", "answerer")
CAPS = {"build": 200, "mlx-bf16": 150, "mlx-q4": 110, "torch": 150, "answerer": 120}  # seconds, full size
FLOOR = {"build": 60, "mlx-bf16": 60, "mlx-q4": 40, "torch": 60, "answerer": 40}  # held back for later phases
NOMINAL_BW = 4.8e12  # H200 HBM3e, vendor datasheet (B/s)
PROMPTS = {"10 s": (250, 40), "30 s": (750, 40)}  # audio tokens, text tokens → 290 and 790 positions
ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
QUICK = {  # hub config with tiny widths: same layout, GQA, every step runs in seconds on a CPU
    "text_config": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2),
    "audio_config": dict(d_model=64, encoder_attention_heads=2, encoder_ffn_dim=128, encoder_layers=2),
}
DEFAULT_SIDE = ROOT / ".gpu" / "call2" / "side"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny widths (CPU smoke run)")
    p.add_argument("--work", type=Path, help="checkpoints and artefacts (default: a temp folder, deleted "
                   "at the end unless --keep; full size needs ~25 GB)")
    p.add_argument("--out", type=Path, help="results.json and table.md (default: $OUT, else ./bench-gpu-out)")
    p.add_argument("--deadline", type=float, help="seconds for the whole run (default 450; quick 1800)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {','.join(PHASES)}")
    p.add_argument("--side", type=Path, help=f"prepared side files (default {DEFAULT_SIDE.relative_to(ROOT)} "
                   "if there, else built here with transformers)")
    p.add_argument("--trials", type=int, help="timed runs per model and prompt (default 5; quick 2)")
    p.add_argument("--decode-tokens", type=int, help="greedy tokens per decode run (default 128; quick 16)")
    p.add_argument("--items", type=int, help="MMAU-like items (default 28; quick 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length cap in the MMAU-like run")
    p.add_argument("--cap-scale", type=float, help="multiply every phase's time cap (default 1; quick 2)")
    p.add_argument("--keep", action="store_true", help="keep WORK (a later run with the same --work reuses the build)")
    p.add_argument("--prepare-side", type=Path, metavar="DIR", help="write the side files to DIR and exit")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # child: run one phase
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)  # child: wall-clock end (time.time())
    a = p.parse_args(argv)
    q = a.quick
    a.trials = a.trials or (2 if q else 5)
    a.decode_tokens = a.decode_tokens or (16 if q else 128)
    a.items = a.items or (4 if q else 28)
    a.deadline = a.deadline or (1800 if q else 450)
    a.cap_scale = a.cap_scale or (2.0 if q else 1.0)
    return a


# -- small helpers -----------------------------------------------------------------------------------
def convert_package():
    """Make `mlx_listen_convert` importable. pyproject installs it from the `convert/` folder; on the
    GPU machine nothing is pip-installed (gpu.sh puts the repository root on PYTHONPATH, which gives
    `mlx_listen` but not that name), so it is loaded from the folder under its installed name."""
    import importlib.util

    if "mlx_listen_convert" in sys.modules or importlib.util.find_spec("mlx_listen_convert") is not None:
        return
    spec = importlib.util.spec_from_file_location("mlx_listen_convert", ROOT / "convert" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "convert")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mlx_listen_convert"] = module
    spec.loader.exec_module(module)


def write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def med(xs):
    return statistics.median(xs) if xs else None


def short(e: BaseException) -> str:
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) < 300 else s[:300] + " …"


class Phase:
    """One phase's results, saved after every step; a failed step is recorded and the next one runs."""

    def __init__(self, a, name: str):
        self.a, self.name, self.path = a, name, a.work / f"phase-{name}.json"
        self.res = {}
        self.save()

    def left(self) -> float:
        return (self.a.until or math.inf) - time.time()

    def save(self):
        write_json(self.path, self.res)

    def step(self, key: str, fn, *args, **kw):
        t = time.perf_counter()
        print(f"[{self.name}] {key} …", flush=True)
        try:
            out = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001  (a benchmark step: record it, go on)
            traceback.print_exc()
            self.res[key] = {"error": short(e)}
            out = None
        else:
            if out is not None:
                self.res[key] = out
        print(f"[{self.name}] {key} done in {time.perf_counter() - t:.1f} s", flush=True)
        self.save()
        return out


def config_dict(a) -> dict:
    config = json.loads(bench_convert.HUB_CONFIG.read_text())
    if a.quick:
        for part, over in QUICK.items():
            config[part].update(over)
    return config


def check_specials(config: dict):
    t = config["text_config"]
    first = t["bos_token_id"]
    want = {"<|endoftext|>": first, "<|im_end|>": t["eos_token_id"], "<|AUDIO|>": config["audio_token_index"]}
    got = {s: first + i for i, s in enumerate(SPECIALS)}
    if any(got[k] != v for k, v in want.items()):
        raise SystemExit(f"the config's special ids {want} are not 151643 + the tiny tokenizer's order")
    return first


# -- side files: the tiny checkpoint's processor files and the padded tokenizer ------------------------
def prepare_side(dest: Path, config: dict) -> Path:
    """What `build_checkpoint` takes from a tiny checkpoint, built here with transformers (the GPU
    machine then builds nothing with its own transformers): the tiny folder's side files and its key
    names, and a byte-level tokenizer with Qwen2-Audio's special ids, its vocab padded to them."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    convert_package()
    from mlx_listen_convert.reference.tiny import build_tiny

    first = check_specials(config)
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    build_tiny(dest / "tiny")
    st = dest / "tiny" / "model.safetensors"
    (dest / "tiny-keys.json").write_text(json.dumps(sorted(safetensors_keys(st))))
    st.unlink()  # only its key names are needed
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for i in range(len(vocab), first):
        vocab[f"<|t{i}|>"] = i  # filler: no merges, so encoding never produces it
    for i, s in enumerate(SPECIALS):
        vocab[s] = first + i
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                                               "audio_eos_token": "<|audio_eos|>"})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    if ids != {s: first + i for i, s in enumerate(SPECIALS)}:
        raise SystemExit(f"padded tokenizer: special ids came out as {ids}")
    tok.save_pretrained(dest / "tokenizer")
    t = config["text_config"]
    gen = {"bos_token_id": t["bos_token_id"], "eos_token_id": [t["bos_token_id"], t["eos_token_id"]],
           "pad_token_id": t["bos_token_id"], "do_sample": False}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return dest


def safetensors_keys(path: Path) -> set[str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return {k for k in json.loads(f.read(n)) if k != "__metadata__"}


def use_side(side: Path, hf: Path):
    """Replace the tiny tokenizer and generation config in the built checkpoint with the padded ones."""
    for f in (side / "tokenizer").iterdir():
        shutil.copy2(f, hf / f.name)
    shutil.copy2(side / "generation_config.json", hf / "generation_config.json")


# -- phase: build ----------------------------------------------------------------------------------
def phase_build(a, ph: Phase):
    hf, q4 = a.work / "hf-bf16", a.work / "mlx-q4"
    config = config_dict(a)
    if a.quick:  # build_checkpoint reads its config from this module global
        path = a.work / "quick_config.json"
        path.write_text(json.dumps(config, indent=2))
        bench_convert.HUB_CONFIG = path
    if (hf / "bench-info.json").exists() and (q4 / "config.json").exists():
        ph.res["reused"] = True
        ph.res["checkpoint"] = json.loads((hf / "bench-info.json").read_text())
        ph.res["q4"] = json.loads((q4 / "bench-info.json").read_text()) if (q4 / "bench-info.json").exists() else {}
        return
    for p in (hf, q4):
        shutil.rmtree(p, ignore_errors=True)
    side = a.side if a.side else DEFAULT_SIDE if DEFAULT_SIDE.exists() else None
    if side is None:
        side = ph.step("side files (built here)", lambda: str(prepare_side(a.work / "side", config)))
        side = Path(side)
        ph.res["side"] = "built in this run"
    else:
        ph.res["side"] = f"prepared ({side})"
    keys = set(json.loads((side / "tiny-keys.json").read_text()))

    def tiny_reference(folder: Path):  # build_checkpoint's tiny checkpoint, from the prepared files
        shutil.copytree(side / "tiny", folder)
        return keys

    bench_convert.tiny_reference = tiny_reference

    def build():
        t = time.perf_counter()
        info = bench_convert.build_checkpoint(hf, None, None)
        use_side(side, hf)
        info["seconds"] = time.perf_counter() - t
        (hf / "bench-info.json").write_text(json.dumps(info))
        return info

    if ph.step("checkpoint", build) is None:
        return

    def quantise():
        convert_package()
        from mlx_listen_convert.convert import convert

        t = time.perf_counter()
        convert(str(hf), str(q4), quantize=True, progress=False)
        info = {"seconds": time.perf_counter() - t,
                "bytes": sum(f.stat().st_size for f in q4.glob("*.safetensors")),
                "quantization": json.loads((q4 / "config.json").read_text()).get("quantization")}
        (q4 / "bench-info.json").write_text(json.dumps(info))
        return info

    ph.step("q4", quantise)


# -- MLX side ----------------------------------------------------------------------------------------
def mlx_env() -> dict:
    import mlx.core as mx

    d = {"mlx": mx.__version__, "device": str(mx.default_device())}
    try:
        d["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # noqa: BLE001
        pass
    return d


def twin_of(model, quant: dict | None = None):
    """mlx-lm's qwen2 holding the same arrays (shared, not copied; strict load checks names and
    shapes), quantised alike first when the model is (as bench_model.mlx_lm_twin, plus that)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    t = model.text_config  # the decoder's config (AudioLM interface)
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        intermediate_size=t.intermediate_size, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        vocab_size=t.vocab_size, rope_theta=t.rope_theta, tie_word_embeddings=False,
    )
    twin = qwen2.Model(args)
    if quant:
        nn.quantize(twin, group_size=quant["group_size"], bits=quant["bits"], mode=quant.get("mode", "affine"))
    twin.load_weights(tree_flatten(model.language_model.parameters()), strict=True)
    return twin


def lm_bytes(model) -> dict:
    """Bytes a decode step reads: every language-model array but the embedding table (one row of
    it is read), and the KV cache per position (bf16 keys and values, every layer)."""
    from mlx.utils import tree_flatten

    flat = tree_flatten(model.language_model.parameters())
    weights = sum(v.nbytes for k, v in flat if "embed_tokens" not in k)
    kv = 2 * model.n_layers * model.n_kv_heads * model.head_dim * 2
    return {"weights": weights, "embedding": sum(v.nbytes for k, v in flat if "embed_tokens" in k),
            "kv_per_position": kv}


def clip(seconds: float, seed: int = 0):
    import numpy as np

    from mlx_listen.audio import SAMPLE_RATE

    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def features(x, name=None):
    """Log-mel on the default device; on the CPU stream if the GPU backend refuses (recorded)."""
    import mlx.core as mx

    from mlx_listen.audio import audio_features

    try:
        f = audio_features(x, name)
        mx.eval(f.mel)
        return f
    except Exception:  # noqa: BLE001
        with mx.stream(mx.cpu):
            f = audio_features(x, name)
            mx.eval(f.mel)
        FALLBACKS.add("log-mel on the CPU stream")
        return f


FALLBACKS: set[str] = set()


def timed(fn):
    import mlx.core as mx

    mx.synchronize()
    tic = time.perf_counter()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return time.perf_counter() - tic, out


def synthetic_prompt(model, n_audio: int, n_text: int, seconds: float):
    """n_text/2 random text tokens, one clip's n_audio audio tokens, n_text/2 text tokens (no specials)."""
    import mlx.core as mx
    import numpy as np

    f = features(clip(seconds))
    assert f.n_tokens == n_audio, (f.n_tokens, n_audio)
    feats = model.encode_audio(f.mel, f.n_frames)
    rng = np.random.default_rng(1)
    text = rng.integers(0, min(151643, model.vocab_size - 1), n_text)  # below the specials
    ids = np.concatenate([text[: n_text // 2], np.full(n_audio, model.audio_token_id), text[n_text // 2:]])
    emb = model.embed(ids, [feats])
    mx.eval(emb)
    return ids, emb, f


def mlx_prefill(lm, emb):
    """As mlx-lm's generate_step: every position but the last into the KV cache, then the last."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm)
    mx.synchronize()
    tic = time.perf_counter()
    lm(None, cache, input_embeddings=emb[None, :-1])
    mx.eval([c.state for c in cache])
    y = lm(None, cache, input_embeddings=emb[None, -1:])[:, -1].argmax(-1)
    mx.eval(y)
    return time.perf_counter() - tic, cache, y


def mlx_decode(lm, cache, y, n: int):
    """n greedy tokens, pipelined as generate_step does (the next step is queued before this one is read)."""
    import mlx.core as mx

    def step(t):
        return lm(t[:, None], cache)[:, -1].argmax(-1)

    mx.synchronize()
    tic = time.perf_counter()
    nxt = step(y)
    mx.async_eval(nxt)
    toks = []
    for i in range(n):
        cur = nxt
        if i + 1 < n:
            nxt = step(cur)
            mx.async_eval(nxt)
        toks.append(cur.item())
    return time.perf_counter() - tic, toks


def ab(ph: Phase, lms: dict, emb, trials: int, n_dec: int, share: float) -> dict:
    """Prefill then decode for each model, alternating which goes first, after a warm-up of each;
    no new trial starts that would not end within `share` of the phase's time left."""
    import mlx.core as mx

    names = list(lms)
    stop_at = time.time() + share * ph.left()
    for lm in lms.values():  # warm-up at this length: kernels compiled, pages resident
        _, cache, y = mlx_prefill(lm, emb)
        mlx_decode(lm, cache, y, 4)
    pre, dec, peak, toks = ({n: [] for n in names} for _ in range(4))
    for trial in range(trials):
        for name in (names if trial % 2 == 0 else names[::-1]):
            mx.reset_peak_memory()  # (no clear_cache: steady state, as a server runs; peak is active memory)
            t, cache, y = mlx_prefill(lms[name], emb)
            pre[name].append(t)
            td, tk = mlx_decode(lms[name], cache, y, n_dec)
            dec[name].append(td)
            toks[name].append([y.item()] + tk)
            peak[name].append(mx.get_peak_memory() / 1e9)
            del cache
        if time.time() + sum(pre[n][-1] + dec[n][-1] for n in names) > stop_at:  # one more would not fit
            break
    L = emb.shape[0]
    a, b = names
    return {
        "prompt_tokens": L, "decode_tokens": n_dec, "trials": len(pre[a]),
        "prefill_s": pre, "decode_s": dec,
        "prefill_tok_s": {n: L / med(pre[n]) for n in names},
        "decode_tok_s": {n: n_dec / med(dec[n]) for n in names},
        "prefill_ratio": med([tb / ta for ta, tb in zip(pre[a], pre[b])]),  # ours' speed / mlx-lm's
        "decode_ratio": med([tb / ta for ta, tb in zip(dec[a], dec[b])]),
        "same_tokens": all(t == toks[a][0] for n in names for t in toks[n]),
        "peak_gb": {n: max(peak[n]) for n in names},
        "tokens": toks[a][0][:17],
    }


def mlx_bandwidth(quick: bool) -> dict:
    """A device-to-device copy (bytes read + written) and a read-only sum, 1 GiB-element bf16 (2 GiB)."""
    import mlx.core as mx

    n = 1 << (22 if quick else 30)
    x = mx.random.uniform(shape=(n,), dtype=mx.bfloat16)
    mx.eval(x)
    copies, sums = [], []
    for i in range(13):
        t, y = timed(lambda: -x)
        del y
        t2, s = timed(lambda: x.sum())
        if i >= 3:
            copies.append(t)
            sums.append(t2)
    nbytes = x.nbytes
    x = y = s = None  # noqa: F841  (free the buffers)
    mx.clear_cache()
    return {"bytes": nbytes, "copy_s": med(copies), "sum_s": med(sums),
            "copy_Bps": 2 * nbytes / med(copies), "sum_Bps": nbytes / med(sums)}


def encoder_times(model, trials: int) -> dict:
    """Tower + projector, ours (valid frames only) and HF's way (the padded 30 s window), and log-mel."""
    import mlx.core as mx

    from mlx_listen.audio import audio_features

    out = {}
    for secs in (10, 30):
        x = clip(secs)
        f = features(x)
        valid = lambda: model.encode_audio(f.mel, f.n_frames)  # noqa: E731
        padded = lambda: model.multi_modal_projector(model.audio_tower(f.mel, f.n_frames, padded=True))  # noqa: E731
        timed(valid), timed(padded)
        tv, tp, tm = [], [], []
        for _ in range(trials):
            tv.append(timed(valid)[0])
            tp.append(timed(padded)[0])
            if "log-mel on the CPU stream" in FALLBACKS:
                with mx.stream(mx.cpu):
                    tm.append(timed(lambda: audio_features(x).mel)[0])
            else:
                tm.append(timed(lambda: audio_features(x).mel)[0])
        out[f"{secs} s"] = {"audio_tokens": f.n_tokens, "valid_s": med(tv), "padded_s": med(tp), "log_mel_s": med(tm)}
    return out


def phase_mlx(a, ph: Phase, quant: bool):
    import mlx.core as mx
    import numpy as np

    from mlx_listen.load import load_model

    ph.res["env"] = mlx_env()
    folder = a.work / ("mlx-q4" if quant else "hf-bf16")
    t = time.perf_counter()
    model, _ = load_model(folder)  # no tokenizer needed here
    ph.res["load_s"] = time.perf_counter() - t
    qcfg = json.loads((folder / "config.json").read_text()).get("quantization") if quant else None
    twin = twin_of(model, qcfg)
    ph.res["bytes"] = lm_bytes(model)
    ph.res["quantization"] = qcfg
    ph.save()
    if not quant:
        ph.step("bandwidth", mlx_bandwidth, a.quick)
    prompts = {}
    for clip_name, (n_audio, n_text) in PROMPTS.items():
        secs = float(clip_name.split()[0])
        ids, emb, f = synthetic_prompt(model, n_audio, n_text, secs)
        prompts[clip_name] = emb
        if not quant:  # the same embeddings (exact in float32) and clip for the torch phase
            np.save(a.work / f"emb-{clip_name[:2]}.npy", np.array(emb.astype(mx.float32)))
            np.save(a.work / f"mel-{clip_name[:2]}.npy", np.array(f.mel))

    def parity():
        emb = prompts["10 s"]
        n = min(32, emb.shape[0])
        la, lb = model(None, input_embeddings=emb[None, :n]), twin(None, input_embeddings=emb[None, :n])
        d = {"ours_vs_mlx_lm_max_abs": mx.abs(la.astype(mx.float32) - lb.astype(mx.float32)).max().item()}
        if not quant:  # our logits at T of the whole 290-token prompt, for the torch phase
            last = model.unembed(model.blocks(emb[None])[:, -1:])[0, -1].astype(mx.float32)
            np.save(a.work / "logits-10.npy", np.array(last))
        return d

    ph.step("parity", parity)
    lms = {"ours": model, "mlx_lm": twin}
    ph.res["ab"] = {}
    for k, (clip_name, emb) in enumerate(prompts.items()):
        share = 0.45 if k == 0 else 0.75  # of the time left: the longer prompt and the encoder come after
        r = ph.step(f"ab {clip_name}", ab, ph, lms, emb, a.trials, a.decode_tokens, share)
        if r is not None:
            ph.res["ab"][clip_name] = ph.res.pop(f"ab {clip_name}")
            if not quant and clip_name == "10 s":
                (a.work / "tokens-10.json").write_text(json.dumps(r["tokens"]))
        ph.save()
        if ph.left() < 20:
            break
    if not quant and ph.left() > 15:
        ph.step("encoder", encoder_times, model, max(3, a.trials))
    if FALLBACKS:
        ph.res["fallbacks"] = sorted(FALLBACKS)
    ph.save()


# -- phase: answerer (MMAU-like run) -------------------------------------------------------------------
def phase_answerer(a, ph: Phase):
    import numpy as np

    from mlx_listen import presets
    from mlx_listen.audio import SAMPLE_RATE, load_audio
    from mlx_listen.eval import mmau
    from mlx_listen.eval.conditions import Answerer, baseline, steered
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.interp.steering import Silence, SteerConfig
    from mlx_listen.load import load
    from mlx_listen.prompt import prepare

    ph.res["env"] = mlx_env()
    t = time.perf_counter()
    model, processor = load(a.work / "hf-bf16")
    ph.res["load_s"] = time.perf_counter() - t
    n_layers = model.n_layers
    lstar = sorted({n_layers * 3 // 8, n_layers // 2})
    demo = make_demo_set(a.work / "demo", n_per_kind=max(1, -(-a.items // 7)))
    items = mmau.load_items(demo)[: a.items]
    rng = np.random.default_rng(0)
    clips = []
    for it in items:  # padded to 10 s, MMAU's clip length, with a faint floor
        x = np.asarray(load_audio(demo.parent / it["audio_id"]), np.float32)[: 10 * SAMPLE_RATE]
        pad = (1e-3 * rng.standard_normal(10 * SAMPLE_RATE)).astype(np.float32)
        pad[: x.size] += x
        clips.append(pad)
    silence = Silence(model)
    variants = {
        "baseline": Answerer(model, processor, [baseline()], max_tokens=a.max_tokens, silence=silence),
        "baseline + 5 steered α": Answerer(
            model, processor,
            [baseline()] + [steered(SteerConfig(layers=lstar, alpha=al), f"alpha={al:g}") for al in ALPHAS],
            max_tokens=a.max_tokens, silence=silence),
    }
    ph.res.update(items=len(items), max_tokens=a.max_tokens, steer_layers=lstar, alphas=list(ALPHAS),
                  clip_seconds=10, prompt="r1-aqa")

    def one(name, it, x):
        tic = time.perf_counter()
        prompt = prepare(model, processor, [features(x, it["audio_id"])], presets.build_prompt(it, "r1-aqa"))
        answers = variants[name](prompt)
        total = time.perf_counter() - tic
        first = next(iter(answers.values()))
        return total, prompt, answers, first.timing

    for name in variants:  # warm-up on the first item
        one(name, items[0], clips[0])
    stats = {n: {"seconds": [], "prefill": [], "silence": [], "decode": [], "encode": [], "tokens": [], "answers": 0}
             for n in variants}
    for i, (it, x) in enumerate(zip(items, clips)):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            total, prompt, answers, timing = one(name, it, x)
            s = stats[name]
            s["seconds"].append(total)
            s["encode"].append(prompt.encode_seconds)
            for k in ("prefill", "silence", "decode"):
                s[k].append(timing[k])
            s["tokens"] += [ans.generation_tokens for ans in answers.values()]
            s["answers"] += len(answers)
        ph.res["prompt_tokens"] = len(prompt.ids)
        ph.res["runs"] = {n: {"items": len(s["seconds"]), "answers": s["answers"], "seconds": sum(s["seconds"]),
                              "items_per_s": len(s["seconds"]) / sum(s["seconds"]),
                              "answers_per_s": s["answers"] / sum(s["seconds"]),
                              "mean_tokens": float(np.mean(s["tokens"])),
                              **{f"median_{k}_s": med(s[k]) for k in ("encode", "prefill", "silence", "decode")}}
                          for n, s in stats.items()}
        b, g = (ph.res["runs"][n] for n in variants)
        ph.res["time_ratio"] = g["seconds"] / b["seconds"]
        ph.save()
        if ph.left() < 8:
            ph.res["cut_short"] = True
            break
    if FALLBACKS:
        ph.res["fallbacks"] = sorted(FALLBACKS)


# -- phase: transformers (torch) ---------------------------------------------------------------------
def phase_torch(a, ph: Phase):
    import warnings

    import numpy as np
    import torch
    import transformers
    from transformers import DynamicCache, Qwen2AudioForConditionalGeneration

    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ph.res["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    t = time.perf_counter()
    kw = {"device_map": "cuda"} if cuda else {}
    m = Qwen2AudioForConditionalGeneration.from_pretrained(a.work / "hf-bf16", dtype=torch.bfloat16,
                                                           attn_implementation="sdpa", **kw).eval()
    sync()
    ph.res["load_s"] = time.perf_counter() - t
    ph.res["attention"] = "sdpa"

    def part(*paths):
        for p in paths:
            obj = m
            try:
                for name in p.split("."):
                    obj = getattr(obj, name)
                return obj
            except AttributeError:
                continue
        raise AttributeError(f"none of {paths} in {type(m).__name__}")

    body = part("model.language_model", "language_model.model")
    head = part("lm_head", "language_model.lm_head")
    tower = part("model.audio_tower", "audio_tower")
    proj = part("model.multi_modal_projector", "multi_modal_projector")
    ph.save()

    def bandwidth():
        n = 1 << (22 if a.quick else 30)
        x = torch.rand(n, dtype=torch.bfloat16, device=dev)
        y = torch.empty_like(x)
        copies, sums = [], []
        for i in range(13):
            sync()
            tic = time.perf_counter()
            y.copy_(x)
            sync()
            t1 = time.perf_counter()
            x.sum()
            sync()
            t2 = time.perf_counter()
            if i >= 3:
                copies.append(t1 - tic)
                sums.append(t2 - t1)
        nb = x.numel() * 2
        return {"bytes": nb, "copy_s": med(copies), "sum_s": med(sums),
                "copy_Bps": 2 * nb / med(copies), "sum_Bps": nb / med(sums)}

    ph.step("bandwidth", bandwidth)

    def new_cache():
        try:
            return DynamicCache(config=m.config.text_config)
        except TypeError:
            return DynamicCache()

    @torch.inference_mode()
    def prefill(emb):
        cache = new_cache()
        sync()
        tic = time.perf_counter()
        body(inputs_embeds=emb[None, :-1], past_key_values=cache, use_cache=True)
        h = body(inputs_embeds=emb[None, -1:], past_key_values=cache, use_cache=True).last_hidden_state
        logits = head(h[:, -1])
        y = logits.argmax(-1)
        sync()
        return time.perf_counter() - tic, cache, y, logits

    @torch.inference_mode()
    def decode(cache, y, n):
        sync()
        tic = time.perf_counter()
        toks = []
        for _ in range(n):
            h = body(input_ids=y[:, None], past_key_values=cache, use_cache=True).last_hidden_state
            y = head(h[:, -1]).argmax(-1)
            toks.append(y)
        sync()
        return time.perf_counter() - tic, torch.cat(toks).tolist()

    ph.res["ab"] = {}
    for k, (clip_name, (n_audio, n_text)) in enumerate(PROMPTS.items()):
        f = a.work / f"emb-{clip_name[:2]}.npy"
        if f.exists():
            emb = torch.from_numpy(np.load(f)).to(dev, torch.bfloat16)
            source = "the MLX phase's embeddings"
        else:
            ids = torch.randint(0, 151643, (n_audio + n_text,), device=dev)
            emb = body.embed_tokens(ids)
            source = "random token embeddings (no MLX artefact)"

        def run(emb=emb, source=source, share=0.45 if k == 0 else 0.75):
            stop_at = time.time() + share * ph.left()
            _, cache, y, _ = prefill(emb)  # warm-up
            decode(cache, y, 4)
            pre, dec, toks, logits = [], [], None, None
            for trial in range(a.trials):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t, cache, y, lg = prefill(emb)
                pre.append(t)
                td, tk = decode(cache, y, a.decode_tokens)
                dec.append(td)
                toks, logits = [y.item()] + tk, lg
                del cache
                if time.time() + pre[-1] + dec[-1] > stop_at:
                    break
            L = emb.shape[0]
            r = {"prompt_tokens": L, "decode_tokens": a.decode_tokens, "trials": len(pre), "inputs": source,
                 "prefill_s": pre, "decode_s": dec, "prefill_tok_s": L / med(pre),
                 "decode_tok_s": a.decode_tokens / med(dec), "tokens": toks[:17],
                 "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
            ours = a.work / "logits-10.npy"
            if clip_name == "10 s" and ours.exists() and f.exists():
                o = np.load(ours).astype(np.float64)
                h = logits[0].float().cpu().numpy().astype(np.float64)
                r["logits_rel_err_vs_ours"] = float(np.linalg.norm(h - o) / np.linalg.norm(o))
                r["top1_same_as_ours"] = bool(h.argmax() == o.argmax())
                tk = a.work / "tokens-10.json"
                if tk.exists():
                    mine = json.loads(tk.read_text())
                    n = next((i for i, (p, q) in enumerate(zip(mine, toks)) if p != q), min(len(mine), len(toks)))
                    r["greedy_prefix_same_as_ours"] = f"{n}/{min(len(mine), len(toks))}"
            return r

        r = ph.step(f"ab {clip_name}", run)
        if r is not None:
            ph.res["ab"][clip_name] = ph.res.pop(f"ab {clip_name}")
        ph.save()
        if ph.left() < 20:
            break

    @torch.inference_mode()
    def encoder():
        out = {}
        for secs in (10, 30):
            f = a.work / f"mel-{secs}.npy"
            mel = torch.from_numpy(np.load(f)) if f.exists() else torch.randn(128, 3000)
            x = mel[None].to(dev, torch.bfloat16)  # HF's feature extractor pads every clip to 30 s

            def run():
                sync()
                tic = time.perf_counter()
                proj(tower(x).last_hidden_state)
                sync()
                return time.perf_counter() - tic

            run()
            out[f"{secs} s"] = {"padded_s": med([run() for _ in range(max(3, a.trials))])}
        return out

    if ph.left() > 10:
        ph.step("encoder", encoder)


# -- orchestration -----------------------------------------------------------------------------------
def machine_meta(a) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "quick": a.quick,
            "trials": a.trials, "decode_tokens": a.decode_tokens}
    for pkg in ("mlx", "mlx-cuda-13", "mlx-cpu", "mlx-lm", "torch", "transformers", "numpy"):
        try:
            meta[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            name, driver, mem, sm, memclk = [s.strip() for s in q.stdout.strip().splitlines()[0].split(",")]
            meta.update(gpu=name, driver=driver, gpu_memory=mem, max_sm_clock=sm, max_mem_clock=memclk)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    meta.setdefault("gpu", "none (CPU)")
    return meta


def run_phases(a):
    start = time.time()
    end = start + a.deadline
    results = {"meta": machine_meta(a), "status": {}}
    out = a.out
    out.mkdir(parents=True, exist_ok=True)

    def publish():
        write_json(out / "results.json", results)
        (out / "table.md").write_text(tables(results) + "\n")

    publish()
    for i, name in enumerate(a.phases):
        left = end - time.time()
        if left < 20:
            results["status"][name] = {"status": "skipped (deadline)"}
            publish()
            continue
        later = sum(FLOOR[p] for p in a.phases[i + 1:])  # each later phase keeps at least its floor
        cap = min(CAPS[name] * a.cap_scale, max(left - later, min(FLOOR[name], left)) - 5)
        cmd = [sys.executable, __file__, "--phase", name, "--until", str(time.time() + cap - 3),
               "--work", str(a.work), "--out", str(out), "--trials", str(a.trials),
               "--decode-tokens", str(a.decode_tokens), "--items", str(a.items), "--max-tokens", str(a.max_tokens)]
        cmd += ["--quick"] if a.quick else []
        cmd += ["--side", str(a.side)] if a.side else []
        print(f"== {name} (at most {cap:.0f} s; {left:.0f} s left)", flush=True)
        tic = time.perf_counter()
        status = "ok"
        try:
            rc = subprocess.run(cmd, timeout=cap).returncode
            if rc:
                status = f"exit {rc}"
        except subprocess.TimeoutExpired:
            status, rc = "timed out (partial)", None
        f = a.work / f"phase-{name}.json"
        results[name] = json.loads(f.read_text()) if f.exists() else {}
        results["status"][name] = {"status": status, "seconds": round(time.perf_counter() - tic, 1)}
        publish()
        if name == "build" and not (a.work / "hf-bf16" / "bench-info.json").exists():
            print("build failed: nothing else can run", flush=True)
            break
    results["meta"]["total_s"] = round(time.time() - start, 1)
    publish()
    print()
    print(tables(results))
    return results


# -- tables --------------------------------------------------------------------------------------------
def fmt(x, unit="", digits=1):
    if x is None:
        return "—"
    return f"{x:,.{digits}f}{unit}"


def size(n) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def tables(r: dict) -> str:
    m = r.get("meta", {})
    b16, q4, th, an, bd = (r.get(k, {}) for k in ("mlx-bf16", "mlx-q4", "torch", "answerer", "build"))
    tdev = "CUDA" if "cuda" in str(th.get("env", {}).get("device", "cuda")).lower() or m.get("gpu", "").startswith("NVIDIA") \
        else th.get("env", {}).get("device", "?")
    lines = [
        f"{m.get('date', '?')}; GPU: {m.get('gpu')} (driver {m.get('driver', '—')}, {m.get('gpu_memory', '—')}); "
        f"mlx {m.get('mlx', '—')} + mlx-cuda-13 {m.get('mlx-cuda-13', '—')}, mlx-lm {m.get('mlx-lm', '—')}, "
        f"torch {m.get('torch', '—')}, transformers {m.get('transformers', '—')}; python {m.get('python')}; "
        f"{'QUICK (tiny widths) ' if m.get('quick') else ''}medians of {m.get('trials')} trials, "
        f"decode {m.get('decode_tokens')} greedy tokens.",
        "",
        f"Whole run {fmt(m.get('total_s'), ' s', 0)}. Phases: " + ", ".join(f"{k} {v.get('status')}" + (f" ({v['seconds']:.0f} s)" if "seconds" in v else "")
                               for k, v in r.get("status", {}).items()),
        "",
        f"| measurement | ours (mlx-listen) | mlx-lm qwen2 | transformers ({tdev}, bf16) | ours / mlx-lm | ours / transformers | check |",
        "|---|---|---|---|---|---|---|",
    ]

    def err(d, key):
        x = d.get(key)
        return x.get("error") if isinstance(x, dict) else None

    ck, q = bd.get("checkpoint", {}), bd.get("q4", {})
    if ck:
        lines.append(f"| build: random bf16 checkpoint, hub layout ({size(ck.get('bytes'))}, "
                     f"{ck.get('shards')} shards) | {fmt(ck.get('seconds'), ' s', 0)} | | | | | "
                     f"{'reused' if bd.get('reused') else ck.get('error', '')} |")
    if q:
        qq = q.get("quantization") or {}
        lines.append(f"| build: `convert(..., quantize=True)` → MLX {qq.get('bits', '?')}-bit g{qq.get('group_size', '?')} "
                     f"({size(q.get('bytes'))}) | {fmt(q.get('seconds'), ' s', 0)} | | | | | {q.get('error', '')} |")

    def abrows(d, tag, with_torch):
        clips = dict.fromkeys([*d.get("ab", {}), *(th.get("ab", {}) if with_torch else {})])
        for clip_name in clips:  # transformers' rows stay even where the MLX phase has none
            t = th.get("ab", {}).get(clip_name, {}) if with_torch else {}
            x = d.get("ab", {}).get(clip_name) or {"prompt_tokens": t.get("prompt_tokens"),
                                                  "decode_tokens": t.get("decode_tokens")}
            for kind in ("prefill", "decode"):
                o, l_ = (x.get(f"{kind}_tok_s") or {}).get("ours"), (x.get(f"{kind}_tok_s") or {}).get("mlx_lm")
                hf = t.get(f"{kind}_tok_s")
                what = (f"prefill tok/s, {x['prompt_tokens']}-token prompt ({clip_name} clip)" if kind == "prefill" else
                        f"decode tok/s, {x['decode_tokens']} tokens after the {x['prompt_tokens']}-token prompt")
                check = ("same tokens" if x["same_tokens"] else "TOKENS DIFFER") if kind == "decode" and "same_tokens" in x else ""
                if kind == "prefill" and with_torch and "logits_rel_err_vs_ours" in t:
                    check = (f"HF logits rel err {t['logits_rel_err_vs_ours']:.1e}, top-1 "
                             f"{'same' if t['top1_same_as_ours'] else 'differs'}")
                if kind == "decode" and with_torch and "greedy_prefix_same_as_ours" in t:
                    check += f"; HF greedy prefix {t['greedy_prefix_same_as_ours']} same"
                lines.append(f"| {tag} {what} | {fmt(o)} | {fmt(l_)} | {fmt(hf) if with_torch else 'n/a'} | "
                             f"{fmt(x.get(f'{kind}_ratio'), '×', 3)} | "
                             f"{fmt(o / hf, '×', 2) if (o and hf) else '—'} | {check} |")
        for key in ("ab 10 s", "ab 30 s", "parity"):
            if err(d, key):
                lines.append(f"| {tag} {key} | error: {err(d, key)} | | | | | |")

    abrows(b16, "bf16", True)
    abrows(q4, "4-bit", False)
    diffs = [(tag, (d.get("parity") or {}).get("ours_vs_mlx_lm_max_abs")) for tag, d in (("bf16", b16), ("4-bit", q4))]
    if any(v is not None for _, v in diffs):
        lines.append("| logits on a 32-position prefix, ours vs mlx-lm: max abs diff | "
                     + ", ".join(f"{tag} {v:.1e}" for tag, v in diffs if v is not None) + " | | | | | |")
    enc, henc = b16.get("encoder", {}), th.get("encoder", {})
    for clip_name, e in (enc.items() if isinstance(enc, dict) and "error" not in enc else []):
        h = henc.get(clip_name, {}).get("padded_s") if isinstance(henc, dict) else None
        lines.append(f"| encoder (tower + projector), {clip_name} clip ({e['audio_tokens']} tokens): ours valid frames "
                     f"/ ours padded 30 s / HF padded 30 s | {fmt(e['valid_s'] * 1e3, ' ms')} / {fmt(e['padded_s'] * 1e3, ' ms')} "
                     f"| | {fmt(h * 1e3 if h else None, ' ms')} | | {fmt(h / e['valid_s'] if h else None, '×', 2)} "
                     f"| log-mel {fmt(e['log_mel_s'] * 1e3, ' ms')} |")
    if err(b16, "encoder"):
        lines.append(f"| encoder | error: {err(b16, 'encoder')} | | | | | |")
    runs = an.get("runs", {})
    if runs:
        for name, x in runs.items():
            lines.append(f"| MMAU-like run, {x['items']} items (10 s clips, "
                         f"{an.get('prompt_tokens', '?')}-token prompts, ≤ {an['max_tokens']} tokens): {name} | "
                         f"{x['items_per_s']:.2f} items/s ({x['answers_per_s']:.2f} answers/s) | | | | | "
                         f"median prefill {fmt(x['median_prefill_s'] * 1e3, ' ms', 0)}, silence "
                         f"{fmt(x['median_silence_s'] * 1e3, ' ms', 0)}, decode {fmt(x['median_decode_s'] * 1e3, ' ms', 0)}, "
                         f"encode {fmt(x['median_encode_s'] * 1e3, ' ms', 0)}; {x['mean_tokens']:.0f} tokens/answer |")
        lines.append(f"| MMAU-like run: time of [baseline + 5 α] / [baseline] (L* = {an.get('steer_layers')}) | "
                     f"{fmt(an.get('time_ratio'), '×', 2)} | | | | | {'cut short by the deadline' if an.get('cut_short') else ''} |")
    elif an.get("error") or r.get("status", {}).get("answerer"):
        lines.append(f"| MMAU-like run | {r.get('status', {}).get('answerer', {}).get('status', '')} | | | | | |")

    # bandwidth
    bw_rows = []
    for side, d in (("MLX", b16.get("bandwidth")), ("torch", th.get("bandwidth"))):
        if isinstance(d, dict) and "copy_Bps" in d:
            bw_rows.append(f"| {side} | {fmt(d['copy_Bps'] / 1e9, ' GB/s', 0)} | {fmt(d['sum_Bps'] / 1e9, ' GB/s', 0)} | "
                           f"{size(d['bytes'])} bf16 |")
    measured = max([d["copy_Bps"] for d in (b16.get("bandwidth"), th.get("bandwidth"))
                    if isinstance(d, dict) and "copy_Bps" in d] or [0]) or None
    lines += ["", "Memory bandwidth (device-to-device copy counts bytes read + written; sum reads once):", "",
              "| framework | copy | sum (read only) | buffer |", "|---|---|---|---|", *bw_rows,
              f"| nominal, H200 datasheet | {fmt(NOMINAL_BW / 1e9, ' GB/s', 0)} | | |"]

    lines += ["", "Decode as a share of the bandwidth limit: bytes per token = language-model weights (no "
              "embedding table) + bf16 KV cache at the decode's mean context; limit = bandwidth / bytes. "
              f"Divided by the measured copy bandwidth ({fmt(measured / 1e9 if measured else None, ' GB/s', 0)}, the "
              f"higher of MLX's and torch's) and by the nominal {NOMINAL_BW / 1e12:.1f} TB/s.", "",
              "| model | context | bytes/token | limit tok/s (measured / nominal) | achieved tok/s | share (measured / nominal) |",
              "|---|---|---|---|---|---|"]
    for tag, d, frameworks in (("bf16", b16, ("ours", "mlx_lm", "transformers")), ("4-bit", q4, ("ours", "mlx_lm"))):
        by = d.get("bytes")
        if not by:
            continue
        for clip_name, x in d.get("ab", {}).items():
            ctx = x["prompt_tokens"] + x["decode_tokens"] / 2
            nbytes = by["weights"] + by["kv_per_position"] * ctx
            lim_m = measured / nbytes if measured else None
            lim_n = NOMINAL_BW / nbytes
            for fw in frameworks:
                got = (th.get("ab", {}).get(clip_name, {}).get("decode_tok_s") if fw == "transformers"
                       else (x.get("decode_tok_s") or {}).get(fw))
                if got is None:
                    continue
                lines.append(f"| {tag} {fw} | {ctx:.0f} | {size(nbytes)} | {fmt(lim_m)} / {fmt(lim_n)} | {fmt(got)} | "
                             f"{fmt(100 * got / lim_m if lim_m else None, ' %', 0)} / {fmt(100 * got / lim_n, ' %', 0)} |")
    extra = [f"{k}: {', '.join(v['fallbacks'])}" for k, v in r.items() if isinstance(v, dict) and v.get("fallbacks")]
    if extra:
        lines += ["", "Fallbacks: " + "; ".join(extra)]
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.prepare_side:
        print(prepare_side(a.prepare_side, config_dict(a)))
        return
    if a.phase:  # child
        a.work.mkdir(parents=True, exist_ok=True)
        ph = Phase(a, a.phase)
        {"build": phase_build, "torch": phase_torch, "answerer": phase_answerer,
         "mlx-bf16": lambda a, ph: phase_mlx(a, ph, False), "mlx-q4": lambda a, ph: phase_mlx(a, ph, True)}[a.phase](a, ph)
        ph.save()
        return
    a.phases = [p for p in a.phases.split(",") if p]
    if bad := [p for p in a.phases if p not in PHASES]:
        raise SystemExit(f"unknown phase(s) {bad}; choose from {PHASES}")
    temp = a.work is None
    a.work = (a.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out = (a.out or Path(os.environ.get("OUT") or "bench-gpu-out")).resolve()
    if a.out == a.work or a.work in a.out.parents:
        raise SystemExit("--out must lie outside --work")
    try:
        run_phases(a)
    finally:
        if temp and not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
