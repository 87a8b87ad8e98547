"""Hostile tests: one test (or parametrized case) per item of the "broken promises" issue.

The promise: every user error is one `Error:` line and exit 1 (usage errors exit 2), before any
model work where possible; nothing half-written survives an interruption; a long run never dies
on one bad item. Each test is named after its case number in the issue (`test_01_…` … `test_11_…`).
Everything runs on the tiny random checkpoint (`tiny_gqa`: 2 decoder layers x 4 heads, a
262-token byte vocabulary) and the synthetic demo set, with 2-4 generated tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from support import SR, invoke, ok, tone

from mlx_listen.eval import mmau

Q = "What is this sound?"
MAXT = 2


# -- helpers --------------------------------------------------------------------------------------

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
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for w in words:
        assert w in result.stderr, f"{w!r} not in {result.stderr!r}"
    return last


def no_traceback(result):
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0 or isinstance(result.exception, SystemExit), \
        f"uncaught {result.exception!r}\n{result.output}"


def warnings_of(result) -> list[str]:
    return [x for x in result.stderr.splitlines() if x.startswith("[WARNING]")]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.rstrip("\n").splitlines()[-1])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def audio_line(stderr: str) -> str:
    return next(x for x in stderr.splitlines() if x.startswith("Audio:"))


def parity(answer, prediction, choices) -> bool:
    """Correctness by the answer's position: both outcomes on the demo set (heads needs both)."""
    return list(choices).index(answer) % 2 == 0


@pytest.fixture
def no_load(monkeypatch):
    """Fail loudly if any command gets as far as loading weights."""
    import mlx_listen.load as L

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(L, "load_model", boom)


# -- shared inputs (module scope) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def M(tiny_gqa) -> Path:
    return tiny_gqa.mlx_path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    ok(invoke("make-demo-set", root))
    return root, root / "demo.json", mmau.load_items(root / "demo.json")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Clips and HEADS files."""
    d = tmp_path_factory.mktemp("hostile")
    out = {}
    a = tone(1.0)
    for name, x in {"a": a, "b": tone(1.5, 880.0, 2), "silence": np.zeros_like(a), "long": tone(45.0, seed=3),
                    "short": tone(100 / SR)}.items():
        out[name] = d / f"{name}.wav"
        sf.write(out[name], x, SR)
    heads = {"H": {"heads": [[0, 1], [1, 3]]},            # valid for 2 layers x 4 heads
             "far_layer": {"heads": [[5, 0]]},             # layer 5 of a 2-layer model
             "far_head": {"heads": [[0, 7], [1, 1]]}}      # head 7 of a 4-head layer
    for name, data in heads.items():
        out[name] = d / f"{name}.json"
        out[name].write_text(json.dumps(data))
    return out


def eval_args(demo, model, out, *extra, data=None, audio_dir=None):
    root, default_data, _ = demo
    return ["eval", "--data", data or default_data, "--audio-dir", audio_dir or root, "--model", model,
            "--out", out, "--max-tokens", MAXT, *extra]


def data_args(demo, model, data=None, audio_dir=None, max_tokens=True):
    root, default_data, _ = demo
    return ["--model", model, "--data", data or default_data, "--audio-dir", audio_dir or root,
            *(["--max-tokens", MAXT] if max_tokens else [])]


# ===================================================================================================
# 1. `ask --listen --steer HEADS.json` printed the listening score of the silence pass

@pytest.mark.parametrize("alpha", ["0", "1"])
def test_01_listen_with_steer_reports_the_clip(M, files, tmp_path, alpha):
    H = files["H"]
    ok(invoke("attention", files["a"], Q, "--model", M, "--json", tmp_path / "a.json", "--heads", H))
    want = json.loads((tmp_path / "a.json").read_text())["listening"]
    ok(invoke("attention", files["silence"], Q, "--model", M, "--json", tmp_path / "s.json", "--heads", H))
    silence = json.loads((tmp_path / "s.json").read_text())["listening"]
    assert abs(silence - want) > 1e-4, "the clip and its silence score alike: the test could not tell them apart"
    plain = last_json(ok(invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--heads", H, "--json")).stdout)
    assert plain["listening"] == pytest.approx(want, abs=1e-6)

    res = ok(invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--listen", "--steer", H, "--alpha", alpha,
                    "--json"))
    got = last_json(res.stdout)["listening"]
    assert got == pytest.approx(want, abs=1e-6), f"steered listening {got} (clip {want}, silence {silence})"
    assert f"Listening: {want:.4f}" in res.stderr


# ===================================================================================================
# 2. A bad clip (too short, NaN-filled) must be recorded as failed; the run goes on, also on resume

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


@pytest.mark.parametrize("command", ["eval", "eval-steered", "eval-compare", "heads", "validate-heads", "steer-build",
                                     "steer-sweep"])
def test_02_bad_item_is_recorded_and_the_run_goes_on(demo, M, files, bad_set, tmp_path, monkeypatch, command):
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
            assert "failed items (not scored): 2" in res.stdout
            _check_eval_dir(out, good, bad)
            if command == "eval-compare":
                _check_eval_dir(out / "steered", good, bad)
                assert f"{len(good)} paired items" in res.stdout
        elif command == "heads":
            rows = jsonl(tmp_path / "HEADS.items.jsonl")
            _check_failed_rows(rows, bad)
            assert sorted(r["id"] for r in rows if "error" in r) == sorted(bad)
            assert json.loads(out.read_text())["n_items"] == len(good)
            assert any("2 items could not be used" in w for w in warnings_of(res)), res.stderr
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
            assert any("2 items could not be used" in w for w in warnings_of(res)), res.stderr
        else:
            seen = set()
            for split in ("calibration", "test"):
                for f in (out / split).rglob("predictions.jsonl"):
                    rows = jsonl(f)
                    _check_failed_rows(rows, bad)
                    seen |= {r["id"] for r in rows if "error" in r}
            assert seen == set(bad)
            assert (out / "sweep.json").exists()


# ===================================================================================================
# 4. Run identity: the same weights under any path spelling resume; other weights in the folder refuse

def test_04_resume_accepts_any_spelling_of_the_same_folder(demo, M, tmp_path, monkeypatch):
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
def test_04_other_weights_in_the_same_folder_are_refused(demo, tiny_gqa, tmp_path, what):
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


# ===================================================================================================
# 5. Numbers are validated: usage errors (exit 2) before anything loads

ASK_BAD = [
    ["--steer", "{H}", "--alpha", "nan"], ["--steer", "{H}", "--alpha", "inf"], ["--steer", "{H}", "--alpha", "1e999"],
    ["--temp", "nan"], ["--temp", "-1"], ["--temp", "inf"], ["--top-p", "2"], ["--top-p", "nan"],
    ["--top-k", "-3"], ["--seed", "-1"], ["--min-p", "-1"], ["--min-p", "nan"], ["--repetition-penalty", "-1"],
    ["--repetition-penalty", "nan"],
]


@pytest.mark.parametrize("extra", ASK_BAD, ids=lambda e: " ".join(e[-2:]))
def test_05_ask_bad_numbers_are_usage_errors(M, files, no_load, extra):
    extra = [e.format(H=files["H"]) for e in extra]
    usage_error(invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, *extra), extra[-2])


@pytest.mark.parametrize("cmd, extra", [
    ("eval", ["--steer", "{H}", "--alpha", "nan"]), ("eval", ["--steer", "{H}", "--alpha", "inf"]),
    ("eval", ["--steer", "{H}", "--alpha", "-inf"]),
    ("sweep", ["--alphas", "nan,1"]), ("sweep", ["--alphas", "1,inf"]), ("sweep", ["--alphas", ""]),
    ("sweep", ["--alphas", ","]), ("sweep", ["--alphas", "1,x"]),
    ("build", ["--alpha", "nan"]),
], ids=lambda x: x if isinstance(x, str) else " ".join(x[-2:]))
def test_05_run_bad_numbers_are_usage_errors(demo, M, files, tmp_path, no_load, cmd, extra):
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


@pytest.mark.parametrize("top_k", ["100000", "vocab"])
def test_05_top_k_over_the_vocabulary_does_not_crash(tiny_gqa, files, top_k):
    vocab = tiny_gqa.mlx[0].config.text_config.vocab_size
    k = str(vocab) if top_k == "vocab" else top_k
    res = invoke("ask", files["a"], Q, "--model", tiny_gqa.mlx_path, "-m", MAXT, "--temp", "0.7", "--top-k", k,
                 "--seed", "1", "--json")
    if res.exit_code == 2:  # refused as a usage error: fine
        usage_error(res, "--top-k")
    else:  # clamped: a normal answer
        ok(res)
        assert len(last_json(res.stdout)["tokens"]) >= 1


# ===================================================================================================
# 6. steer build: the --out folder checked first, the path it wrote reported, its --alpha used

def test_06_steer_build_missing_out_folder_fails_first(demo, M, files, tmp_path, no_load):
    out = tmp_path / "no" / "such" / "v"
    res = invoke("steer", "build", "--heads", files["H"], *data_args(demo, M, max_tokens=False), "--out", out)
    user_error(res, str(out.parent))
    assert not (tmp_path / "no").exists()


def test_06_steer_build_reports_the_file_and_vector_uses_its_alpha(demo, M, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = ok(invoke("steer", "build", "--heads", files["H"], *data_args(demo, M, max_tokens=False), "--limit", 3,
                    "--out", "x", "--alpha", "0"))
    assert (tmp_path / "x.safetensors").is_file() and not (tmp_path / "x").exists()
    assert "x.safetensors" in res.stderr, res.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())

    plain = last_json(ok(invoke("ask", files["a"], Q, "--model", M, "-m", 4, "--json")).stdout)
    vec = ok(invoke("ask", files["a"], Q, "--model", M, "-m", 4, "--vector", "x.safetensors", "--json"))
    out = last_json(vec.stdout)
    assert out["steering"]["alpha"] == 0.0, out["steering"]
    assert "Steering: alpha 0 " in vec.stderr, vec.stderr
    assert out["tokens"] == plain["tokens"]  # alpha 0 adds exact zeros
    over = last_json(ok(invoke("ask", files["a"], Q, "--model", M, "-m", 4, "--vector", "x.safetensors",
                               "--alpha", "3", "--json")).stdout)
    assert over["steering"]["alpha"] == 3.0


# ===================================================================================================
# 7. Conversion: interruptions leave nothing, --force never destroys a file or the source, mode, group size

STALLING_CLI = r"""
import sys, time
from pathlib import Path
import mlx.core as mx
real = mx.save_safetensors
def stall(path, *a, **kw):
    real(path, *a, **kw)
    Path(sys.argv[3]).write_text(str(path))
    time.sleep(120)
mx.save_safetensors = stall
from mlx_listen.cli import main
main(["convert", "--hf-path", sys.argv[1], "--mlx-path", sys.argv[2]])
"""


def _stalled_convert(hf: Path, out: Path, ready: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", STALLING_CLI, str(hf), str(out), str(ready)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"convert exited ({child.returncode}) before writing a shard: {child.stderr.read()}")
        assert time.monotonic() < deadline, "convert never wrote a shard"
        time.sleep(0.05)
    return child


def test_07_sigkill_and_sigterm_leave_nothing_a_rerun_cannot_clean(tiny_gqa, tmp_path):
    parent = tmp_path / "parent"
    out = parent / "out"
    killed = _stalled_convert(tiny_gqa.hf_path, out, tmp_path / "ready1")
    killed.kill()
    killed.communicate(timeout=60)
    left = [p.name for p in parent.iterdir()]
    assert not (out.exists()), "a SIGKILLed conversion published its output"

    termed = _stalled_convert(tiny_gqa.hf_path, out, tmp_path / "ready2")  # the rerun
    termed.send_signal(signal.SIGTERM)
    _, err = termed.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert termed.returncode != 0
    assert list(parent.iterdir()) == [], f"after SIGKILL {left}, after the SIGTERMed rerun {list(parent.iterdir())}"

    ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out))
    assert [p.name for p in parent.iterdir()] == ["out"]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_07_existing_file_as_output(tiny_gqa, tmp_path, force):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    user_error(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", target, *force), str(target))
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("where", ["same", "same-relative", "symlink", "inside", "around"])
def test_07_force_never_destroys_the_source(tiny_gqa, tmp_path, monkeypatch, where):
    src = tmp_path / "src" / "X"
    shutil.copytree(tiny_gqa.hf_path, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    monkeypatch.chdir(tmp_path)
    if where == "symlink":
        (tmp_path / "link").symlink_to(src)
    target = {"same": src, "same-relative": Path("src/X/"), "symlink": tmp_path / "link", "inside": src / "mlx",
              "around": src.parent}[where]
    res = invoke("convert", "--hf-path", src, "--mlx-path", target, "--force")
    user_error(res)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_07_output_folder_follows_the_umask(tiny_gqa, tmp_path):
    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out))
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755, oct(out.stat().st_mode)
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644


def test_07_group_size_that_does_not_divide_is_not_silent(tiny_gqa, tmp_path):
    out = tmp_path / "g128"
    res = invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out, "-q", "--q-group-size", "128")
    if res.exit_code == 0:
        assert any("128" in w for w in warnings_of(res)), res.stderr
    else:
        user_error(res, "128")
        assert list(tmp_path.iterdir()) == []


# ===================================================================================================
# 8. No tracebacks: damaged HEADS.json, config.json, chat template, run.json, binary predictions,
#    attention --png, mlx-listen-reference

BAD_SCORES = {
    "list": [0.1, 0.2], "not-pairs": {"a,b": 0.1}, "string-value": {"0,1": "high"}, "triple": {"0,1,2": 0.1},
    "single": {"0": 0.1}, "negative": {"0,-1": 0.1}, "null-value": {"0,1": None}, "string": "abc",
    "nan": {"0,1": float("nan")}, "absurd-index": {"999999999,999999999": 0.1},
    "empty": {},
}


@pytest.mark.parametrize("case", list(BAD_SCORES))
def test_08_heads_json_with_bad_scores(M, files, tmp_path, case):
    H = tmp_path / "H.json"
    H.write_text(json.dumps({"heads": [[0, 1]], "scores": BAD_SCORES[case]}))
    res = invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--heads", H)
    if case == "empty" and res.exit_code == 0:
        return  # an empty score table may be accepted; it must not crash
    user_error(res, str(H))


def _model_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("command", ["ask", "eval", "convert", "reference"])
def test_08_config_json_that_is_an_array(demo, tiny_gqa, files, tmp_path, command):
    src = tiny_gqa.hf_path if command in ("convert", "reference") else tiny_gqa.mlx_path
    m = _model_copy(src, tmp_path / "m")
    (m / "config.json").write_text("[1, 2, 3]\n")
    if command == "ask":
        res = invoke("ask", files["a"], Q, "--model", m, "-m", MAXT)
    elif command == "eval":
        res = invoke(*eval_args(demo, m, tmp_path / "run", "--limit", 1))
    elif command == "convert":
        res = invoke("convert", "--hf-path", m, "--mlx-path", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    else:
        from mlx_listen_convert.reference.run import main

        items = tmp_path / "items.json"
        items.write_text(json.dumps([{"audio": str(files["a"]), "question": Q}]))
        res = CliRunner().invoke(main, ["--model", str(m), "--items", str(items), "--out", str(tmp_path / "b"),
                                        "--device", "cpu", "--max-new-tokens", "0"])
    user_error(res, "config.json")


def test_08_malformed_chat_template(M, files, tmp_path):
    m = _model_copy(M, tmp_path / "m")
    (m / "chat_template.jinja").write_text("{% for message in %}{{ oops }")
    user_error(invoke("ask", files["a"], Q, "--model", m, "-m", MAXT), "chat template")


def test_08_extra_eval_with_a_broken_template_resumes_once_it_is_fixed(demo, M, tmp_path):
    """Not in the issue's list: a model-wide failure recorded per item must not poison the run."""
    m = _model_copy(M, tmp_path / "m")
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


@pytest.mark.parametrize("content", [b"\x00\xff garbage {", b"", b"[1, 2]", b"null", b'{"model_fingerprint": '],
                         ids=["binary", "empty", "array", "null", "cut"])
def test_08_corrupt_run_json_on_resume(demo, M, tmp_path, content):
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, M, out, "--limit", 1)))
    (out / "run.json").write_bytes(content)
    before = (out / "predictions.jsonl").read_bytes()
    user_error(invoke(*eval_args(demo, M, out, "--limit", 2)), "run.json")
    assert (out / "predictions.jsonl").read_bytes() == before


def test_08_corrupt_heads_meta_on_resume(demo, M, tmp_path, monkeypatch):
    monkeypatch.setattr(mmau, "string_match", parity)
    out = tmp_path / "HEADS.json"
    ok(invoke("heads", *data_args(demo, M), "--limit", 7, "--out", out, "--k", 2))
    (tmp_path / "HEADS.items.meta.json").write_bytes(b"\x00\x01{")
    user_error(invoke("heads", *data_args(demo, M), "--limit", 8, "--out", out, "--k", 2), "meta.json")


BINARY = {
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "gzip": b"\x1f\x8b\x08\x00" + bytes(range(256)),
    "brace-binary": b"{\xff\xfe\x00\x01" * 50,
    "bracket-nul": b"[\x00\x01\x02]",
    "nul": b"\x00" * 100,
    "utf16": '[{"id": "x"}]'.encode("utf-16"),
}


@pytest.mark.parametrize("kind", list(BINARY))
def test_08_eval_score_on_a_binary_file(tmp_path, kind):
    f = tmp_path / "preds.bin"
    f.write_bytes(BINARY[kind])
    user_error(invoke("eval", "score", f))
    assert f.read_bytes() == BINARY[kind]


@pytest.mark.parametrize("png", ["x.xyz", "x", "no/such/dir/x.png"])
def test_08_attention_png_refused_before_any_work(M, files, tmp_path, no_load, png):
    out = tmp_path / "a.json"
    usage_error(invoke("attention", files["a"], Q, "--model", M, "--json", out, "--png", tmp_path / png), "--png")
    assert not out.exists()


@pytest.fixture(scope="module")
def q4(tiny_gqa, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "q4"
    ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out, "-q"))
    return out


@pytest.mark.parametrize("case", ["short-clip", "cuda", "mlx-quantised", "mlx-plain"])
def test_08_reference_bad_inputs(tiny_gqa, files, q4, tmp_path, case):
    from mlx_listen_convert.reference.run import main

    items = tmp_path / "items.json"
    sf.write(tmp_path / "tiny.wav", tone(0.01), SR)
    clip = tmp_path / "tiny.wav" if case == "short-clip" else files["a"]
    items.write_text(json.dumps([{"audio": str(clip), "question": Q}]))
    model = {"mlx-quantised": q4, "mlx-plain": tiny_gqa.mlx_path}.get(case, tiny_gqa.hf_path)
    device = "cuda" if case == "cuda" else "cpu"
    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["--model", str(model), "--items", str(items), "--out", str(out),
                                    "--device", device, "--max-new-tokens", "0"])
    word = {"short-clip": "too short", "cuda": "CUDA", "mlx-quantised": "MLX", "mlx-plain": "MLX"}[case]
    user_error(res, word)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ===================================================================================================
# 9. Errors that say what is wrong

@pytest.mark.parametrize("removed", [["tokenizer.json"], ["tokenizer.json", "tokenizer_config.json"]],
                         ids=["tokenizer.json", "all-tokenizer-files"])
@pytest.mark.parametrize("command", ["ask", "eval"])
def test_09_missing_tokenizer_files(demo, M, files, tmp_path, removed, command):
    m = _model_copy(M, tmp_path / "m")
    for f in removed:
        (m / f).unlink()
    res = invoke("ask", files["a"], Q, "--model", m, "-m", MAXT) if command == "ask" \
        else invoke(*eval_args(demo, m, tmp_path / "run", "--limit", 1))
    err = user_error(res, "tokenizer")
    assert "positions" not in err, err


def _two_shards(src: Path, dst: Path, index: bool = True) -> Path:
    import mlx.core as mx

    shutil.copytree(src, dst)
    shard = next(dst.glob("model-*.safetensors"))
    w = mx.load(str(shard))
    shard.unlink()
    keys = sorted(w)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, ks in zip(names, halves):
        mx.save_safetensors(str(dst / name), {k: w[k] for k in ks}, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(ks, name))
    idx = dst / "model.safetensors.index.json"
    if index:
        idx.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif idx.exists():
        idx.unlink()
    return dst


@pytest.mark.parametrize("index", [True, False], ids=["with-index", "no-index"])
def test_09_missing_second_shard_is_named(demo, M, files, tmp_path, index):
    m = _two_shards(M, tmp_path / "m", index)
    ok(invoke("ask", files["a"], Q, "--model", m, "-m", MAXT))  # the split folder itself is fine
    (m / "model-00002-of-00002.safetensors").unlink()
    user_error(invoke("ask", files["a"], Q, "--model", m, "-m", MAXT), "model-00002-of-00002.safetensors")
    user_error(invoke(*eval_args(demo, m, tmp_path / "run", "--limit", 1)), "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("command", ["eval", "eval score", "eval score --data", "heads", "validate-heads",
                                     "steer build", "steer sweep"])
def test_09_empty_mmau_array(demo, M, files, tmp_path, command):
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


def test_09_steer_sweep_unknown_task(demo, M, files, tmp_path, no_load):
    usage_error(invoke("steer", "sweep", "--heads", files["H"], *data_args(demo, M), "--out", tmp_path / "s",
                       "--task", "foo"), "unknown task foo")
    assert not (tmp_path / "s").exists()


# ===================================================================================================
# 10. Audio: long files read in part with an honest stats line; damaged files warn

def test_10_three_hour_file_stats_line_is_honest(M, tmp_path):
    rate = 1000  # 3 h at 1 kHz, 8-bit: 10.8 MB, decoded only for its first 31 s
    x = np.zeros(3 * 3600 * rate, np.float32)
    x[: 40 * rate] = 0.5 * np.sin(2 * np.pi * 110 * np.arange(40 * rate) / rate)
    clip = tmp_path / "three-hours.wav"
    sf.write(clip, x, rate, subtype="PCM_U8")
    del x
    res = ok(invoke("ask", clip, Q, "--model", M, "-m", MAXT))
    line = audio_line(res.stderr)
    assert line.startswith("Audio: 10800.0 s (first 30.0 s used) -> 750 tokens"), line
    assert any("truncated" in w and "30 s" in w for w in warnings_of(res)), res.stderr


def test_10_45s_clip_stats_line_says_the_first_30s_were_used(M, files):
    res = ok(invoke("ask", files["long"], Q, "--model", M, "-m", MAXT))
    line = audio_line(res.stderr)
    assert line.startswith("Audio: 45.0 s (first 30.0 s used) -> 750 tokens"), line


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
def test_10_truncated_file_warns(M, tmp_path, fmt):
    whole = tmp_path / f"whole.{fmt}"
    sf.write(whole, tone(3.0), SR, **({"format": "MP3"} if fmt == "mp3" else {}))
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    res = ok(invoke("ask", cut, Q, "--model", M, "-m", MAXT))
    w = warnings_of(res)
    assert len(w) == 1 and "damaged" in w[0] and str(cut) in w[0], res.stderr
    assert "[WARNING]" not in res.stdout
    clean = ok(invoke("ask", whole, Q, "--model", M, "-m", MAXT))
    assert warnings_of(clean) == []


# ===================================================================================================
# 11. Small traps

def test_11_second_clip_taken_as_the_question_warns(M, files):
    res = ok(invoke("ask", files["a"], files["b"], "--model", M, "-m", MAXT))
    w = warnings_of(res)
    assert len(w) == 1 and str(files["b"]) in w[0] and "question" in w[0], res.stderr


def test_11_heads_without_listen_is_not_silent(M, files):
    res = invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--heads", files["H"])
    if res.exit_code == 2:
        usage_error(res, "--listen")
    else:
        ok(res)
        assert "Listening:" in res.stderr or warnings_of(res), res.stderr


@pytest.mark.parametrize("heads", ["far_layer", "far_head"])
@pytest.mark.parametrize("command", ["ask", "ask --listen", "eval", "steer build", "steer sweep"])
def test_11_steering_refuses_heads_not_in_the_model(demo, M, files, tmp_path, heads, command):
    H = files[heads]
    out = tmp_path / "out"
    if command.startswith("ask"):
        args = ["ask", files["a"], Q, "--model", M, "-m", MAXT, "--steer", H,
                *(["--listen"] if "listen" in command else [])]
    elif command == "eval":
        args = eval_args(demo, M, out, "--limit", 2, "--steer", H)
    elif command == "steer build":
        args = ["steer", "build", "--heads", H, *data_args(demo, M, max_tokens=False), "--limit", 2, "--out", out]
    else:
        args = ["steer", "sweep", "--heads", H, *data_args(demo, M), "--limit", 6, "--alphas", "0,1",
                "--random-controls", 0, "--out", out]
    user_error(invoke(*args), "do not exist")
    if out.exists():
        assert not list(out.rglob("predictions.jsonl")), list(out.rglob("*"))
    assert not Path(str(out) + ".safetensors").exists()


def test_11_eval_score_data_says_how_many_ids_match(demo, tmp_path):
    items = demo[2]
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{**it, "model_output": it["answer"]} for it in items]))
    key = tmp_path / "key.json"
    key.write_text(json.dumps(items[:3]))
    res = ok(invoke("eval", "score", preds, "--data", key, "--json"))
    assert json.loads(res.stdout)["n"] == 3
    assert f"3 of {len(items)}" in res.stderr, res.stderr
    assert str(len(items) - 3) in res.stderr


def test_11_second_eval_on_a_locked_out_is_refused(demo, M, tmp_path):
    from mlx_listen.records import locked

    out = tmp_path / "run"
    with locked(out):
        err = user_error(invoke(*eval_args(demo, M, out, "--limit", 2)), str(out))
        assert "in use" in err
    assert not (out / "predictions.jsonl").exists() and not (out / "run.json").exists()
    ok(invoke(*eval_args(demo, M, out, "--limit", 2)))  # once released, the run goes ahead


def test_11_heads_k_over_the_number_of_heads(demo, M, tmp_path, monkeypatch):
    monkeypatch.setattr(mmau, "string_match", parity)
    out = tmp_path / "HEADS.json"
    res = invoke("heads", *data_args(demo, M), "--limit", 7, "--out", out, "--k", 20)
    if res.exit_code in (1, 2):
        assert "Traceback" not in res.output and "--k" in res.stderr, res.stderr
        return
    ok(res)
    w = warnings_of(res)
    assert any("20" in x and ("8" in x or "head" in x) for x in w), \
        f"--k 20 on 8 heads kept {len(json.loads(out.read_text())['heads'])} heads without a word:\n{res.stderr}"
