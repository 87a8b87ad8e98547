"""`mlx-listen experiment` (`method/experiment.py`): the cross-fitted protocol, on simulations with a
known truth (`support.sim_backend`, records level, fast) and once end to end with a tiny model
through the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import support.sim_backend
from support.sim_backend import SimBackend, make_items

from mlx_listen import stats
from mlx_listen.errors import ListenError
from mlx_listen.method.experiment import Settings, outcome, run_experiment

FAST = dict(n_perm=100, n_boot=50)


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """The records' per-row fsync (10 ms here) would dominate these simulations; the SIGKILL test
    runs in a subprocess, with it."""
    from mlx_listen import records

    monkeypatch.setattr(records.os, "fsync", lambda fd: None)


def run(tmp_path, backend, n=120, name="exp", **kw):
    data = tmp_path / "data.json"
    items = make_items(n, data)
    settings = Settings(**{**dict(k=2, random_sets=5, alphas=(1.0, 2.0)), **FAST, **kw})
    out = tmp_path / name
    return run_experiment(settings, data, tmp_path, "sim", out, backend=backend, progress=False), items, out


def ids_of(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("folds", [2, 3])
def test_ids_traced_end_to_end(tmp_path, folds):
    """No item helps pick heads or alpha for the fold it is tested in; every item is tested once."""
    backend = SimBackend(planted=[(3, 1)], gain=0.5, seed=1)
    report, items, out = run(tmp_path, backend, n=90, folds=folds)
    all_ids = sorted(it["id"] for it in items)
    tested = sorted(i for f in report["folds"] for i in f["test_ids"])
    assert tested == all_ids  # every item a test item exactly once
    base = {r["id"]: r for r in map(json.loads, (out / "base.jsonl").read_text().splitlines())}
    assert sorted(base) == all_ids and [c for c in backend.calls if c[0] == "base"].__len__() == len(items)
    for f in report["folds"]:
        cal, test = set(f["calibration_ids"]), set(f["test_ids"])
        assert not cal & test and cal | test == set(all_ids)
        fold_dir = out / f"fold{f['index']}"
        assert set(ids_of(fold_dir / "tune.jsonl")) == cal  # alpha chosen on calibration items only
        assert set(ids_of(fold_dir / "directions.jsonl")) == cal  # the mean vector too
        assert set(ids_of(fold_dir / "test.jsonl")) == test
        # the fold's heads are the top-k of its calibration records alone
        rows = [base[i] for i in sorted(cal)]
        scores = stats.head_scores(np.array([r["audio_mass"] for r in rows]), np.array([r["correct"] for r in rows]))
        assert [list(h) for h in stats.top_k(scores, 2).heads] == [h[:2] for h in f["heads"]]
        per_task = {t: sum(1 for i in test if base[i]["task"] == t) for t in ("sound", "music", "speech")}
        assert max(per_task.values()) - min(per_task.values()) <= 1  # stratified by task
    n_test = report["n_tested"]
    assert n_test == len(items) and all(c["n"] == n_test for c in report["conditions"].values())
    assert report["coverage"] == {"every_item_tested_once": True, "calibration_test_disjoint": True}
    assert set(report["conditions"]) == {"baseline", "specialist", "mean-vector", "ablate-specialist",
                                         *[f"random-{i}" for i in range(1, 6)],
                                         *[f"ablate-random-{i}" for i in range(1, 6)]}
    assert (out / "report.md").read_text().startswith("# Experiment report")


@pytest.mark.slow
def test_null_simulation(tmp_path):
    """No signal: heads beating the null and significant head sets are rare, the specialist gain is
    not systematically above the random sets', and the verdict says what the numbers say.

    On one dataset each of these holds with probability 0.9-0.95 only, so one seed's outcome
    would change with any harmless change of the draws (seed 18 has a fold with p_set = 0.03). Over
    three null datasets the bounds below fail by chance with probability ~0.2% (folds) and ~3%
    (specialist first); a leak of test items into the choice of heads would fail them every time.
    The 5% rate itself is checked over many datasets in tests/stats/test_stats_heads.py."""
    beating = significant = first = 0
    for seed in (12, 13, 14):
        report, _, _ = run(tmp_path, SimBackend(planted=[], seed=seed, noise=0.08), n=240, random_sets=9,
                           name=f"exp{seed}")
        folds, steer = report["folds"], report["controls"]["steering"]
        beating += sum(f["null"]["n_beating_null"] > 0 for f in folds)
        significant += sum(f["null"]["p_set"] <= 0.05 for f in folds)
        first += steer["empirical_p"] <= steer["min_possible_p"]  # above all 9 random sets
        verdict = " ".join(report["verdict"])
        assert ("no head beats the null" in verdict) == all(f["null"]["n_beating_null"] == 0 for f in folds)
        assert ("not distinguishable" in verdict) == (steer["empirical_p"] > 0.05)
    assert beating <= 2 and significant <= 2  # of 6 folds: Binomial(6, 0.05), P(>= 3) ~ 0.002
    assert first <= 1  # of 3 datasets: Binomial(3, 0.1), P(>= 2) ~ 0.028


@pytest.mark.slow
def test_planted_simulation(tmp_path):
    """A planted head pair: found in every fold with high bootstrap frequency, its steering beats
    every matched random set, and ablating it hurts more than ablating random sets."""
    planted = [(3, 1), (3, 5)]
    backend = SimBackend(planted=planted, gain=0.6, drop=0.6, seed=3)
    report, _, _ = run(tmp_path, backend, n=240, random_sets=19)
    for f in report["folds"]:
        assert sorted(tuple(h[:2]) for h in f["heads"]) == planted
        assert min(f["stability"]["frequency"]) >= 0.9
        assert f["null"]["n_beating_null"] == 2
    steer = report["controls"]["steering"]
    assert steer["empirical_p"] == pytest.approx(steer["min_possible_p"]) == pytest.approx(0.05)
    assert report["conditions"]["specialist"]["vs_baseline"]["mcnemar_p"] < 0.001
    assert report["controls"]["ablation"]["empirical_p"] <= 0.1
    assert "beat the random sets" in " ".join(report["verdict"])


@pytest.mark.slow
def test_length_confound_is_caught_by_center_task(tmp_path):
    """Heads that only track clip length (while accuracy rises with length) win pooled Pearson;
    --center task (within-task, length partialled out) does not pick them."""
    confounded = [(5, 2), (7, 6)]
    pooled, _, _ = run(tmp_path, SimBackend(planted=confounded, mode="confound", seed=5), n=300, name="pooled")
    centred, _, _ = run(tmp_path, SimBackend(planted=confounded, mode="confound", seed=5), n=300, name="centred",
                        center="task")
    for f in pooled["folds"]:
        assert {tuple(h[:2]) for h in f["heads"]} == set(confounded)
        assert f["other_center"]["center"] == "task" and f["other_center"]["jaccard"] < 0.5
    for f in centred["folds"]:
        assert not {tuple(h[:2]) for h in f["heads"]} & set(confounded)
        assert f["null"]["n_beating_null"] == 0


def test_answers_that_differ_only_in_case_pick_the_same_option():
    item = {"choices": ["Man", "Woman", "Child"], "answer": "Man"}
    a, b = outcome(item, "<answer>Man</answer>"), outcome(item, "<answer> man.</answer>")
    assert a["choice"] == b["choice"] == 0 and a["correct"] and b["correct"]
    none = outcome(item, "I cannot tell")
    assert none["choice"] is None and not none["parsed"]
    both = outcome(item, "<answer>Man or Woman</answer>")
    assert both["choice"] is None  # names two options: picks none


@pytest.mark.slow
def test_validation_counts_unparsable_apart(tmp_path):
    report, _, _ = run(tmp_path, SimBackend(planted=[(3, 1)], seed=6), n=60)
    v = report["validation"]
    assert v["changed"] + v["unchanged"] + v["unparsable"] == 60
    assert v["auc"]["ci95"] is not None or v["auc"]["too_small"]


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(tmp_path):
    run(tmp_path, SimBackend(seed=7), n=30)
    with pytest.raises(ListenError, match="prompt differ"):
        run(tmp_path, SimBackend(seed=7), n=30, prompt="mmau")
    with pytest.raises(ListenError, match="model_fingerprint differ"):
        run(tmp_path, SimBackend(seed=8), n=30)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """Killed in the middle, rerun: the same report as an uninterrupted run, no row twice."""
    data = tmp_path / "data.json"
    make_items(48, data)
    script = Path(support.sim_backend.__file__)
    whole = tmp_path / "whole"  # the uninterrupted run, in process (what sim_backend.main runs)
    from support.sim_backend import main

    argv = sys.argv
    sys.argv = ["sim_backend.py", str(data), str(whole), "0"]
    try:
        main()
    finally:
        sys.argv = argv
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(script), data, cut, "0.01"])
    deadline = time.monotonic() + 60
    target = cut / "fold0" / "tune.jsonl"
    while time.monotonic() < deadline and not (target.exists() and target.read_bytes().count(b"\n") >= 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "report.json").exists()
    subprocess.run([sys.executable, str(script), data, cut, "0"], check=True, timeout=120)
    a, b = json.loads((whole / "report.json").read_text()), json.loads((cut / "report.json").read_text())
    assert a["conditions"] == b["conditions"] and a["folds"] == b["folds"]
    for f in ("base.jsonl", "fold0/tune.jsonl", "fold1/test.jsonl"):
        ids = ids_of(cut / f)
        assert len(ids) == len(set(ids)), f


@pytest.mark.torch
@pytest.mark.slow
def test_experiment_command_with_a_tiny_model(tmp_path, monkeypatch):
    """The real backend end to end: a 4-layer tiny model, the demo set, every stage, the report.
    The tiny model answers gibberish, so an answer counts as right when its text and the key have
    lengths of the same parity (a rule that follows both the item and what the model says, so
    steering and ablation move it)."""
    from support import invoke, ok

    from mlx_listen.eval import mmau

    monkeypatch.setattr(mmau, "string_match", lambda answer, prediction, choices: (len(prediction) + len(answer)) % 2 == 0)

    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.eval.mmau import load_items
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    build_tiny(tmp_path / "hf", layers=4, heads=4, kv_heads=2, init_range=0.1, seed=3)
    model = convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), progress=False)
    demo = make_demo_set(tmp_path / "demo", n_per_kind=2)
    out = tmp_path / "exp"
    r = ok(invoke("experiment", "--data", demo, "--audio-dir", demo.parent, "--model", model, "--out", out,
                  "-m", 3, "--k", 2, "--alphas", "1,4", "--random-sets", 2, "--n-perm", 20, "--ablate-sets", 1))
    assert "Specialist steering changed accuracy" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["n_tested"] == len(load_items(demo)) and report["coverage"]["every_item_tested_once"]
    assert set(report["conditions"]) == {"baseline", "specialist", "mean-vector", "random-1", "random-2",
                                         "ablate-specialist", "ablate-random-1"}
    for f in report["folds"]:
        assert set(f["alpha"]) == {"specialist", "mean-vector", "random-1", "random-2"}
        assert all(a in (1.0, 4.0) for a in f["alpha"].values())
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "alpha_fold0.png" in md and (out / "alpha_fold0.png").exists()
    again = ok(invoke("experiment", "--data", demo, "--audio-dir", demo.parent, "--model", model, "--out", out,
                      "-m", 3, "--k", 2, "--alphas", "1,4", "--random-sets", 2, "--n-perm", 20, "--ablate-sets", 1))
    assert again.stdout == r.stdout  # a rerun recomputes nothing and reports the same
