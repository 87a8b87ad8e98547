"""Benchmark `load_audio` + `audio_features` on hour-long files: the old whole-file decode vs the 30 s partial read.

Builds long WAVs on the fly in a temp folder (default: 3 h at 16 kHz mono and 3 h at 44.1 kHz stereo, PCM_16),
then, in one run, times `load_audio(path)` + `audio_features(...)` (log-mel evaluated) for

- **before**: `mlx_listen/audio.py` as committed at git HEAD (`git show HEAD:mlx_listen/audio.py`; or --before FILE);
- **after**: `mlx_listen/audio.py` of the working tree.

Each (file, code) pair runs in a fresh subprocess, twice: once for wall time and peak RSS (the growth of the
process's high-water mark over its value after imports and a warm-up), once under tracemalloc (peak of the
allocations Python and numpy track; soxr's and libsndfile's own buffers are only in RSS). Both sides' log-mels
are compared bit for bit. Both modules are loaded from copies of their files (with errors.py), so the package's
other imports don't weigh on either side.

    python benchmarks/bench_audio.py                   # 3 h files (~2 GB of temp disk, ~1.5 min on 2 cores)
    python benchmarks/bench_audio.py --hours 0.5       # quicker
    python benchmarks/bench_audio.py --exactness       # also: partial read vs whole-file resample, per rate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib, json, resource, sys, time, tracemalloc, warnings
import numpy as np
import mlx.core as mx
sys.path.insert(0, sys.argv[1])
mod = importlib.import_module(sys.argv[2] + ".audio")
path, mode, out = sys.argv[3], sys.argv[4], sys.argv[5]

def hwm_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

# warm-up: lazy imports, lru caches, MLX's first kernels
mx.eval(mod.audio_features(np.zeros(16000, np.float32), "warm-up").mel)
base = hwm_mb()
if mode == "tracemalloc":
    tracemalloc.start()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tic = time.perf_counter()
    f = mod.audio_features(mod.load_audio(path), "clip")
    mx.eval(f.mel)
    seconds = time.perf_counter() - tic
res = {"seconds": seconds, "rss_peak_mb": hwm_mb() - base, "rss_base_mb": base, "duration": f.duration,
       "n_tokens": f.n_tokens, "truncated": f.truncated, "seconds_used": getattr(f, "seconds_used", None),
       "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}
if mode == "tracemalloc":
    res["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
np.save(out, np.array(f.mel))
print(json.dumps(res))
"""


def write_long(path: Path, sr: int, seconds: float, channels: int, block_s: float = 60.0):
    """A tone plus noise, written block by block (the benchmark itself must not hold the file in memory)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        done, total = 0, int(round(sr * seconds))
        while done < total:
            n = min(int(sr * block_s), total - done)
            t = (done + np.arange(n)) / sr
            x = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((n, channels))
            f.write(x.astype(np.float32))
            done += n


def module_copy(root: Path, name: str, audio_src: str, errors_src: str):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "audio.py").write_text(audio_src)
    (pkg / "errors.py").write_text(errors_src)


def git_show(rel: str) -> str:
    return subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def run_child(tmp: Path, pkg: str, path: Path, mode: str) -> tuple[dict, np.ndarray]:
    out = tmp / f"{pkg}-{path.stem}-{mode}.npy"
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp), pkg, str(path), mode, str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{pkg} on {path.name} failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["stderr"] = [line for line in r.stderr.splitlines() if line.strip()]
    return res, np.load(out)


def exactness(rates=(8000, 11025, 22050, 24000, 32000, 44100, 48000, 96000), seconds=40.0):
    """Max |partial-read window - whole-file window| after resampling, for a few read margins (in source seconds)."""
    import soxr

    n = 480000
    rows = []
    for sr in rates:
        x = (0.1 * np.random.default_rng(sr).standard_normal(int(sr * seconds))).astype(np.float32)
        whole = soxr.resample(x, sr, 16000, quality="HQ")[:n]
        need = -(-n * sr // 16000)
        cells = []
        for margin in (0.0, 0.01, 0.1, 1.0):
            part = soxr.resample(x[: need + int(margin * sr)], sr, 16000, quality="HQ")[:n]
            d = float(np.abs(part - whole).max()) if part.shape[0] == n else float("nan")
            cells.append("bitwise" if d == 0 else f"{d:.1e}")
        rows.append((sr, cells))
    print("\n| source rate | margin 0 s | 0.01 s | 0.1 s | 1 s (used) |\n|---|---|---|---|---|")
    for sr, cells in rows:
        print(f"| {sr} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--before", type=Path, default=None,
                   help="old audio.py (default: git show HEAD:mlx_listen/audio.py)")
    p.add_argument("--exactness", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    try:
        before = args.before.read_text() if args.before else git_show("mlx_listen/audio.py")
        errors = (ROOT / "mlx_listen/errors.py").read_text()  # a superset of HEAD's: serves both sides
        module_copy(tmp, "before_listen", before, errors)
        module_copy(tmp, "after_listen", (ROOT / "mlx_listen/audio.py").read_text(), errors)
        seconds = args.hours * 3600
        files = [(tmp / "long16k_mono.wav", 16000, 1), (tmp / "long44k_stereo.wav", 44100, 2)]
        for path, sr, ch in files:
            write_long(path, sr, seconds, ch)
        rows = []
        for path, sr, ch in files:
            res, mels = {}, {}
            for pkg in ("before_listen", "after_listen"):  # alternate so page cache and load hit both alike
                timed, mels[pkg] = run_child(tmp, pkg, path, "time")
                traced, _ = run_child(tmp, pkg, path, "tracemalloc")
                timed["tracemalloc_peak_mb"] = traced["tracemalloc_peak_mb"]
                res[pkg] = timed
            same = np.array_equal(mels["before_listen"], mels["after_listen"])
            rows.append((path, sr, ch, res, same))

        size = {p.name: p.stat().st_size / 2**20 for p, _, _ in files}
        print(f"\n`python benchmarks/bench_audio.py --hours {args.hours:g}`; {os.cpu_count()} cores; "
              f"load_audio + audio_features (log-mel evaluated), one fresh process per cell\n")
        print("| file | code | time | peak RSS growth (over the warm-up peak) | tracemalloc peak "
              "| duration / used / tokens | log-mel |")
        print("|---|---|---|---|---|---|---|")
        for path, sr, ch, res, same in rows:
            for pkg, label in (("before_listen", "before (HEAD)"), ("after_listen", "after")):
                r = res[pkg]
                used = f"{r['seconds_used']:.1f}" if r["seconds_used"] is not None else "n/a"
                print(f"| {args.hours:g} h {sr / 1000:g} kHz {'mono' if ch == 1 else 'stereo'} PCM_16 "
                      f"({size[path.name]:.0f} MiB) | {label} | {r['seconds']:.2f} s | "
                      f"{r['rss_peak_mb']:.0f} MB (over {r['rss_base_mb']:.0f}) | "
                      f"{r['tracemalloc_peak_mb']:.0f} MiB | {r['duration']:.1f} s / {used} s / {r['n_tokens']} | "
                      f"{'identical' if same else 'DIFFERENT'} |")
        for path, sr, ch, res, same in rows:
            for pkg in ("before_listen", "after_listen"):
                shown = res[pkg]["warnings"] + res[pkg]["stderr"]
                print(f"{path.name}, {pkg.split('_')[0]}: " + ("; ".join(shown) if shown else "(no warning)"))
        if args.exactness:
            exactness()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
