"""Start-up time of the model-free commands, against the bare import of what they stand on.

Each command runs as a fresh subprocess (what a user waits for), round-robin over the commands
so load from other jobs hits all of them alike; the table gives the median of N runs and its
ratio to `python -c "import mlx.core, click, numpy"` timed in the same rounds:

- `mlx-listen --help`
- `mlx-listen eval score PREDICTIONS.jsonl` (a predictions file this script writes: N items in
  the JSONL layout `eval` writes)
- `mlx-listen make-demo-set DIR` (a fresh folder each run)

Then, once per command, which modules it imported (`sys.modules` at exit): none of the model code
(`mlx_listen.models.base` (the registry `mlx_listen.models` alone loads no MLX), `mlx_listen.load`, `mlx_lm`, `transformers`, `torch`) may be among them.
`--profile` adds `python -X importtime`'s heaviest imports per command.

    python benchmarks/bench_startup.py                 # 9 runs each (~15 s)
    python benchmarks/bench_startup.py --runs 21 --profile
    python benchmarks/bench_startup.py --tree /tmp/candidate   # a patched copy, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_CODE = ("mlx_listen.models.base", "mlx_listen.hooks", "mlx_listen.load", "mlx_lm", "transformers", "torch")
HEAVY = ("mlx", "mlx.core", "numpy", "scipy", "matplotlib", "soundfile", "soxr", "huggingface_hub", "tqdm", "click")
TASKS = ("sound", "music", "speech")
DIFFICULTIES = ("easy", "medium", "hard")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=9, help="timed runs per command (median reported)")
    p.add_argument("--items", type=int, default=1000, help="items in the predictions file (test-mini: 1000)")
    p.add_argument("--profile", action="store_true", help="also list each command's heaviest imports")
    p.add_argument("--tree", metavar="DIR", default=None,
                   help="also time the mlx-listen commands with DIR first on PYTHONPATH (a candidate change "
                        "in a copy of the repository), in the same rounds")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args()


def write_predictions(path: Path, n: int):
    """n rows in the layout `eval` writes to predictions.jsonl (what `eval score` reads)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            choices = ["dog", "cat", "bird", "car"]
            answer = choices[i % 4]
            out = rng.choice(choices)
            f.write(json.dumps({
                "id": f"item-{i}", "audio_id": f"./audio/{i}.wav", "question": "What is making this sound?",
                "choices": choices, "answer": answer, "task": TASKS[i % 3], "difficulty": DIFFICULTIES[i % 3],
                "category": "Reasoning", "sub-category": "Acoustic Source Inference", "prompt": "r1-aqa",
                "model_output": out, "model_prediction": out, "raw_output": f"<answer>{out}</answer>",
                "parsed": True, "condition": "base",
            }) + "\n")


def cli() -> list[str]:
    exe = shutil.which("mlx-listen") or str(Path(sys.executable).with_name("mlx-listen"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "mlx_listen"]


def commands(tmp: Path, env: dict, tree: str | None) -> dict[str, tuple[list[str], list[str] | None, dict]]:
    """name -> (argv to time, CLI args for the module check or None for the bare imports, env)."""
    preds = tmp / "predictions.jsonl"
    out = {
        "python -c pass (interpreter alone)": ([sys.executable, "-c", "pass"], None, env),
        "python -c 'import mlx.core, click, numpy'": ([sys.executable, "-c", "import mlx.core, click, numpy"], None,
                                                      env),
    }
    trees = [("", env)] + ([(f" [{tree}]", {**env, "PYTHONPATH": tree})] if tree else [])
    for tag, e in trees:
        out[f"mlx-listen --help{tag}"] = (cli() + ["--help"], ["--help"], e)
        out[f"mlx-listen eval score PREDICTIONS.jsonl{tag}"] = (cli() + ["eval", "score", str(preds)],
                                                               ["eval", "score", str(preds)], e)
        out[f"mlx-listen make-demo-set DIR{tag}"] = (cli() + ["make-demo-set", "{fresh}"], ["make-demo-set", "{fresh}"], e)
    return out


def fresh(argv: list[str], tmp: Path) -> list[str]:
    if not any("{fresh}" in a for a in argv):
        return argv
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="demo-"))
    shutil.rmtree(d)  # the command makes it
    return [a.replace("{fresh}", str(d)) for a in argv]


def run(argv: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: the child's user + system time) of one run, in `cwd` (a scratch
    folder: `python -c` puts the working directory first on sys.path)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    t = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr.decode()[-2000:]}")
    return t, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


WRAPPER = """import atexit, json, sys
def _dump():
    with open({out!r}, "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(_dump)
from mlx_listen.cli import main
main(args={args!r}, prog_name="mlx-listen")
"""


def imported(args: list[str], tmp: Path, env: dict, profile: bool) -> tuple[list[str], list[tuple[str, float]]]:
    """The modules a CLI run imported (sys.modules at exit) and, with `profile`, the heaviest
    top-level imports by cumulative time (ms) from `python -X importtime`."""
    out = tmp / "modules.json"
    code = WRAPPER.format(out=str(out), args=fresh(args, tmp))
    argv = [sys.executable] + (["-X", "importtime"] if profile else []) + ["-c", code]
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True, cwd=tmp)
    if r.returncode != 0:
        raise SystemExit(f"module check of {args} failed:\n{r.stderr[-2000:]}")
    heavy = []
    if profile:
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            cum_us, name = _fields(line)
            if not name.startswith(" "):  # a top-level import (nested ones are indented)
                heavy.append((name.strip(), int(cum_us) / 1e3))
        heavy.sort(key=lambda x: -x[1])
    return json.loads(out.read_text()), heavy[:8]


def _fields(line: str) -> tuple[str, str]:
    """(cumulative µs, package column with its nesting indent) of one `-X importtime` line."""
    _self_us, cum_us, name = line[len("import time:"):].split("|", 2)
    return cum_us.strip(), name[1:]  # one separating space; deeper imports keep their indent


def summarise(mods: list[str]) -> dict:
    ours = sorted(m for m in mods if m.startswith("mlx_listen"))
    top = sorted({m.split(".")[0] for m in mods} - set(sys.stdlib_module_names) - {"mlx_listen", "__main__"})
    bad = [b for b in MODEL_CODE if any(m == b or m.startswith(b + ".") for m in mods)]
    return {"mlx_listen": ours, "third_party": top, "model_code": bad,
            "mlx_core": "mlx.core" in mods, "n_modules": len(mods)}


def main():
    a = parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        write_predictions(tmp / "predictions.jsonl", a.items)
        cmds = commands(tmp, env, a.tree)
        names = list(cmds)
        for n in names:  # warm-up: page cache, .pyc files
            run(fresh(cmds[n][0], tmp), cmds[n][2], tmp)
        times, cpus = {n: [] for n in names}, {n: [] for n in names}
        for i in range(a.runs):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                t, c = run(fresh(cmds[n][0], tmp), cmds[n][2], tmp)
                times[n].append(t)
                cpus[n].append(c)
        bare = "python -c 'import mlx.core, click, numpy'"
        res = {"runs": a.runs, "items": a.items, "python": sys.version.split()[0], "cores": os.cpu_count(),
               "load_average": os.getloadavg()[0], "commands": {}}
        for n in names:
            med = statistics.median(times[n])
            cpu = statistics.median(cpus[n])
            row = {"median_s": med, "min_s": min(times[n]), "max_s": max(times[n]),
                   "ratio_to_bare_import": med / statistics.median(times[bare]),
                   "cpu_s": cpu, "cpu_ratio_to_bare_import": cpu / statistics.median(cpus[bare])}
            if cmds[n][1] is not None:
                mods, heavy = imported(cmds[n][1], tmp, cmds[n][2], a.profile)
                row.update(summarise(mods))
                if a.profile:
                    row["heaviest_imports_ms"] = heavy
            res["commands"][n] = row
        print(table(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(r: dict) -> str:
    lines = [f"median of {r['runs']} fresh processes each (round-robin), Python {r['python']}, {r['cores']} cores, "
             f"load average {r['load_average']:.1f} at the end; eval score on {r['items']} items\n",
             "| command | wall, median | min – max | ratio to bare import | CPU (user+sys), median | CPU ratio "
             "| imports mlx.core | model code imported |",
             "|---|---|---|---|---|---|---|---|"]
    for n, c in r["commands"].items():
        model = ("none" if not c["model_code"] else "**" + ", ".join(c["model_code"]) + "**") if "model_code" in c else ""
        mx_ = ("yes" if c["mlx_core"] else "no") if "mlx_core" in c else ""
        lines.append(f"| `{n}` | {c['median_s']:.3f} s | {c['min_s']:.3f} – {c['max_s']:.3f} s | "
                     f"{c['ratio_to_bare_import']:.2f}× | {c['cpu_s']:.3f} s | {c['cpu_ratio_to_bare_import']:.2f}× | "
                     f"{mx_} | {model} |")
    lines.append("")
    for n, c in r["commands"].items():
        if "mlx_listen" in c:
            lines.append(f"- `{n}`: {c['n_modules']} modules; mlx_listen: {', '.join(c['mlx_listen'])}; "
                         f"third-party: {', '.join(c['third_party']) or 'none'}")
            if c.get("heaviest_imports_ms"):
                lines.append("  heaviest top-level imports (cumulative ms): "
                             + ", ".join(f"{m} {t:.0f}" for m, t in c["heaviest_imports_ms"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
