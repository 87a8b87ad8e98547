"""What each quantisation mode does to listening, on one random model: `mlx-listen quant-drift` of every
mode's conversion against the float reference, on the demo set (issue 21's drift table).

1. Builds a random Qwen2-Audio checkpoint with transformers (`mlx_listen_convert.reference.tiny.build_tiny`)
   at the widths given (default: hidden 1024, 16 heads, intermediate 2816, 4 layers; the tower stays
   float in every mode, so its width only costs time) and a vocabulary of the test tokenizer.
2. Converts it once in float32 (the reference) and once per mode (group sizes: each mode's default).
3. Runs `mlx-listen quant-drift --reference REF -M MODE… --heads H` on `make-demo-set` items with a
   hand-made head set (the heads spread over the layers), and prints its table.

Random weights: a random model's logits are flat and its heads carry no audio signal, so the table
says how far each mode moves the numbers, not what real weights would do.

    python benchmarks/bench_drift.py                              # ~20 min on a shared 2-core CPU
    python benchmarks/bench_drift.py --hidden 256 --layers 2 --modes affine8,affine4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "affine8": dict(q_bits=8), "affine4": dict(), "affine3": dict(q_bits=3), "mixed_3_6": dict(quant_predicate="mixed_3_6"),
    "mxfp8": dict(q_mode="mxfp8"), "mxfp4": dict(q_mode="mxfp4"), "nvfp4": dict(q_mode="nvfp4"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--per-kind", type=int, default=1, help="demo items per kind (7 kinds)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=None, help="work folder (default: a temp folder, deleted)")
    a = p.parse_args()

    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    tmp = None if a.out else tempfile.TemporaryDirectory()
    root = Path(a.out or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    if not (root / "hf" / "config.json").exists():
        build_tiny(root / "hf", hidden=a.hidden, heads=a.heads, kv_heads=a.heads, intermediate=a.intermediate,
                   layers=a.layers, encoder_layers=1, encoder_heads=4, d_model=256, encoder_ffn=512, init_range=0.02)
    ref = root / "ref"
    if not ref.exists():
        convert(str(root / "hf"), str(ref), dtype="float32", progress=False)
    models = []
    for mode in a.modes.split(","):
        out = root / mode
        if not out.exists():
            convert(str(root / "hf"), str(out), quantize=True, progress=False, **MODES[mode])
        models += ["-M", str(out)]
    demo = make_demo_set(root / "demo", n_per_kind=a.per_kind)
    heads = root / "H.json"
    L = a.layers
    heads.write_text(json.dumps({"heads": [[l, h] for l in range(L) for h in (0, a.heads // 2)][:6]}))
    print(f"built and converted in {time.perf_counter() - tic:.0f} s; running quant-drift", file=sys.stderr)
    cmd = [sys.executable, "-m", "mlx_listen", "quant-drift", "--reference", str(ref), *models, "--heads", str(heads),
           "--data", str(demo), "--audio-dir", str(demo.parent), "--out", str(root / "drift"), "-m", str(a.max_tokens),
           "--k", "6"]
    subprocess.run(cmd, check=True)
    print(f"model: hidden {a.hidden}, {a.heads} heads (MHA), intermediate {a.intermediate}, {a.layers} layers; "
          f"{7 * a.per_kind} demo items; {time.perf_counter() - tic:.0f} s in all")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
