"""Log-prob scoring of a run (`eval/logprob.py`): the answer's option index, `eval --score`
(logprob and both), and `--score` / `heads --target margin` on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import invoke, ok

from mlx_listen.eval import logprob
from mlx_listen.interp import scoring


def test_answer_index():
    assert logprob.answer_index({"choices": ["a", " b "], "answer": "b"}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["both", "logprob"])
def test_eval_score_modes(tiny_gqa, tmp_path, mode):
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.eval.evaluate import EvalSpec, run_eval
    from mlx_listen.records import read_predictions

    demo = make_demo_set(tmp_path / "demo", n_per_kind=1)
    spec = EvalSpec(demo, demo.parent, str(tiny_gqa.mlx_path), tmp_path / "run", limit=4, max_tokens=4, score=mode)
    report = run_eval(spec, progress=False)["base"]
    rows = read_predictions(tmp_path / "run")
    assert len(rows) == 4
    for r in rows:
        assert len(r["option_logprobs"]) == len(r["choices"]) and np.isfinite(r["margin"])
        assert r["logprob_choice"] == scoring.choice(r["option_logprobs"])
        assert r["logprob_correct"] == (r["logprob_choice"] == logprob.answer_index(r))
        if mode == "logprob":
            assert r["model_output"] == r["choices"][r["logprob_choice"]] and "raw_output" not in r
        else:
            assert "raw_output" in r
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lp = summary["logprob"]
    assert summary["score"] == mode and lp["n"] == 4
    assert lp["accuracy"]["overall"] == sum(r["logprob_correct"] for r in rows) / 4
    assert ("generation_accuracy" in lp) == (mode == "both") and report.logprob == lp
    assert "log-prob accuracy" in logprob.summary_line(lp)
    # resuming with another scoring mode is refused (the run's identity holds it)
    from mlx_listen.errors import ListenError

    other = EvalSpec(demo, demo.parent, str(tiny_gqa.mlx_path), tmp_path / "run", limit=4, max_tokens=4)
    with pytest.raises(ListenError):
        run_eval(other, progress=False)


@pytest.mark.slow
def test_cli_score_and_target(tiny_gqa, tmp_path):

    from mlx_listen.eval.demo_set import make_demo_set

    demo = make_demo_set(tmp_path / "demo", n_per_kind=1)
    common = ["--data", demo, "--audio-dir", demo.parent, "--model", tiny_gqa.mlx_path, "-m", 3, "--limit", 7]
    r = ok(invoke("eval", *common, "--out", tmp_path / "run", "--score", "both"))
    assert "log-prob accuracy" in r.output and "generation" in r.output
    r = ok(invoke("heads", *common, "--out", tmp_path / "H.json", "--k", 2, "--target", "margin", "--n-perm", 20))
    meta = json.loads((tmp_path / "H.json").read_text())
    assert meta["criterion"] == "correct-option log-prob margin"
