"""Silent wrong numbers and late failures (issue 19, point 6), each reproduced as a new user would
meet it and checked fixed: a NaN forward pass is an error row, never a score; every setting is
checked before any model work and a run that fails at its start leaves nothing that refuses the
corrected rerun; head sets, vectors and head-means files from another model are refused; damaged
inputs are one `Error:` line, not a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok
from support.cli import data_args, eval_args, user_error

from mlx_listen.errors import ListenError

Q = "What is making this sound?"


def error_line(result, *words) -> str:
    """Exit 1, no traceback, the last stderr line one `Error:` line holding every word (a progress bar
    or a warning may come before it)."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and all(w in line for w in words), line
    return line


def other_model_heads(path, heads=((0, 1), (1, 3))):
    """A HEADS.json that says it was found on another model (its signature's weights differ)."""
    sig = {"config_hash": "not-this-model", "fingerprint": {}, "fingerprint_slices": {}}
    path.write_text(json.dumps({"heads": [list(h) for h in heads], "model_signature": sig, "prompt": "r1-aqa"}))
    return path


# -- NaN anywhere in a forward pass: an error row, never a score ---------------------------------

@pytest.mark.slow
def test_a_nan_forward_pass_is_an_error_row_not_a_score(demo, M, files, tmp_path):
    """`--alpha 1e308` overflows the steering edit: before, every option scored log-prob 0.0
    (`np.nansum`), the first option won and counted as correct. Now the steered rows are errors."""
    out = tmp_path / "run"
    res = invoke(*eval_args(demo, M, out, "--limit", 2, "--steer", files["H"], "--alpha", "1e308", "--compare",
                            "--score", "both"))
    error_line(res, "steered: no item could be answered", "not finite")
    rows = [json.loads(x) for x in (out / "steered" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("error" in r and "model_output" not in r and "option_logprobs" not in r
                                  for r in rows)
    base = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all("error" not in r and np.isfinite(r["option_logprobs"]).all() for r in base)
    sweep = invoke("steer", "sweep", "--heads", files["H"], *data_args(demo, M), "--limit", 6, "--alphas", "0,1e308",
                   "--random-controls", 0, "--out", tmp_path / "sweep", "--score", "logprob")
    error_line(sweep, "alpha=1e+308: no item could be answered", "not finite")


def test_scores_of_a_nan_row_stay_nan(tiny_gqa):
    import mlx.core as mx
    from support import tone

    from mlx_listen.answers import prefill
    from mlx_listen.eval.conditions import Answerer, steered
    from mlx_listen.eval.logprob import row_fields
    from mlx_listen.interp import scoring
    from mlx_listen.interp.edit import Row
    from mlx_listen.interp.steering import SteerConfig
    from mlx_listen.prompt import prepare

    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(1.0)], Q)
    options = scoring.option_ids(processor, prompt, ["Man", "Woman"], "r1-aqa")
    pre = prefill(model, prompt)
    nan = mx.full(pre.final.shape, float("nan"))
    lp = scoring.score_options(model, pre, options, [Row(), Row(nan)])
    assert np.isfinite(lp[0]).all() and np.isnan(lp[1]).all()  # was [0.0, 0.0]: the first option won
    with pytest.raises(ListenError, match="not finite"):
        row_fields({"id": "x", "choices": ["Man", "Woman"], "answer": "Man"}, lp[1])
    ans = Answerer(model, processor, [steered(SteerConfig(layers=[0, 1], alpha=1e308), "huge")], max_tokens=2)
    r = ans.respond(prompt, options)["huge"]
    assert r.error and "not finite" in r.error and r.answer is None and r.logprobs is None


# -- every check before any model work; no claim left by a run that never ran -------------------------

def test_experiment_settings_are_checked_before_any_work(demo, M, tmp_path):
    out = tmp_path / "exp"
    for extra, code in ((["--ablate-mode", "scale:nan"], 2), (["--ablate-mode", "abc"], 2),
                        (["--ablate-mode", "scale:1e999"], 2), (["--ablate-mode", "zero,zero"], 2),
                        (["--k", "99"], 1), (["--alphas", "0"], 1)):
        res = invoke("experiment", *data_args(demo, M), "--out", out, *extra)
        assert res.exit_code == code, (extra, res.output)
        assert "Traceback" not in res.output and not (out / "experiment.json").exists() and not (out / "base.jsonl").exists()


def test_a_run_that_fails_at_its_start_does_not_refuse_the_corrected_rerun(demo, M, files, tmp_path):
    """Before: `eval --steer` with heads the model lacks wrote run.json, then failed; the corrected
    rerun was refused ("holds a run with other settings"). Now the heads are checked first."""
    out = tmp_path / "run"
    user_error(invoke(*eval_args(demo, M, out, "--limit", 1, "--steer", files["far_layer"])), "do not exist")
    assert not (out / "run.json").exists()
    user_error(invoke(*eval_args(demo, M, out, "--limit", 1, "--listen", files["far_head"])), "--listen heads",
               "do not exist")  # was a traceback
    assert not (out / "run.json").exists()
    ok(invoke(*eval_args(demo, M, out, "--limit", 1, "--steer", files["H"])))


def test_provisional_claim_is_undone_only_when_nothing_was_recorded(tmp_path):
    from mlx_listen.records import append_jsonl, claim, provisional

    with pytest.raises(RuntimeError), provisional(tmp_path / "a" / "run.json"):
        claim(tmp_path / "a" / "run.json", {"x": 1})
        raise RuntimeError
    assert not (tmp_path / "a" / "run.json").exists()
    with pytest.raises(RuntimeError), provisional(tmp_path / "b" / "run.json"):
        claim(tmp_path / "b" / "run.json", {"x": 1})
        append_jsonl(tmp_path / "b" / "rows.jsonl", {"id": "i"})
        raise RuntimeError
    assert (tmp_path / "b" / "run.json").exists()  # records exist: the claim stays with them


# -- files from another model, damaged files --------------------------------------------------------

def test_head_sets_from_another_model_are_refused(demo, M, files, tmp_path):
    """Before: accepted silently by `attention --heads`, `patch --heads`, `steer inspect`."""
    H = other_model_heads(tmp_path / "other.json")
    user_error(invoke("attention", files["a"], Q, "--model", M, "--json", tmp_path / "a.json", "--heads", H),
               "another model", "--force")
    res = ok(invoke("attention", files["a"], Q, "--model", M, "--json", tmp_path / "a.json", "--heads", H, "--force"))
    assert "used anyway" in res.stderr and "used anyway" in json.loads((tmp_path / "a.json").read_text())["warnings"][0]
    user_error(invoke("patch", files["a"], Q, "--model", M, "--out", tmp_path / "p", "--heads", H), "another model")
    user_error(invoke("steer", "inspect", H, *data_args(demo, M, max_tokens=False), "--limit", 2), "another model")


@pytest.mark.parametrize("field, value", [("model_signature", "abc"), ("model_signature", [1, 2]),
                                          ("calibration_ids", "item-1"), ("calibration_ids", [1, 2])])
def test_heads_file_with_damaged_binding_is_one_line(M, files, tmp_path, field, value):
    H = tmp_path / "H.json"
    H.write_text(json.dumps({"heads": [[0, 1]], field: value}))
    user_error(invoke("attention", files["a"], Q, "--model", M, "--json", tmp_path / "a.json", "--heads", H),
               field, "damaged")


def test_heads_that_are_not_whole_numbers_are_refused(M, files, tmp_path):
    """Before: heads [1.5, 2] silently became (1, 2)."""
    H = tmp_path / "H.json"
    H.write_text(json.dumps({"heads": [[1.5, 2]]}))
    user_error(invoke("attention", files["a"], Q, "--model", M, "--json", tmp_path / "a.json", "--heads", H),
               "whole numbers")


def test_vector_with_a_damaged_signature_is_one_line(demo, M, files, tmp_path):
    import mlx.core as mx

    v = tmp_path / "v.safetensors"
    mx.save_safetensors(str(v), {"direction.1": mx.zeros((64,))}, metadata={"model_signature": "{not json"})
    user_error(invoke(*eval_args(demo, M, tmp_path / "run", "--limit", 1, "--vector", v)), "model_signature", "damaged")


def test_attention_json_under_a_file_is_one_line(M, files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    user_error(invoke("attention", files["a"], Q, "--model", M, "--json", blocker / "out.json"), "is a file")


@pytest.mark.slow
def test_head_means_record_their_model_and_a_name_the_tool_reads(demo, M, tmp_path, tiny_gqa):
    """Before: `ablate means --out X` wrote X, which the tool could not read, and recorded no model."""
    res = ok(invoke("ablate", "means", *data_args(demo, M, max_tokens=False), "--limit", 2, "--out", tmp_path / "X"))
    path = tmp_path / "X.safetensors"
    assert path.exists() and str(path) in res.stderr
    from mlx_listen.method.means import means_binding

    assert set(means_binding(path)["model_signature"]) >= {"config_hash", "fingerprint"}
    ok(invoke(*eval_args(demo, M, tmp_path / "run", "--limit", 1, "--ablate", "0.1", "--ablate-mode", "mean",
                         "--ablate-means", path)))
    import mlx.core as mx

    other = tmp_path / "other.safetensors"
    tensors, md = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(other), tensors, metadata={**md, "model_signature": json.dumps(
        {"config_hash": "another", "fingerprint": {}, "fingerprint_slices": {}})})
    error_line(invoke(*eval_args(demo, M, tmp_path / "run2", "--limit", 1, "--ablate", "0.1", "--ablate-mode", "mean",
                                 "--ablate-means", other)), "another model")


@pytest.mark.slow
def test_inspect_on_silent_clips_warns_and_writes_every_file(M, files, tmp_path, tiny_gqa):
    """Every clip silent: d(x) = 0 for every item. Before: a traceback and partial PNGs; now a warning
    and every file."""
    root = tmp_path / "silent"
    root.mkdir()
    items = []
    for i in range(3):
        sf.write(root / f"s{i}.wav", np.zeros(SR, np.float32), SR)
        items.append({"id": f"s{i}", "audio_id": f"s{i}.wav", "question": "What?", "choices": ["a", "b"],
                      "answer": "a", "task": "sound", "difficulty": "easy", "category": "c", "sub-category": "s"})
    (root / "d.json").write_text(json.dumps(items))
    out = tmp_path / "inspect"
    res = ok(invoke("steer", "inspect", files["H"], "--model", M, "--data", root / "d.json", "--audio-dir", root,
                    "--out", out))
    assert "3 of 3 items gave an all-zero direction" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["consistency.png", "inspect.json", "inspect.txt", "layers.png"]
