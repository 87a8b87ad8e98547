"""Peak memory and wall time of `mlx-listen convert` on a full-size random Qwen2-Audio-7B, old vs new.

1. Builds a random checkpoint with the hub's key names, torch layout (conv weights (out, in, k))
   and real shapes (config: tests/data/hub_config.json): bf16, 16.8 GB in 4 shards plus
   `model.safetensors.index.json`, with the tokenizer/processor files of a tiny checkpoint from
   `mlx_listen_convert.reference.tiny.build_tiny`. It is built shard by shard in MLX (never as a 33 GB fp32
   torch model), in a child process: on Linux a child's ru_maxrss starts at its parent's peak RSS
   (the forked memory map's high-water mark survives exec), so the measuring process must stay
   small (~20 MB; the table's footer says how small it was).
2. Converts it once per mode in a subprocess, with the working tree's `convert/convert.py`
   ("new") and with the last committed version that differs from it ("old", from
   `git show REV:convert/convert.py`, or --old-ref/--old-file), one conversion at a time, and
   reads each child's peak RSS from `os.wait4` (ru_maxrss). Before each conversion the source is
   read once through the page cache, and the two sides of a mode alternate which goes first.
3. Checks the two outputs of a mode are byte-identical (--no-verify skips it), deletes them, and
   prints a table. The checkpoint and outputs are deleted at the end unless --keep; with --keep
   and --out, a later run with the same --out reuses the checkpoint.

Peak RSS is the robust number (it repeats to within 0.1 GB). Wall time depends on the page cache,
on write-back of the previous run's GBs and on other load: on a shared 2-core machine the first
conversion of a pair was often 15-25 s slower than the second, whichever converter it was, so
compare wall times only over both orders (e.g. `--modes q4,q4`).

Other families (`--family audioflamingo3` or `qwen2_5_omni`): a full-size random Audio Flamingo 3 or
Qwen2.5-Omni-7B in the hub layout, with the working tree's converter only (the old one predates them).
Key names and torch-layout shapes come from transformers' own class for the family, instantiated on the
meta device (nothing allocated) from the full-size config, with the in-memory names mapped to the saved ones
and checked against a tiny checkpoint that `mlx_listen_convert.reference.tiny_families` saves with
`save_pretrained` (side files are copied from it). Omni's checkpoint holds the whole model: the thinker plus
`thinker.visual.*`, `talker.*` and `token2wav.*` at their 7B sizes, which the converter must drop
(`--dropped-layers N` cuts the dropped parts' depth, to save disk).

    python benchmarks/bench_convert.py                          # 4 modes, old and new: ~30 min, ~51 GB disk at once
    python benchmarks/bench_convert.py --family qwen2_5_omni --modes default,q4   # 21.5 GB in, ~38 GB disk at once
    python benchmarks/bench_convert.py --modes float16,q4 --only new
    python benchmarks/bench_convert.py --layers 2 --encoder-layers 2   # small smoke run (~4 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB_CONFIG = ROOT / "tests" / "data" / "hub_config.json"
CONVERTER = ROOT / "convert" / "convert.py"
MODES = {  # name → convert() keyword arguments (the CLI flags in the comment)
    "float16": {"dtype": "float16"},  # --dtype float16
    "default": {},  # no flag: keeps the checkpoint's bf16
    "q8": {"quantize": True, "q_bits": 8},  # -q --q-bits 8
    "q4": {"quantize": True},  # -q (4-bit, group 64)
}
FLAGS = {"float16": "--dtype float16", "default": "(default, bf16)", "q8": "-q --q-bits 8", "q4": "-q (4-bit)"}
SHARDS = 4
SHARD_BYTES = 5 << 30  # other families: shards of at most about this size (the hub's are ~4-5 GB)
FAMILY_NAMES = {"qwen2_audio": "qwen2-audio-7b", "audioflamingo3": "audio-flamingo-3", "qwen2_5_omni": "qwen2.5-omni-7b"}
LOW_MEMORY = 512 << 20  # kill a conversion when the machine's available memory drops below this

CHILD = """
import importlib.util, json, sys
import mlx_listen_convert  # the converter runs as a module of its package (relative imports)
spec = importlib.util.spec_from_file_location("mlx_listen_convert._converter_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.convert(sys.argv[2], sys.argv[3], progress=True, **json.loads(sys.argv[4]))
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="work folder for the checkpoint and the outputs (default: a new temp folder)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--only", choices=["old", "new"], help="run one converter only")
    p.add_argument("--old-ref", help="git revision of the old convert/convert.py "
                   "(default: the last commit whose file differs from the working tree's)")
    p.add_argument("--old-file", type=Path, help="the old converter as a file (instead of --old-ref)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the outputs")
    p.add_argument("--no-verify", action="store_true", help="skip the byte comparison of old and new outputs")
    p.add_argument("--no-warm", action="store_true", help="do not read the checkpoint through the page cache "
                   "before each conversion (by default every run starts with as much of it cached as fits)")
    p.add_argument("--layers", type=int, help="decoder layers (real: 32), for a smaller smoke run")
    p.add_argument("--encoder-layers", type=int, help="encoder layers (real: 32)")
    p.add_argument("--family", choices=list(FAMILY_NAMES), default="qwen2_audio",
                   help="which model to build (default: Qwen2-Audio-7B); the others run the new converter only")
    p.add_argument("--dropped-layers", type=int, help="Omni: layers of the talker, the vision tower and "
                   "token2wav's DiT (the parts the converter drops; real: 24, 32, 22)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--build-only", type=Path, metavar="DIR", help=argparse.SUPPRESS)  # the build child
    return p.parse_args()


# -- the random checkpoint -----------------------------------------------------------------------
def hub_shapes(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every checkpoint key → (shape in torch layout, dtype name), in module order.

    Read off our MLX model built (lazily, nothing allocated) from the config: its parameter
    names are the hub's, and its shapes are the hub's except the convs, which are stored
    transposed in torch layout.
    """
    from mlx.utils import tree_flatten

    from mlx_listen.models.qwen2_audio import Model, ModelConfig

    out = {}
    for k, v in tree_flatten(Model(ModelConfig.from_dict(config)).parameters()):
        shape = tuple(v.shape)
        if k.startswith("audio_tower.conv") and k.endswith(".weight"):
            shape = (shape[0], shape[2], shape[1])  # MLX (out, k, in) → torch (out, in, k)
        out[k] = shape
    return out


def tiny_reference(folder: Path) -> set[str]:
    """A tiny checkpoint from `build_tiny` (its side files are copied); → its key names."""
    import mlx.core as mx

    from mlx_listen_convert.reference.tiny import build_tiny

    build_tiny(folder)
    return set(mx.load(str(folder / "model.safetensors")))


def layer_pattern(key: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", key)


def build_checkpoint(folder: Path, layers: int | None, encoder_layers: int | None) -> dict:
    config = json.loads(HUB_CONFIG.read_text())
    if layers:
        config["text_config"]["num_hidden_layers"] = layers
    if encoder_layers:
        config["audio_config"]["encoder_layers"] = encoder_layers
    shapes = hub_shapes(config)
    tiny = folder.parent / f"{folder.name}-tiny"
    keys = tiny_reference(tiny)
    if {layer_pattern(k) for k in keys} != {layer_pattern(k) for k in shapes}:
        raise SystemExit(f"key layout differs from save_pretrained's: "
                         f"{sorted({layer_pattern(k) for k in keys} ^ {layer_pattern(k) for k in shapes})}")
    folder.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy2(f, folder / f.name)
    shutil.rmtree(tiny)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return write_random(folder, shapes, SHARDS)


def write_random(folder: Path, shapes: dict, shards: int) -> dict:
    """Random bf16 tensors of `shapes` in `shards` safetensors files plus the index, in key order."""
    import mlx.core as mx

    # Random bf16 values: slices of a 64 Mi-value N(0, 0.02) pool at random offsets (normal
    # sampling on a CPU takes minutes for 8.4 B values; the converter's work does not depend on
    # the values).
    pool = mx.random.normal((1 << 26,), dtype=mx.bfloat16, scale=0.02)
    mx.eval(pool)
    sizes = {k: math.prod(s) * 2 for k, s in shapes.items()}
    total = sum(sizes.values())
    parts, acc = [[] for _ in range(shards)], 0
    for k in shapes:  # contiguous, about equal byte counts
        parts[min(shards - 1, acc * shards // total)].append(k)
        acc += sizes[k]
    parts = [p for p in parts if p]  # (a cut-down smoke model may not fill 4)
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    for i, part in enumerate(parts):
        t = time.perf_counter()
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        shard = {}
        for k in part:
            n = math.prod(shapes[k])
            start = int(mx.random.randint(0, pool.size, ()).item())
            reps = -(-(start + n) // pool.size)
            flat = mx.concatenate([pool] * reps) if reps > 1 else pool
            shard[k] = flat[start:start + n].reshape(shapes[k])
            mx.eval(shard[k])
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(part, name))
        nbytes = sum(sizes[k] for k in part)
        del shard
        print(f"  {name}: {len(part)} tensors, {nbytes / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s", flush=True)
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": len(shapes), "bytes": total, "shards": len(parts)}


# Full-size dimensions (the hub configs of nvidia/audio-flamingo-3-hf and Qwen/Qwen2.5-Omni-7B). The
# decoder of both is Qwen2-7B's; the encoder Whisper-large-v3's.
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6)
ENCODER = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
               max_source_positions=1500, num_mel_bins=128)
OMNI_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=112)
OMNI_TALKER = dict(hidden_size=896, intermediate_size=18944, num_hidden_layers=24, num_attention_heads=12,
                   num_key_value_heads=4, head_dim=128, vocab_size=8448, embedding_size=3584)
# transformers' in-memory names → the saved (hub) names, first match
SAVED_NAMES = {
    "audioflamingo3": [("model.language_model.", "language_model.model."), ("model.audio_tower.", "audio_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")],
    "qwen2_5_omni": [("thinker.model.audio_tower.", "thinker.audio_tower."), ("thinker.model.visual.", "thinker.visual."),
                     ("thinker.model.language_model.", "thinker.model.")],
}


def saved_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            out.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return out


def full_size_config(family: str, config: dict, layers, encoder_layers, dropped_layers) -> dict:
    """The tiny checkpoint's config.json (its token ids and style) at the real model's sizes."""
    text = dict(QWEN2_7B, vocab_size=151936 if family == "audioflamingo3" else 152064)
    if layers:
        text["num_hidden_layers"] = layers
    audio = dict(ENCODER, **({"encoder_layers": encoder_layers} if encoder_layers else {}))
    if family == "audioflamingo3":  # transformers-5 names in audio_config, as the hub's
        config["text_config"].update(text)
        config["text_config"].pop("layer_types", None)  # per layer: transformers rebuilds it for the new depth
        config["audio_config"].update(hidden_size=audio["d_model"], num_hidden_layers=audio["encoder_layers"],
                                      num_attention_heads=audio["encoder_attention_heads"],
                                      intermediate_size=audio["encoder_ffn_dim"], max_source_positions=1500)
        return config
    th = config["thinker_config"]
    th["text_config"].pop("layer_types", None)
    config["talker_config"].pop("layer_types", None)
    th["text_config"].update(text, rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default",
                                                 "type": "default"})
    th["audio_config"].update(audio, n_window=100, output_dim=3584)
    th["vision_config"].update(OMNI_VISION, **({"depth": dropped_layers,
                                               "fullatt_block_indexes": [dropped_layers - 1]} if dropped_layers else {}))
    talker = config["talker_config"]
    talker.update(OMNI_TALKER, **({"num_hidden_layers": dropped_layers} if dropped_layers else {}))
    talker["rope_scaling"] = {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}
    # token2wav at transformers' defaults (the 7B's DiT and BigVGAN), its DiT's depth cut if asked
    config["token2wav_config"] = {"dit_config": {"num_hidden_layers": dropped_layers} if dropped_layers else {},
                                  "bigvgan_config": {}}
    return config


def build_family_checkpoint(folder: Path, family: str, layers, encoder_layers, dropped_layers) -> dict:
    """A full-size random AF3 or Qwen2.5-Omni-7B in the hub layout (see the module docstring)."""
    import torch
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoConfig, Qwen2_5OmniForConditionalGeneration

    from mlx_listen_convert.reference import tiny_families

    tiny = folder.parent / f"{folder.name}-tiny"
    shutil.rmtree(tiny, ignore_errors=True)
    if family == "audioflamingo3":
        tiny_families.build_tiny_af3(tiny)
    else:
        tiny_families.build_tiny_omni(tiny)
    tiny_keys = saved_keys(tiny)
    config = full_size_config(family, json.loads((tiny / "config.json").read_text()), layers, encoder_layers,
                              dropped_layers)
    folder.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.name != "config.json" and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, folder / f.name)
    shutil.rmtree(tiny)
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    cls = AudioFlamingo3ForConditionalGeneration if family == "audioflamingo3" else Qwen2_5OmniForConditionalGeneration
    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = cls(cfg)
    shapes = {}
    for k, v in model.state_dict().items():
        for old, new in SAVED_NAMES[family]:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        shapes[k] = tuple(v.shape)
    del model

    def pattern(k):
        return re.sub(r"\.\d+(?=\.)", ".N", k)

    if {pattern(k) for k in tiny_keys} != {pattern(k) for k in shapes}:
        raise SystemExit(f"key layout differs from save_pretrained's: "
                         f"{sorted({pattern(k) for k in tiny_keys} ^ {pattern(k) for k in shapes})[:20]}")
    if any(len(tiny_keys[k]) != len(s) for k, s in shapes.items() if k in tiny_keys):
        raise SystemExit("tensor ranks differ from save_pretrained's")
    total = sum(math.prod(s) * 2 for s in shapes.values())
    info = write_random(folder, shapes, max(1, -(-total // SHARD_BYTES)))
    prefixes = ("talker.", "token2wav.", "thinker.visual.", "thinker.audio_tower.audio_bos_eos_token.")
    dropped = [k for k in shapes if k.startswith(prefixes)]
    info.update(family=family, dropped_tensors=len(dropped),
                dropped_bytes=sum(math.prod(shapes[k]) * 2 for k in dropped),
                params=sum(math.prod(s) for s in shapes.values()))
    return info


# -- the old converter ---------------------------------------------------------------------------
def git(*args) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def old_converter(a, work: Path) -> tuple[Path, str]:
    """The old convert.py as a file, and where it came from."""
    if a.old_file:
        return a.old_file.resolve(), str(a.old_file)
    rel = str(CONVERTER.relative_to(ROOT))
    current = CONVERTER.read_text()
    revs = [a.old_ref] if a.old_ref else git("log", "--format=%H", "--", rel).split()
    for rev in revs:
        text = git("show", f"{rev}:{rel}")
        if text != current or a.old_ref:
            path = work / "old_convert.py"
            path.write_text(text)
            return path, f"git {rev[:12]}:{rel}"
    raise SystemExit(f"no committed {rel} differs from the working tree's; pass --old-ref or --old-file")


# -- measuring -----------------------------------------------------------------------------------
def available_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def run_converter(module: Path, src: Path, out: Path, options: dict, log: Path) -> dict:
    """One conversion in a child process → peak RSS (bytes), wall time, exit status."""
    t = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(module), str(src), str(out), json.dumps(options)],
                                 stdout=subprocess.DEVNULL, stderr=err)
    killed = []

    def guard():  # the old converter can use most of a 24 GB machine: never let it push it over
        while child.returncode is None:
            free = available_memory()
            if free is not None and free < LOW_MEMORY:
                killed.append(free)
                child.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=guard, daemon=True).start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    text = log.read_text()
    bpw = re.findall(r"Quantized model with ([\d.]+) bits per weight", text)
    result = {"peak_rss": rss, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rc": child.returncode,
              "bpw": float(bpw[-1]) if bpw else None}
    if killed:
        result["error"] = f"killed: available memory fell to {killed[0] / 2**30:.2f} GiB"
    elif child.returncode != 0:
        result["error"] = f"exit {child.returncode}: {text.strip().splitlines()[-1] if text.strip() else ''}"
    else:
        result["out_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return result


def same_files(a: Path, b: Path, chunk: int = 1 << 20) -> str | None:
    """None if the folders hold byte-identical files, else what differs."""
    names = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    if names[0] != names[1]:
        return f"files differ: {names[0]} vs {names[1]}"
    for name in names[0]:
        with open(a / name, "rb") as fa, open(b / name, "rb") as fb:
            while True:
                x, y = fa.read(chunk), fb.read(chunk)
                if x != y:
                    return f"{name} differs"
                if not x:
                    break
    return None


def table(rows: list[dict], sides: list[str]) -> str:
    def rss(r, s):
        return r[s].get("error") or f"{r[s]['peak_rss'] / 1e9:.2f} GB"

    both = sides == ["old", "new"]
    head = ["mode", *[f"peak RSS {s}" for s in sides]] + (["new / old"] if both else [])
    head += [f"wall (CPU) {s}" for s in sides] + ["output size", "bits/weight"] + (["old == new"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = all("error" not in r[s] for s in sides)
        cells = [f"`{FLAGS[r['mode']]}`", *[rss(r, s) for s in sides]]
        if both:
            cells.append(f"{r['new']['peak_rss'] / r['old']['peak_rss']:.2f}" if ok else "-")
        cells += [f"{r[s]['wall_s']:.0f} s ({r[s]['cpu_s']:.0f} s)" for s in sides]
        size = next((r[s]["out_bytes"] for s in sides if "out_bytes" in r[s]), None)
        cells.append(f"{size / 1e9:.2f} GB" if size else "-")
        cells.append(next((f"{r[s]['bpw']:.3f}" for s in reversed(sides) if r[s].get("bpw")), "-"))
        if both:
            cells.append("not checked" if "same" not in r else "byte-identical" if r["same"] is None else r["same"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    a = parse_args()
    if a.build_only:
        if a.family == "qwen2_audio":
            info = build_checkpoint(a.build_only, a.layers, a.encoder_layers)
        else:
            info = build_family_checkpoint(a.build_only, a.family, a.layers, a.encoder_layers, a.dropped_layers)
        (a.build_only / "bench-info.json").write_text(json.dumps(info))
        return
    modes = a.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    work = a.out or Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    sides = [a.only] if a.only else ["old", "new"]
    if a.family != "qwen2_audio":  # the old converter predates the other families
        sides = ["new"]
    converters = {"new": (CONVERTER, f"working tree {CONVERTER.relative_to(ROOT)}")}
    if "old" in sides:
        converters["old"] = old_converter(a, work)
    src = work / f"{FAMILY_NAMES[a.family]}-random"
    rows, info = [], {}
    try:
        if (src / "bench-info.json").exists():
            print(f"Reusing the checkpoint in {src}", flush=True)
            info = json.loads((src / "bench-info.json").read_text())
        else:
            print(f"Building a random checkpoint in {src}", flush=True)
            shutil.rmtree(src, ignore_errors=True)
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--build-only", str(src)]
            cmd += ["--layers", str(a.layers)] if a.layers else []
            cmd += ["--encoder-layers", str(a.encoder_layers)] if a.encoder_layers else []
            cmd += ["--family", a.family] + (["--dropped-layers", str(a.dropped_layers)] if a.dropped_layers else [])
            subprocess.run(cmd, check=True)
            info = json.loads((src / "bench-info.json").read_text())
            print(f"  {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
        for i, mode in enumerate(modes):
            row = {"mode": mode}
            order = sides if i % 2 == 0 else sides[::-1]
            for side in order:
                out = work / f"out-{mode}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                if not a.no_warm:  # in a child: a read buffer here would raise every child's RSS floor
                    subprocess.run(["cat", *map(str, sorted(src.glob("model*.safetensors")))],
                                   stdout=subprocess.DEVNULL, check=True)
                r = run_converter(converters[side][0], src, out, MODES[mode], work / f"{mode}-{side}.log")
                row[side] = r
                status = r.get("error") or f"peak RSS {r['peak_rss'] / 1e9:.2f} GB"
                print(f"{mode:8} {side}: {status}, {r['wall_s']:.0f} s (CPU {r['cpu_s']:.0f} s)", flush=True)
            outs = [work / f"out-{mode}-{s}" for s in sides]
            if len(sides) == 2 and not a.no_verify and all("error" not in row[s] for s in sides):
                row["same"] = same_files(*outs)
                print(f"{mode:8} outputs: {row['same'] or 'byte-identical'}", flush=True)
            if not a.keep:
                for o in outs:
                    shutil.rmtree(o, ignore_errors=True)
            rows.append(row)
    finally:
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
            if a.out is None:
                shutil.rmtree(work, ignore_errors=True)

    from importlib.metadata import version

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print()
    print(f"Checkpoint: {info.get('tensors')} tensors, {info.get('bytes', 0) / 1e9:.2f} GB bf16 in "
          f"{info.get('shards')} shards"
          + (f" ({info['params'] / 1e9:.2f} B parameters, {info['family']})" if info.get("params") else "")
          + (f", of which {info['dropped_tensors']} tensors ({info['dropped_bytes'] / 1e9:.2f} GB) the converter must "
             f"drop" if info.get("dropped_tensors") else "") + ". Converters: " + "; ".join(f"{s} = {converters[s][1]}" for s in sides) + ".")
    print(f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')) / 2**30:.0f} GiB, mlx {version('mlx')}. "
          f"Peak RSS = each child's ru_maxrss (floor: this process's own peak, {own / 1e6:.0f} MB); "
          f"CPU = its user + system time.")
    print()
    print(table(rows, sides))
    if a.json:
        a.json.write_text(json.dumps({"checkpoint": info, "converters": {s: converters[s][1] for s in sides},
                                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
