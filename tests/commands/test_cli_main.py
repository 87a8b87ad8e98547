"""The `mlx-listen` group (`cli/__init__.py`): help and versions, the installed console script, and
the model-free commands staying model-free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import invoke, ok
from support.cli import api_answer, last_json

from mlx_listen import __version__

QUESTION = "What is this sound?"


def test_help_and_version():
    top = ok(invoke("--help")).stdout
    assert "ask" in top and "convert" in top and "--version" in top
    assert "--max-tokens" in ok(invoke("ask", "--help")).stdout
    assert "--q-bits" in ok(invoke("convert", "--help")).stdout
    assert ok(invoke("-h")).stdout == top
    assert ok(invoke("--version")).stdout.strip() == __version__
    import mlx.core as mx
    import mlx_lm

    v = ok(invoke("version")).stdout
    assert __version__ in v and mx.__version__ in v and mlx_lm.__version__ in v


@pytest.mark.slow
def test_console_script(tiny_gqa, clips):
    exe = Path(sys.executable).parent / "mlx-listen"
    exe = str(exe) if exe.exists() else shutil.which("mlx-listen")
    assert exe, "the mlx-listen console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([exe, "ask", str(clips["a"]), QUESTION, "--model", str(tiny_gqa.mlx_path),
                        "-m", "4", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    _, ans = api_answer(tiny_gqa.mlx, [clips["a"]], max_tokens=4)
    assert last_json(p.stdout)["tokens"] == ans.tokens
    assert "Prompt:" in p.stderr and "Generation:" in p.stderr and "Prompt:" not in p.stdout


MODEL_CODE = ("mlx_listen.models.base", "mlx_listen.hooks", "mlx_listen.load", "mlx.core", "mlx_lm", "transformers",
              "torch", "numpy")  # numpy too, but for make-demo-set, which synthesises audio with it


@pytest.mark.parametrize("cmd", ["--help", "eval score", "eval compare", "make-demo-set"])
def test_model_free_commands_import_no_model_code(cmd, tmp_path):
    """`eval score` once pulled in mlx-lm, transformers and torch (6.6 s for a JSONL re-score;
    0.27 s now, benchmarks/bench_startup.py): the run folder readers live in `records`/`mmau`."""
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": f"i{i}", "question": "q", "choices": ["a", "b"], "answer": "a",
                                         "task": "sound", "difficulty": "easy", "model_output": "a"}) + "\n"
                             for i in range(3)))
    args = {"--help": ["--help"], "eval score": ["eval", "score", str(preds)],
            "eval compare": ["eval", "compare", str(preds), str(preds)],
            "make-demo-set": ["make-demo-set", str(tmp_path / "demo"), "--per-kind", "1"]}[cmd]
    code = ("import sys, atexit\n"
            "from mlx_listen.cli import main\n"
            f"atexit.register(lambda: print('MODULES', *{MODEL_CODE!r}.__class__(m for m in {MODEL_CODE!r} "
            "if m in sys.modules), file=sys.stderr))\n"
            f"main({args!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("MODULES")]
    assert len(line) == 1, p.stderr
    imported = set(line[0].split()[1:]) - ({"numpy"} if cmd == "make-demo-set" else set())
    assert not imported, f"{cmd} imported model code: {sorted(imported)}"
