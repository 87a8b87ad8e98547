"""`mlx-listen profile`'s mechanism (`method/profile.py`) and comparison (`method/profile_report.py`), fast:
the comparison on synthetic experiment folders with known numbers, model names and `--models` parsing,
and a failing model among others (the experiment replaced by a writer of synthetic folders). The real
models, resume without model work and the command's bad inputs are `tests/commands/test_cli_profile.py`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from mlx_listen.errors import ListenError, ListenWarning
from mlx_listen.method import profile as P
from mlx_listen.method import profile_report as R
from mlx_listen.method.experiment import Settings


def fold(index, heads, r, threshold, p_set, alpha):
    return {"repeat": 0, "index": index, "heads": [[l, h, x] for (l, h), x in zip(heads, r)],
            "null": {"observed_heads": [list(h) for h in heads], "observed_r": r, "fwer_threshold": threshold,
                     "p_set": p_set}, "alpha": {"specialist": alpha}}


def write_run(folder: Path, *, layers: int = 2, auc=0.75, gain=0.08):
    """An experiment folder with known numbers: 2 usable base items (and one error row), 2 folds."""
    folder.mkdir(parents=True)
    base = [{"id": "a", "audio_mass": [[0.1, 0.3], [0.5, 0.7]] + [[0.0, 0.0]] * (layers - 2), "audio_tokens": 25,
             "text_tokens": 75},
            {"id": "b", "audio_mass": [[0.3, 0.5], [0.7, 0.9]] + [[0.2, 0.0]] * (layers - 2), "audio_tokens": 50,
             "text_tokens": 50},
            {"id": "c", "error": "the forward pass gave NaN or infinite values"}]
    (folder / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    report = {
        "n_items": 101, "n_tested": 100, "failed": [{"id": "c", "error": "NaN"}],
        "folds": [fold(0, [(1, 0), (1, 1)], [0.9, 0.5], 0.6, 0.01, 1.0),
                  fold(1, [(0, 1), (1, 1)], [0.7, 0.2], 0.65, 0.2, 2.0)],
        "heads_null": {"combined": {"some": 0.02, "every": 0.2}},
        "validation": {"passes": auc is not None, "n_changed": 30, "n_unchanged": 60, "n_unparsable": 10,
                       "within_strata": {"auc": auc, "auc_ci95": [0.6, 0.9] if auc else None,
                                         "vs_random": {"empirical_p": 0.01, "n": 99} if auc else None},
                       "pooled": {"auc": 0.8, "auc_ci95": [0.7, 0.9]}},
        "conditions": {
            "baseline": {"n": 100, "accuracy": 0.5, "ci95": [0.4, 0.6]},
            "specialist": {"n": 100, "accuracy": 0.5 + gain, "ci95": [0.48, 0.67],
                           "vs_baseline": {"n": 100, "difference": gain, "ci95": [0.02, 0.14], "p": 0.01,
                                           "method": "score"},
                           "margin_vs_baseline": {"n": 100, "difference": 0.25, "ci95": [0.1, 0.4], "p": 0.001}}},
        "controls": {"steering": {"accuracy": {"empirical_p": 0.03}}},
        "claims": {"steering_beats_random": True},
        "verdict": ["Specialist steering raised accuracy by 8.0 points.", "More."],
    }
    (folder / "report.json").write_text(json.dumps(report))


def run_row(name, layers=2, status="done", **kw):
    return {"name": name, "model": f"/models/{name}", "family": "qwen2_audio", "layers": layers, "heads": 2,
            "fingerprint": name, "status": status, "loaded": True, **kw}


def test_the_comparison_on_known_numbers(tmp_path):
    write_run(tmp_path / "alpha")
    write_run(tmp_path / "beta", layers=3, auc=None, gain=-0.1)
    runs = [run_row("alpha"), run_row("beta", layers=3), run_row("gamma", status="failed", error="it broke")]
    meta = {"data": "d.json", "n_items": 101, "tasks": ["sound"], "settings": Settings(k=2, random_sets=99).to_json()}
    profile = R.build(tmp_path, runs, meta)
    a, b, g = profile["models"]
    lm = a["layer_mass"]
    assert lm["n"] == 2 and lm["mean"] == [0.3, 0.7] and lm["max"] == [0.4, 0.8] and lm["max_head"] == [1, 1]
    assert lm["overall"] == 0.5 and lm["audio_share"] == 0.375  # (25/100 + 50/100) / 2
    h = a["specialists"]
    assert h["selected_per_layer"] == [1, 3] and h["beating_per_layer"] == [1, 1]  # (1,0) in fold 0, (0,1) in fold 1
    assert [f["beating"] for f in h["folds"]] == [[[1, 0]], [[0, 1]]] and h["p_some_fold"] == 0.02
    assert a["listening"]["auc"] == 0.75 and a["listening"]["passes"] and a["listening"]["empirical_p"] == 0.01
    assert a["accuracy"]["difference"]["difference"] == 0.08 and a["accuracy"]["beats_random"]
    assert a["alpha"] == [1.0, 2.0] and a["n_failed_items"] == 1
    assert b["layer_mass"]["mean"][2] == pytest.approx(0.05) and b["listening"]["auc"] is None
    assert g["status"] == "failed" and "layer_mass" not in g

    md = R.markdown(profile)
    for words in ("| | **alpha** | **beta** | **gamma** |",
                  "| steered - baseline (paired) | +8.0 points (95% CI +2.0 to +14.0, p = 0.01) "
                  "| -10.0 points (95% CI +2.0 to +14.0, p = 0.01) |  |",
                  "(2 folds, 1 repeat(s), k = 2, 99 random head sets, alphas 0.5, 1, 1.5, 2, 3, tuned by margin",
                  "| listening AUC within strata | 0.750 (95% CI 0.600 to 0.900) | n/a: no stratum holds both",
                  "fold 0: 1 of 2 (layers 1); fold 1: 1 of 2 (layers 0)",
                  "| audio share of the prompt | 37.5% | 37.5% |", "| baseline accuracy | 50.0% (95% CI 40.0 to 60.0)",
                  "| option margin change (paired) | +0.250 nats (95% CI +0.100 to +0.400, p = 0.001)",
                  "| specialist vs random head sets (accuracy) | empirical p 0.03; beats them",
                  "| 1 | 0.700 (0.800) *1 | 0.700 (0.800) *1 |", "| 2 |  | 0.050 (0.100) |",
                  "| items tested | 100 of 101 (1 failed) | 100 of 101 (1 failed) | **failed**: it broke |",
                  "**gamma** (`/models/gamma`) failed: it broke. Rerun",
                  "Specialist steering raised accuracy by 8.0 points. Full report: `alpha/report.md`"):
        assert words in md, words


@pytest.mark.slow
def test_the_files_and_the_plot(tmp_path):
    """profile.json, profile.md and one PNG, a column per model (the failed one included), not blank."""
    from matplotlib.image import imread

    write_run(tmp_path / "alpha")
    write_run(tmp_path / "beta", layers=3, auc=None, gain=-0.1)
    runs = [run_row("alpha"), run_row("beta", layers=3), run_row("gamma", status="failed", error="it broke")]
    profile = R.build(tmp_path, runs, {"data": "d.json", "n_items": 101, "tasks": ["sound"], "settings": {}})
    assert R.write(tmp_path, profile) == [tmp_path / f"profile.{x}" for x in ("json", "md", "png")]
    assert json.loads((tmp_path / "profile.json").read_text())["models"][0]["layer_mass"]["mean"] == [0.3, 0.7]
    png = imread(tmp_path / "profile.png")
    assert png.shape[1] > png.shape[0] and len(np.unique(png.reshape(-1, png.shape[-1]), axis=0)) > 20


def test_a_damaged_report_is_that_models_failure(tmp_path):
    write_run(tmp_path / "alpha")
    (tmp_path / "beta").mkdir()
    (tmp_path / "beta" / "report.json").write_text("{not json")
    profile = R.build(tmp_path, [run_row("alpha"), run_row("beta")], {"settings": {}})
    assert [m["status"] for m in profile["models"]] == ["done", "failed"]
    assert "report could not be read" in profile["models"][1]["error"]


def test_model_names(tmp_path):
    (tmp_path / "qwen2-audio-4bit").mkdir()
    assert P.model_name(str(tmp_path / "qwen2-audio-4bit") + "/") == "qwen2-audio-4bit"
    assert P.model_name("Qwen/Qwen2-Audio-7B-Instruct") == "Qwen2-Audio-7B-Instruct"
    assert P.parse_models(f"{tmp_path}/qwen2-audio-4bit, nvidia/audio-flamingo-3-hf,omni=Qwen/Qwen2.5-Omni-3B") == [
        ("qwen2-audio-4bit", f"{tmp_path}/qwen2-audio-4bit"), ("audio-flamingo-3-hf", "nvidia/audio-flamingo-3-hf"),
        ("omni", "Qwen/Qwen2.5-Omni-3B")]
    assert P.parse_models(["a=x", "b=x"]) == [("a", "x"), ("b", "x")]  # the same weights twice: profile() refuses


@pytest.mark.parametrize("models, why", [
    ("", "empty entry"), ("a,,b", "empty entry"), ("a,", "empty entry"), ("x/m,y/m", "two models are named 'm'"),
    ("n=", "names no model"), ("bad name=x", "cannot name a model's folder"), ("profile.json=x", "cannot name"),
    ("../x=y", "cannot name"),
])
def test_bad_model_lists(models, why):
    with pytest.raises(ListenError, match=why):
        P.parse_models(models)


@pytest.fixture
def demo(tmp_path):
    from mlx_listen.eval.demo_set import make_demo_set

    return make_demo_set(tmp_path / "demo", n_per_kind=1)


def test_a_failing_model_does_not_stop_the_others(tmp_path, demo, monkeypatch):
    """The experiment replaced: good models write a synthetic folder, `bad` raises (any exception)."""
    calls = []

    def check(name, spec, settings, out):
        return P.Entry(name, spec, P.ModelRef(spec), "qwen2_audio", (2, 2), f"fp-{name}")

    def experiment(settings, data, audio_dir, model, out, *, backend, **kw):
        calls.append(backend.entry.name)
        assert backend.shape == (2, 2) and backend.fingerprint == f"fp-{backend.entry.name}" and not backend.loaded
        if backend.entry.name == "bad":
            raise RuntimeError("out of memory")
        if not out.exists():
            write_run(out)

    monkeypatch.setattr(R, "plot", lambda profile, path: path.write_bytes(b"png"))  # the plot: test above
    monkeypatch.setattr(P, "check_model", check)
    monkeypatch.setattr(P, "run_experiment", experiment)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        result = P.profile("a=m1,bad=m2,b=m3", demo, demo.parent, out, Settings(k=2, random_sets=2))
    assert calls == ["a", "bad", "b"]
    assert [(m["name"], m["status"]) for m in result["models"]] == [("a", "done"), ("bad", "failed"), ("b", "done")]
    assert result["models"][1]["error"] == "RuntimeError: out of memory"
    assert [str(w.message) for w in got if issubclass(w.category, ListenWarning)] == [
        "bad failed: RuntimeError: out of memory (the other models go on; rerun to retry it)"]
    assert {"profile.json", "profile.md", "profile.png", "profile.meta.json"} <= {p.name for p in out.iterdir()}
    assert "**bad** (`m2`) failed: RuntimeError: out of memory" in (out / "profile.md").read_text()
    with pytest.raises(ListenError, match="other settings"):  # the folder is bound to its settings
        P.profile("a=m1", demo, demo.parent, out, Settings(k=3, random_sets=2))
    with pytest.raises(ListenError, match="a and b are the same weights"):
        monkeypatch.setattr(P, "check_model", lambda name, spec, s, o: check("x", spec, s, o) if False else
                            P.Entry(name, spec, P.ModelRef(spec), "qwen2_audio", (2, 2), "same"))
        P.profile("a=m1,b=m1", demo, demo.parent, tmp_path / "out2", Settings(k=2, random_sets=2))
    assert not (tmp_path / "out2").exists()


def test_a_model_that_does_not_load_fails_as_a_whole(tmp_path, monkeypatch):
    """A load failure is the model's, never an item's error row (`records.Stage` records a ListenError per
    item, and a rerun would take those rows as done: the model could never be retried)."""
    from mlx_listen.errors import ModelError
    from mlx_listen.method import backend as B
    from mlx_listen.records import Stage

    def fail(*a, **kw):
        raise ModelError("weights do not match the config")

    monkeypatch.setattr(B, "ModelBackend", fail)
    lazy = P.LazyBackend(P.Entry("m", "m", P.ModelRef("m"), "qwen2_audio", (2, 2), "fp"), tmp_path, Settings())
    assert not lazy.loaded
    with pytest.raises(P.LoadFailed, match="it did not load: weights do not match the config"):
        Stage(tmp_path / "base.jsonl").run([{"id": "a"}, {"id": "b"}], lazy.base, desc="base", progress=False)
    assert lazy.loaded and not (tmp_path / "base.jsonl").exists()
    assert P._one_line(P.LoadFailed("it did not load: x")) == "it did not load: x"
    lazy.close()
