"""Durable run records (`mlx_listen.records`) through every resumable command: an item that fails
is recorded with its error and the run goes on (also on resume); a run folder is bound to the
weights it ran with, under any spelling of their path, and refuses other weights, damaged
identity files and a second process; a model-wide failure does not poison a rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok, tone
from support.checkpoints import model_copy
from support.cli import data_args, eval_args, jsonl, user_error, warnings_of
from support.heads import parity

from mlx_listen.eval import mmau


@pytest.fixture(scope="module")
def bad_set(demo, tmp_path_factory):
    """7 demo items (one per kind) with a too-short clip at position 1 and a NaN clip at the end."""
    root, _, items = demo
    d = tmp_path_factory.mktemp("badset")
    (d / "audios").mkdir()
    good = [dict(it) for it in items[:7]]
    for it in good:
        shutil.copy(root / it["audio_id"], d / it["audio_id"])
    sf.write(d / "audios" / "short.wav", tone(100 / SR), SR)
    sf.write(d / "audios" / "nan.wav", np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    short = {**items[7], "id": "bad-short", "audio_id": "./audios/short.wav"}
    nan = {**items[8], "id": "bad-nan", "audio_id": "./audios/nan.wav"}
    data = d / "bad.json"
    data.write_text(json.dumps([good[0], short, *good[1:], nan]))
    return d, data, [it["id"] for it in good], {"bad-short": "too short", "bad-nan": "NaN"}


def _check_failed_rows(rows: list[dict], bad: dict):
    by_id = {r["id"]: r for r in rows}
    for i, why in bad.items():
        if i in by_id:
            assert "error" in by_id[i] and why in by_id[i]["error"], by_id[i]
            assert "model_output" not in by_id[i], by_id[i]


def _check_eval_dir(run: Path, good: list[str], bad: dict):
    rows = jsonl(run / "predictions.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(good + list(bad))
    _check_failed_rows(rows, bad)
    assert all("model_output" in r for r in rows if r["id"] in good)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n"] == len(good) and summary["n_failed"] == len(bad)
    assert sorted(f["id"] for f in summary["failed"]) == sorted(bad)
    official = json.loads((run / "predictions.json").read_text())
    assert sorted(r["id"] for r in official) == sorted(good)
    assert "left out" in summary["official_json_note"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "eval-steered", "eval-compare", "heads", "validate-heads", "steer-build",
                                     "steer-sweep"])
def test_a_bad_item_is_recorded_and_the_run_goes_on(demo, M, files, bad_set, tmp_path, monkeypatch, command):
    d, data, good, bad = bad_set
    common = data_args(demo, M, data=data, audio_dir=d)
    out = tmp_path / "out"
    if command.startswith("eval"):
        extra = {"eval": [], "eval-steered": ["--steer", files["H"], "--alpha", "1"],
                 "eval-compare": ["--steer", files["H"], "--alpha", "1", "--compare"]}[command]
        args = ["eval", *common, "--out", out, *extra]
    elif command == "heads":
        monkeypatch.setattr(mmau, "string_match", parity)
        out = tmp_path / "HEADS.json"
        args = ["heads", *common, "--out", out, "--k", 2]
    elif command == "validate-heads":
        args = ["validate-heads", "--heads", files["H"], *common, "--out", out]
    elif command == "steer-build":
        out = tmp_path / "v.safetensors"
        args = ["steer", "build", "--heads", files["H"], *data_args(demo, M, data=data, audio_dir=d, max_tokens=False),
                "--out", out]
    else:
        args = ["steer", "sweep", "--heads", files["H"], *common, "--out", out, "--alphas", "0,1",
                "--random-controls", 0]

    for attempt in ("first run", "resume")[: 1 if command == "steer-build" else 2]:  # build does not resume
        res = invoke(*args)
        assert res.exit_code == 0, f"{attempt}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
        if command.startswith("eval"):
            assert f"failed items (not scored): {len(bad)}" in res.stdout
            _check_eval_dir(out, good, bad)
            if command == "eval-compare":
                _check_eval_dir(out / "steered", good, bad)
                assert f"{len(good)} paired items" in res.stdout
        elif command == "heads":
            rows = jsonl(tmp_path / "HEADS.items.jsonl")
            _check_failed_rows(rows, bad)
            assert sorted(r["id"] for r in rows if "error" in r) == sorted(bad)
            assert json.loads(out.read_text())["n_items"] == len(good)
            assert any(f"{len(bad)} items could not be used" in w for w in warnings_of(res)), res.stderr
        elif command == "validate-heads":
            rows = jsonl(out / "items.jsonl")
            _check_failed_rows(rows, bad)
            assert sorted(r["id"] for r in rows if "error" in r) == sorted(bad)
            assert json.loads((out / "validation.json").read_text())["n"] == len(good)
        elif command == "steer-build":
            from mlx_listen.method.directions import load_vector

            md = load_vector(out)[2]
            cal = json.loads(md["calibration"])
            assert cal["n_items"] == len(good) and sorted(f["id"] for f in cal["failed"]) == sorted(bad)
            assert any(f"{len(bad)} items could not be used" in w for w in warnings_of(res)), res.stderr
        else:
            seen = set()
            for split in ("calibration", "test"):
                for f in (out / split).rglob("predictions.jsonl"):
                    rows = jsonl(f)
                    _check_failed_rows(rows, bad)
                    seen |= {r["id"] for r in rows if "error" in r}
            assert seen == set(bad)
            assert (out / "sweep.json").exists()


@pytest.mark.slow
def test_resume_accepts_any_spelling_of_the_same_model_folder(demo, M, tmp_path, monkeypatch):
    model = tmp_path / "tiny-mlx"
    shutil.copytree(M, model)
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, model, out, "--limit", 1)))  # absolute path
    monkeypatch.chdir(tmp_path)
    ok(invoke(*eval_args(demo, "./tiny-mlx", out, "--limit", 2)))
    ok(invoke(*eval_args(demo, "tiny-mlx/", out, "--limit", 3)))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ok(invoke(*eval_args(demo, "../tiny-mlx", out, "--limit", 4)))
    (tmp_path / "link").symlink_to(model)
    ok(invoke(*eval_args(demo, tmp_path / "link", out, "--limit", 5)))
    ok(invoke(*eval_args(demo, M, out, "--limit", 6)))  # a byte-identical copy elsewhere: same weights
    ids = [r["id"] for r in jsonl(out / "predictions.jsonl")]
    assert ids == [it["id"] for it in demo[2][:6]]


def _perturb_safetensors(path: Path, pick, scale=1e-3):
    from safetensors.numpy import load_file, save_file

    w = load_file(str(path))
    rng = np.random.default_rng(0)
    w = {k: (v + scale * rng.standard_normal(v.shape).astype(v.dtype)) if pick(k) and v.dtype.kind == "f" else v
         for k, v in w.items()}
    save_file(w, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("what", ["another-checkpoint", "top-layer-fine-tune"])
def test_other_weights_in_the_same_model_folder_are_refused(demo, tiny_gqa, tmp_path, what):
    model = tmp_path / "tiny-mlx"
    shutil.copytree(tiny_gqa.mlx_path, model)
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, model, out, "--limit", 2)))
    before = (out / "predictions.jsonl").read_bytes()
    # Another checkpoint re-converted into the same folder: every tensor differs a little (a
    # fine-tune), or only the top decoder layer does (a partial fine-tune / merged LoRA).
    hf = tmp_path / "other-hf"
    shutil.copytree(tiny_gqa.hf_path, hf)
    pick = (lambda k: True) if what == "another-checkpoint" else (lambda k: ".layers.1." in k and "audio" not in k)
    _perturb_safetensors(hf / "model.safetensors", pick)
    shards = lambda: b"".join(f.read_bytes() for f in sorted(model.glob("model*.safetensors")))  # noqa: E731
    old = shards()
    ok(invoke("convert", "--hf-path", hf, "--mlx-path", model, "--force"))
    assert shards() != old, "the re-converted weights are the same: the test proves nothing"
    err = user_error(invoke(*eval_args(demo, model, out, "--limit", 3)))
    assert "model_fingerprint" in err, err
    assert (out / "predictions.jsonl").read_bytes() == before


@pytest.mark.parametrize("content", [b"\x00\xff garbage {", b"", b"[1, 2]", b"null", b'{"model_fingerprint": '],
                         ids=["binary", "empty", "array", "null", "cut"])
def test_a_corrupt_run_json_is_refused_on_resume(demo, M, tmp_path, content):
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, M, out, "--limit", 1)))
    (out / "run.json").write_bytes(content)
    before = (out / "predictions.jsonl").read_bytes()
    user_error(invoke(*eval_args(demo, M, out, "--limit", 2)), "run.json")
    assert (out / "predictions.jsonl").read_bytes() == before


@pytest.mark.slow
def test_a_corrupt_heads_meta_is_refused_on_resume(demo, M, tmp_path, monkeypatch):
    monkeypatch.setattr(mmau, "string_match", parity)
    out = tmp_path / "HEADS.json"
    ok(invoke("heads", *data_args(demo, M), "--limit", 7, "--out", out, "--k", 2))
    (tmp_path / "HEADS.items.meta.json").write_bytes(b"\x00\x01{")
    user_error(invoke("heads", *data_args(demo, M), "--limit", 8, "--out", out, "--k", 2), "meta.json")


def test_an_eval_with_a_broken_template_resumes_once_it_is_fixed(demo, M, tmp_path):
    """A model-wide failure (a broken chat template) stops the run with one error and does not poison
    it: nothing is recorded against the items, so once the template is fixed a rerun answers them all."""
    m = model_copy(M, tmp_path / "m")
    good = (m / "chat_template.jinja").read_text()
    (m / "chat_template.jinja").write_text("{% for message in %}{{ oops }")
    out = tmp_path / "run"
    first = invoke(*eval_args(demo, m, out, "--limit", 2))
    assert first.exit_code == 1 and "chat template" in first.stderr and "Traceback" not in first.output
    (m / "chat_template.jinja").write_text(good)
    res = invoke(*eval_args(demo, m, out, "--limit", 2))
    ok(res)
    rows = jsonl(out / "predictions.jsonl")
    assert all("model_output" in r for r in rows), [r.get("error") for r in rows]


def test_a_second_run_on_a_locked_folder_is_refused(demo, M, tmp_path):
    from mlx_listen.records import locked

    out = tmp_path / "run"
    with locked(out):
        err = user_error(invoke(*eval_args(demo, M, out, "--limit", 2)), str(out))
        assert "in use" in err
    assert not (out / "predictions.jsonl").exists() and not (out / "run.json").exists()
    ok(invoke(*eval_args(demo, M, out, "--limit", 2)))  # once released, the run goes ahead
