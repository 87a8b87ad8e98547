"""The steering sweep (`method/sweep.py`): calibration and test splits kept apart (also by
`eval --compare`), and the graded margin curve of `--score both`."""

from __future__ import annotations

import json

import pytest


def _split_rows(run):
    from mlx_listen.records import read_predictions

    return {r["id"] for r in read_predictions(run)}


@pytest.mark.slow
def test_eval_compare_and_sweep_keep_splits_disjoint(tiny_gqa, tmp_path):
    from click.testing import CliRunner

    from mlx_listen.cli import main
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.eval.mmau import load_items

    demo = make_demo_set(tmp_path / "demo", n_per_kind=2)
    heads = tmp_path / "H.json"
    heads.write_text(json.dumps({"heads": [[0, 1], [1, 3]], "k": 2}))
    common = ["--data", str(demo), "--audio-dir", str(demo.parent), "--model", str(tiny_gqa.mlx_path), "-m", "3"]
    r = CliRunner().invoke(main, ["eval", *common, "--out", str(tmp_path / "run"), "--steer", str(heads),
                                  "--alpha", "2", "--compare"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "predictions.jsonl").exists() and (tmp_path / "run" / "steered" / "summary.json").exists()
    assert _split_rows(tmp_path / "run") == _split_rows(tmp_path / "run" / "steered")
    assert "McNemar" in r.output and "wrong->right" in r.output
    summary = json.loads((tmp_path / "run" / "steered" / "summary.json").read_text())
    assert summary["settings"]["steering"]["alpha"] == 2.0 and summary["settings"]["heads_sha256"]

    r = CliRunner().invoke(main, ["steer", "sweep", "--heads", str(heads), *common, "--out", str(tmp_path / "sw"),
                                  "--alphas", "0,1", "--seed", "3"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    calib, test = set(res["splits"]["calibration"]), set(res["splits"]["test"])
    assert calib and test and not calib & test and calib | test == {it["id"] for it in load_items(demo)}
    assert _split_rows(tmp_path / "sw" / "calibration") == calib
    assert _split_rows(tmp_path / "sw" / "test") == test
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mlx_listen.method.sweep import split_ids

    assert split_ids(load_items(demo), 0.5, 3) == (res["splits"]["calibration"], res["splits"]["test"])


@pytest.mark.slow
def test_sweep_with_logprob_scoring_gives_a_graded_margin_curve(tiny_gqa, tmp_path):
    """--score both: per α (and per random control) the paired change of the correct option's
    margin against α = 0, from the rows the runs wrote; α = 0 is exactly no change."""
    from click.testing import CliRunner

    from mlx_listen.cli import main
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.records import read_predictions
    from mlx_listen.stats import paired_mean_diff

    demo = make_demo_set(tmp_path / "demo", n_per_kind=2)
    heads = tmp_path / "H.json"
    heads.write_text(json.dumps({"heads": [[0, 1], [1, 3]], "k": 2}))
    out = tmp_path / "sw"
    r = CliRunner().invoke(main, ["steer", "sweep", "--heads", str(heads), "--data", str(demo), "--audio-dir",
                                  str(demo.parent), "--model", str(tiny_gqa.mlx_path), "-m", "3", "--out", str(out),
                                  "--alphas", "0,4", "--score", "both"])
    assert r.exit_code == 0, r.output
    assert "margin of the correct option" in r.output
    res = json.loads((out / "sweep.json").read_text())
    shift = res["calibration"]["margin_shift"]
    zero = shift["heads"]["0"]
    assert zero["difference"] == 0.0 and zero["n"] == len(res["splits"]["calibration"])
    base = {r["id"]: r["margin"] for r in read_predictions(out / "calibration")}
    for got, folder in ((shift["heads"]["4"], "alpha=4"), (shift["random"][0]["4"], "alpha=4-random0")):
        treat = {r["id"]: r["margin"] for r in read_predictions(out / "calibration" / folder)}
        ids = sorted(base)
        want = paired_mean_diff([base[i] for i in ids], [treat[i] for i in ids])
        assert got == pytest.approx(want) and got["difference"] != 0.0  # α = 4 moves the margins
    assert res["test"]["margin_shift"]["n"] == len(res["splits"]["test"])
    assert (out / "sweep_margin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
