"""What the commands share (`cli/options.py`): numbers, alpha lists and task lists are checked as
usage errors (exit 2) before anything loads, and an empty data file is one `Error:` line for
every command that reads one."""

from __future__ import annotations

import json

import pytest
from support import invoke
from support.cli import MAXT, Q, data_args, eval_args, usage_error, user_error

ASK_BAD = [
    ["--steer", "{H}", "--alpha", "nan"], ["--steer", "{H}", "--alpha", "inf"], ["--steer", "{H}", "--alpha", "1e999"],
    ["--temp", "nan"], ["--temp", "-1"], ["--temp", "inf"], ["--top-p", "2"], ["--top-p", "nan"],
    ["--top-k", "-3"], ["--seed", "-1"], ["--min-p", "-1"], ["--min-p", "nan"], ["--repetition-penalty", "-1"],
    ["--repetition-penalty", "nan"],
]


@pytest.mark.parametrize("extra", ASK_BAD, ids=lambda e: " ".join(e[-2:]))
def test_ask_bad_numbers_are_usage_errors(M, files, no_load, extra):
    extra = [e.format(H=files["H"]) for e in extra]
    usage_error(invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, *extra), extra[-2])


@pytest.mark.parametrize("cmd, extra", [
    ("eval", ["--steer", "{H}", "--alpha", "nan"]), ("eval", ["--steer", "{H}", "--alpha", "inf"]),
    ("eval", ["--steer", "{H}", "--alpha", "-inf"]),
    ("sweep", ["--alphas", "nan,1"]), ("sweep", ["--alphas", "1,inf"]), ("sweep", ["--alphas", ""]),
    ("sweep", ["--alphas", ","]), ("sweep", ["--alphas", "1,x"]),
    ("build", ["--alpha", "nan"]),
], ids=lambda x: x if isinstance(x, str) else " ".join(x[-2:]))
def test_run_bad_numbers_are_usage_errors(demo, M, files, tmp_path, no_load, cmd, extra):
    extra = [e.format(H=files["H"]) for e in extra]
    out = tmp_path / "out"
    if cmd == "eval":
        args = eval_args(demo, M, out, *extra)
    elif cmd == "sweep":
        args = ["steer", "sweep", "--heads", files["H"], *data_args(demo, M), "--out", out, *extra]
    else:
        args = ["steer", "build", "--heads", files["H"], *data_args(demo, M, max_tokens=False), "--out", out, *extra]
    usage_error(invoke(*args), extra[-2])
    assert not out.exists()


def test_unknown_task_is_a_usage_error(demo, M, files, tmp_path, no_load):
    usage_error(invoke("steer", "sweep", "--heads", files["H"], *data_args(demo, M), "--out", tmp_path / "s",
                       "--task", "foo"), "unknown task foo")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["eval", "eval score", "eval score --data", "heads", "validate-heads",
                                     "steer build", "steer sweep"])
def test_an_empty_data_file_is_a_user_error(demo, M, files, tmp_path, command):
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n")
    root = demo[0]
    out = tmp_path / "out"
    if command == "eval":
        args = eval_args(demo, M, out, data=empty)
    elif command == "eval score":
        args = ["eval", "score", empty]
    elif command == "eval score --data":
        preds = tmp_path / "preds.json"
        preds.write_text(json.dumps([{**it, "model_output": it["answer"]} for it in demo[2][:3]]))
        args = ["eval", "score", preds, "--data", empty]
    elif command == "heads":
        args = ["heads", *data_args(demo, M, data=empty, audio_dir=root), "--out", tmp_path / "H.json"]
    elif command == "validate-heads":
        args = ["validate-heads", "--heads", files["H"], *data_args(demo, M, data=empty), "--out", out]
    elif command == "steer build":
        args = ["steer", "build", "--heads", files["H"], *data_args(demo, M, data=empty, max_tokens=False),
                "--out", out]
    else:
        args = ["steer", "sweep", "--heads", files["H"], *data_args(demo, M, data=empty), "--out", out]
    err = user_error(invoke(*args))
    assert "model_output" not in err and "split" not in err, err
    assert any(w in err for w in ("empty", "no items", "holds no")), err
