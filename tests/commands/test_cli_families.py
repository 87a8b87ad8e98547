"""Every command end to end on a tiny Audio Flamingo 3 and a tiny Qwen2.5-Omni (Qwen2-Audio's runs are the
other command tests), with the same method code, and the families' bad inputs: one `Error:` line (or one
`[WARNING]` line) each, before any model work, nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok, tone
from support.cli import MAXT, Q, assert_user_error, jsonl, last_json, warnings_of
from support.heads import parity

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module", params=["af3-gqa", "omni-gqa"])
def t(request, tiny_root):
    from support.families import family_model

    return family_model(tiny_root, request.param)


@pytest.fixture(scope="module")
def demo7(tmp_path_factory):
    from mlx_listen.eval.demo_set import make_demo_set

    return make_demo_set(tmp_path_factory.mktemp("demo7"), n_per_kind=1)


def common(t, demo7, *extra):
    return ["--model", t.mlx_path, "--data", demo7, "--audio-dir", demo7.parent, *extra]


@pytest.fixture(scope="module")
def heads_file(t, demo7, tmp_path_factory):
    """`mlx-listen heads` on this family (correctness by answer position, `support.heads.parity`)."""
    from mlx_listen.eval import mmau

    out = tmp_path_factory.mktemp("heads") / "HEADS.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmau, "string_match", parity)
        r = ok(invoke("heads", *common(t, demo7), "--out", out, "--max-tokens", MAXT, "--k", 3))
    assert "HEADS.json" in r.stderr
    return out


def test_ask(t, heads_file, tmp_path):
    clip = tmp_path / "a.wav"
    sf.write(clip, tone(2.0), SR)
    plain = ok(invoke("ask", clip, Q, "--model", t.mlx_path, "-m", 6))
    assert plain.stdout.strip() and "Audio:" in plain.stderr  # streamed text; statistics on stderr
    js = last_json(ok(invoke("ask", clip, Q, "--model", t.mlx_path, "-m", 6, "--json")).stdout)
    assert js["audio_tokens"] == 50 and len(js["tokens"]) >= 1
    listen = last_json(ok(invoke("ask", clip, Q, "--model", t.mlx_path, "-m", 6, "--heads", heads_file,
                                 "--json")).stdout)
    assert listen["listening"] is not None and 0 <= listen["listening"] <= 1
    steer = last_json(ok(invoke("ask", clip, Q, "--model", t.mlx_path, "-m", 6, "--steer", heads_file, "--alpha", 4,
                                "--json")).stdout)
    assert steer["steering"]["alpha"] == 4.0
    ablate = last_json(ok(invoke("ask", clip, Q, "--model", t.mlx_path, "-m", 6, "--ablate", "0.1,1.3",
                                 "--json")).stdout)
    assert ablate["ablation"]["heads"] == [[0, 1], [1, 3]]


def test_eval_modes_compare_and_resume(t, demo7, heads_file, tmp_path):
    out = tmp_path / "run"
    args = ["eval", *common(t, demo7), "--out", out, "--max-tokens", MAXT, "--limit", 4, "--score", "both",
            "--steer", heads_file, "--compare"]
    r = ok(invoke(*args))
    assert "McNemar" in r.stdout
    rows = jsonl(out / "predictions.jsonl")
    assert len(rows) == 4 and all("logprob_choice" in x or "choice_logprobs" in x or "logprobs" in str(x) for x in rows)
    again = ok(invoke(*args))  # resumed: nothing left to answer
    assert len(jsonl(out / "predictions.jsonl")) == 4 and "McNemar" in again.stdout
    lp = tmp_path / "lp"
    ok(invoke("eval", *common(t, demo7), "--out", lp, "--max-tokens", MAXT, "--limit", 2, "--score", "logprob"))
    assert len(jsonl(lp / "predictions.jsonl")) == 2


def test_method_runs(t, demo7, heads_file, tmp_path):
    clip = tmp_path / "a.wav"
    sf.write(clip, tone(2.0), SR)
    ok(invoke("validate-heads", "--heads", heads_file, *common(t, demo7), "--out", tmp_path / "val",
              "--max-tokens", MAXT))
    assert (tmp_path / "val").is_dir()
    ok(invoke("attention", clip, Q, "--model", t.mlx_path, "--json", tmp_path / "att.json", "--heads", heads_file))
    att = json.loads((tmp_path / "att.json").read_text())
    assert np.array(att["audio_mass"]).shape == (2, 4)
    ok(invoke("patch", clip, Q, "--model", t.mlx_path, "--out", tmp_path / "p", "--tokens", 2))
    assert json.loads((tmp_path / "p" / "patch.json").read_text())
    ok(invoke("ablate", "means", *common(t, demo7), "--limit", 2, "--out", tmp_path / "means.safetensors"))
    vec = tmp_path / "v.safetensors"
    ok(invoke("steer", "build", "--heads", heads_file, *common(t, demo7), "--limit", 3, "--out", vec))
    ok(invoke("ask", clip, Q, "--model", t.mlx_path, "-m", 4, "--vector", vec))
    ok(invoke("steer", "sweep", "--heads", heads_file, *common(t, demo7), "--max-tokens", MAXT,
              "--out", tmp_path / "sw", "--alphas", "0,1"))
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["splits"]
    r = ok(invoke("steer", "inspect", heads_file, *common(t, demo7), "--limit", 2, "--out", tmp_path / "ins"))
    assert r.stdout.strip() and json.loads((tmp_path / "ins" / "inspect.json").read_text())


def test_experiment(t, tmp_path, monkeypatch):
    """The whole protocol on a 4-layer model of the family (matched random head sets need other layers); the
    tiny model answers gibberish, so correctness is `test_method_experiment`'s length-parity rule."""
    from mlx_listen.eval import mmau
    from mlx_listen.eval.demo_set import make_demo_set

    monkeypatch.setattr(mmau, "string_match", lambda answer, prediction, choices: (len(prediction) + len(answer)) % 2 == 0)
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny_families import build_tiny_af3, build_tiny_omni

    build = build_tiny_af3 if t.kind == "af3" else build_tiny_omni
    build(tmp_path / "hf", layers=4, init_range=0.1, seed=3)
    model = convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), progress=False)
    demo = make_demo_set(tmp_path / "demo", n_per_kind=2)
    out = tmp_path / "exp"
    r = ok(invoke("experiment", "--data", demo, "--audio-dir", demo.parent, "--model", model, "--out", out, "-m", 3,
                  "--k", 2, "--alphas", "0,1,4", "--random-sets", 2, "--n-perm", 20, "--ablate-sets", 1))
    assert "Specialist steering" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["every_item_tested_once"] and {"baseline", "specialist"} <= set(report["conditions"])


def test_reference_bundle_and_parity(t, tmp_path):
    from click.testing import CliRunner

    from mlx_listen_convert.reference.run import main as reference

    sf.write(tmp_path / "a.wav", tone(2.2, seed=4), SR)
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"audio": "a.wav", "question": Q}]))
    heads = tmp_path / "H.json"
    heads.write_text(json.dumps({"heads": [[0, 1], [1, 3]]}))
    res = CliRunner().invoke(reference, ["--model", str(t.hf_path), "--items", str(items), "--out", str(tmp_path / "b"),
                                         "--device", "cpu", "--max-new-tokens", "12", "--heads", str(heads), "--steer"])
    assert res.exit_code == 0, res.output
    r = invoke("parity", tmp_path / "b", "--model", t.mlx_path, "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["ok"], report
    checked = {row["quantity"] for row in report["rows"]}
    assert {"features", "encoder_sketch", "projector_sketch", "hidden_last", "logits_last", "greedy_tokens",
            "audio_mass", "listening", "steered_logits_last", "steered_greedy_tokens"} <= checked


def test_convert_command_keeps_what_the_family_uses(t, tmp_path):
    r = ok(invoke("convert", "--hf-path", t.hf_path, "--mlx-path", tmp_path / "m", "-q", "--q-group-size", 32))
    if t.kind == "omni":
        assert "[INFO] Left out 136 tensors" in r.stderr
    else:
        assert "Left out" not in r.stderr
    ok(invoke("ask", tone_file(tmp_path), Q, "--model", tmp_path / "m", "-m", 3))


def tone_file(tmp_path, seconds=1.0):
    path = tmp_path / f"t{seconds}.wav"
    sf.write(path, tone(seconds), SR)
    return path


# -- bad input ----------------------------------------------------------------------------------------

def test_clip_past_the_limit_is_one_warning(t, tmp_path):
    """The limit is the folder's processor's (AF3: max_audio_len; Omni: the feature extractor's chunk_length),
    here lowered so the run stays short: the clip is cut there, with one warning saying what was used."""
    folder = tmp_path / "m"
    shutil.copytree(t.mlx_path, folder)
    if t.kind == "af3":
        f = folder / "processor_config.json"
        (f.write_text(json.dumps({**json.loads(f.read_text()), "max_audio_len": 60})))
        seconds, limit = 65.0, 60
    else:
        f = folder / "preprocessor_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "chunk_length": 40}))
        seconds, limit = 41.0, 40
    path = tmp_path / "long.flac"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32), SR)
    r = ok(invoke("ask", path, Q, "--model", folder, "-m", 2, "--json"))
    (w,) = warnings_of(r)
    assert f"{seconds:.1f} s clip truncated to its first {limit} s" in w
    assert last_json(r.stdout)["audio_tokens"] == limit * 25
    assert f"(first {limit:.1f} s used)" in r.stderr


def test_family_bad_inputs_are_one_error_line(t, af3, omni, demo7, tmp_path, no_load):
    other = omni if t.kind == "af3" else af3
    sig = {"model_signature": {"family": {"af3": "audioflamingo3", "omni": "qwen2_5_omni"}[other.kind],
                               "config_hash": "x", "fingerprint": {}}}
    hs = tmp_path / "H.json"
    hs.write_text(json.dumps({"heads": [[0, 1]], **sig}))
    clip = tone_file(tmp_path)
    fam = {"af3": "Audio Flamingo 3", "omni": "Qwen2.5-Omni"}[other.kind]
    assert_user_error(invoke("ask", clip, Q, "--model", t.mlx_path, "--heads", hs), f"was found on a {fam} model",
                      "do not carry over between model families")
    assert_user_error(invoke("eval", *common(t, demo7), "--out", tmp_path / "e", "--prompt", "r1-aqa-think"),
                      "'r1-aqa-think' prompt preset does not fit", "use r1-aqa or mmau")
    assert not (tmp_path / "e").exists()


def test_unusable_checkpoints_are_one_error_line(omni, tmp_path):
    bad = tmp_path / "whisper"
    shutil.copytree(omni.mlx_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "whisper"}))
    clip = tone_file(tmp_path)
    assert_user_error(invoke("ask", clip, Q, "--model", bad), "model_type is 'whisper'", "'audioflamingo3'")
    no_thinker = tmp_path / "no-thinker"
    shutil.copytree(omni.hf_path, no_thinker)
    cfg = json.loads((no_thinker / "config.json").read_text())
    cfg.pop("thinker_config")
    (no_thinker / "config.json").write_text(json.dumps(cfg))
    assert_user_error(invoke("ask", clip, Q, "--model", no_thinker), "no thinker_config")
    assert_user_error(invoke("convert", "--hf-path", no_thinker, "--mlx-path", tmp_path / "out"), "no thinker_config")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
