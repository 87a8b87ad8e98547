"""Checks of a command-line result (click's CliRunner keeps `result.stdout` and `result.stderr`
apart), and the arguments of the run commands on the tiny model with a few generated tokens.

The promise they check: every user error is one `Error:` line and exit 1 (usage errors exit 2),
no traceback, nothing on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

Q = "What is this sound?"
MAXT = 2  # generated tokens per answer in the bad-input runs: enough to run, no more


def user_error(result, *words) -> str:
    """Exit 1 through click (not an uncaught exception), one `Error:` line on stderr, nothing on
    stdout, no traceback; every word in that line."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == "", f"stdout not empty: {result.stdout!r}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def usage_error(result, *words) -> str:
    """Exit 2 (click's usage error), the last stderr line an `Error:`, every word on stderr."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for w in words:
        assert w in result.stderr, f"{w!r} not in {result.stderr!r}"
    return last


def warnings_of(result) -> list[str]:
    return [x for x in result.stderr.splitlines() if x.startswith("[WARNING]")]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.rstrip("\n").splitlines()[-1])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def audio_line(stderr: str) -> str:
    return next(x for x in stderr.splitlines() if x.startswith("Audio:"))


def eval_args(demo, model, out, *extra, data=None, audio_dir=None):
    """`mlx-listen eval` on the demo set (or `data`), MAXT tokens per answer."""
    root, default_data, _ = demo
    return ["eval", "--data", data or default_data, "--audio-dir", audio_dir or root, "--model", model,
            "--out", out, "--max-tokens", MAXT, *extra]


def data_args(demo, model, data=None, audio_dir=None, max_tokens=True):
    """The model and data options every run command shares."""
    root, default_data, _ = demo
    return ["--model", model, "--data", data or default_data, "--audio-dir", audio_dir or root,
            *(["--max-tokens", MAXT] if max_tokens else [])]


def assert_user_error(result, *words):
    """Like `user_error`, stricter on stderr: exactly one line (no blank line either)."""
    assert result.exit_code == 1, f"exit {result.exit_code}: {result.output}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def api_answer(model_and_processor, clip_paths, question=Q, **kw):
    """`(prompt, answer)` of the Python API for the same clips and question as a command."""
    from mlx_listen.answers import generate
    from mlx_listen.audio import load_audio
    from mlx_listen.prompt import prepare

    model, processor = model_and_processor
    prompt = prepare(model, processor, [load_audio(c) for c in clip_paths], question)
    return prompt, generate(model, processor, prompt, **kw)
