"""`mlx-listen profile` end to end on three tiny 4-layer models, one of each family (Qwen2-Audio, Audio
Flamingo 3, Qwen2.5-Omni), plus a copy of the Qwen2-Audio one with a weight missing (its config and
headers are fine, so it passes every check and fails when it loads): the report renders for the three,
the broken one is reported as failed and the others go on, one model is in memory at a time, a rerun
loads nothing; and bad input is one error line before any model work, nothing written.

The tiny models answer gibberish, so correctness is `test_method_experiment`'s length-parity rule (it
follows both the item and what the model says, so steering moves it)."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
from support import invoke, ok
from support.cli import usage_error, user_error, warnings_of

pytestmark = pytest.mark.torch

FAST = ["-m", 1, "--k", 2, "--alphas", 1, "--random-sets", 1, "--n-perm", 20, "--no-ablate", "--no-random-direction"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The three families' tiny MLX folders (named as the report names them), the broken copy, and a
    14-item demo set (the fewest with both outcomes within every task of every calibration fold here)."""
    import mlx.core as mx

    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny
    from mlx_listen_convert.reference.tiny_families import build_tiny_af3, build_tiny_omni

    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for name, build in (("qwen2-audio", lambda p: build_tiny(p, layers=4, heads=4, kv_heads=2, init_range=0.1, seed=3)),
                        ("af3", lambda p: build_tiny_af3(p, layers=4, init_range=0.1, seed=3)),
                        ("omni", lambda p: build_tiny_omni(p, layers=4, init_range=0.1, seed=3))):
        build(root / f"{name}-hf")
        out[name] = Path(convert(str(root / f"{name}-hf"), str(root / name), progress=False))
    broken = root / "broken"
    shutil.copytree(out["qwen2-audio"], broken)
    shard = sorted(broken.glob("model*.safetensors"))[0]
    weights = mx.load(str(shard))
    del weights["multi_modal_projector.linear.weight"]
    mx.save_safetensors(str(shard), weights, metadata={"format": "mlx"})
    out["broken"] = broken
    out["data"] = make_demo_set(root / "demo", n_per_kind=2)
    return out


def args(zoo, out, models, *extra):
    return ["profile", "--models", models, "--data", zoo["data"], "--audio-dir", zoo["data"].parent, "--out", out,
            *FAST, *extra]


@pytest.mark.slow
def test_three_families_side_by_side(zoo, tmp_path, monkeypatch):
    import mlx_listen.load as L
    from mlx_listen.eval import mmau

    monkeypatch.setattr(mmau, "string_match", lambda answer, prediction, choices: (len(prediction) + len(answer)) % 2 == 0)
    # and an option picked by the answer's characters, so audio and silence answers parse and may differ (validation)
    monkeypatch.setattr(mmau, "matched_choice", lambda answer, choices: choices[sum(map(ord, answer)) % len(choices)])
    alive, at_load = [], []
    real_load = L.load

    def load(*a, **kw):  # how many earlier models are still in memory when the next one loads
        gc.collect()
        at_load.append(sum(r() is not None for r in alive))
        pair = real_load(*a, **kw)
        alive.append(weakref.ref(pair[0]))
        return pair

    monkeypatch.setattr(L, "load", load)
    out = tmp_path / "profile"
    models = ",".join(str(zoo[n]) for n in ("qwen2-audio", "broken", "af3", "omni"))
    r = ok(invoke(*args(zoo, out, models)))
    assert at_load == [0, 0, 0, 0]  # the broken one tried to load too: one model in memory at a time
    lines = r.stdout.splitlines()
    assert [x.split(":")[0] for x in lines] == ["qwen2-audio", "broken", "af3", "omni"]
    assert "baseline accuracy" in lines[0] and "failed**: it did not load" in lines[1] and "Missing 1 param" in lines[1]
    assert not (out / "broken" / "base.jsonl").exists()  # no item error rows: a rerun retries it from the start
    assert [w for w in warnings_of(r) if "failed" in w] == [
        f"[WARNING] broken failed: {lines[1].split('**failed**: ')[1]} (the other models go on; rerun to retry it)"]

    profile = json.loads((out / "profile.json").read_text())
    got = {m["name"]: m for m in profile["models"]}
    assert [m["status"] for m in profile["models"]] == ["done", "failed", "done", "done"]
    assert {n: got[n]["family"] for n in got} == {"qwen2-audio": "qwen2_audio", "broken": "qwen2_audio",
                                                   "af3": "audioflamingo3", "omni": "qwen2_5_omni"}
    for name in ("qwen2-audio", "af3", "omni"):
        m = got[name]
        assert m["loaded"] and m["n_tested"] == 14 and (out / name / "report.md").exists()
        lm = m["layer_mass"]
        assert lm["n"] == 14 and len(lm["mean"]) == 4 and all(0 < x < 1 for x in lm["mean"]) and lm["audio_share"]
        assert len(m["specialists"]["folds"]) == 2 and sum(m["specialists"]["selected_per_layer"]) == 4
        assert m["accuracy"]["difference"]["n"] == 14 and m["accuracy"]["baseline"]["ci95"]
        assert m["listening"]["n_unparsable"] == 0 and m["listening"]["n_changed"] + m["listening"]["n_unchanged"] == 14
    assert any(got[n]["listening"]["auc"] is not None for n in ("qwen2-audio", "af3", "omni"))
    md = (out / "profile.md").read_text()
    for words in ("| | **qwen2-audio** | **broken** | **af3** | **omni** |", "## Audio attention mass per layer",
                  "| listening AUC within strata |", "| steered - baseline (paired) |",
                  "| specialist heads beating the permutation null | fold 0:", "**broken** (`", "![profile](profile.png)"):
        assert words in md, words
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    # Rerun: the finished models are rebuilt from their records, none is loaded; the broken one is retried.
    def no_load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(L, "load_model", no_load)
    again = ok(invoke(*args(zoo, out, models)))
    kept = [x for x in again.stdout.splitlines() if not x.startswith("broken")]
    assert kept == [x for x in lines if not x.startswith("broken")]
    assert [m["status"] for m in json.loads((out / "profile.json").read_text())["models"]] == [
        "done", "failed", "done", "done"]
    assert [m["loaded"] for m in json.loads((out / "profile.json").read_text())["models"]] == [False, True, False, False]
    for name in ("qwen2-audio", "af3", "omni"):
        assert f"[INFO] {name}: every stage was recorded; nothing was run" in again.stderr


@pytest.mark.parametrize("case", ["empty", "empty entry", "same name", "unknown folder", "unknown family",
                                  "same weights", "preset", "every head", "other model", "other settings",
                                  "missing audio"])
def test_bad_input_is_one_line_before_any_model_work(zoo, tmp_path, case, no_load):
    out = tmp_path / "out"
    q, a = zoo["qwen2-audio"], zoo["af3"]
    if case == "empty":
        usage_error(invoke(*args(zoo, out, "")), "--models", "empty entry")
    elif case == "empty entry":
        usage_error(invoke(*args(zoo, out, f"{q},,{a}")), "--models", "empty entry")
    elif case == "same name":
        usage_error(invoke(*args(zoo, out, f"{q},{tmp_path}/qwen2-audio")), "two models are named 'qwen2-audio'",
                    "NAME=MODEL")
    elif case == "unknown folder":
        user_error(invoke(*args(zoo, out, f"{q},{tmp_path}/nope")), "model nope", "not found")
    elif case == "unknown family":
        llama = tmp_path / "llama"
        llama.mkdir()
        (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
        user_error(invoke(*args(zoo, out, f"{q},{llama}")), "model llama", "llama")
    elif case == "same weights":
        user_error(invoke(*args(zoo, out, f"x={q},y={q}")), "x and y are the same weights")
    elif case == "preset":
        user_error(invoke(*args(zoo, out, f"{q},{a}", "--prompt", "r1-aqa-think")), "model af3", "r1-aqa-think")
    elif case == "every head":
        user_error(invoke(*args(zoo, out, f"{q},{a}", "--k", 16)), "model qwen2-audio", "every head")
    elif case == "other model":
        (out / "af3").mkdir(parents=True)
        (out / "af3" / "experiment.json").write_text(json.dumps({"model_fingerprint": "another"}))
        user_error(invoke(*args(zoo, out, f"{q},{a}")), "holds another model's experiment")
        assert sorted(p.name for p in out.rglob("*")) == ["af3", "experiment.json"]
        return
    elif case == "other settings":  # an experiment folder of the same model, made with --k 3
        from mlx_listen.load import weights_fingerprint

        (out / "af3").mkdir(parents=True)
        (out / "af3" / "experiment.json").write_text(json.dumps({"model_fingerprint": weights_fingerprint(a), "k": 3}))
        user_error(invoke(*args(zoo, out, f"{q},{a}")), "holds an experiment with other settings (k differ)")
        assert sorted(p.name for p in out.rglob("*")) == ["af3", "experiment.json"]
        return
    elif case == "missing audio":
        data = tmp_path / "data.json"
        items = json.loads(zoo["data"].read_text())
        items[3]["audio_id"] = "./audios/gone.wav"
        data.write_text(json.dumps(items))
        user_error(invoke("profile", "--models", f"{q},{a}", "--data", data, "--audio-dir", zoo["data"].parent,
                          "--out", out, *FAST), "1 audio files are missing", "gone.wav")
    assert not out.exists()
