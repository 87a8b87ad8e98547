"""The `mlx-listen` command line: `ask`, `convert`, help/version, and one-line errors for bad input.

In-process through click's CliRunner (click >= 8.2 keeps `result.stdout` and `result.stderr`
apart; `result.output` interleaves both), plus one real run of the installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok, tone

from mlx_listen import __version__
from mlx_listen.audio import load_audio
from mlx_listen.generate import generate
from mlx_listen.prompt import prepare

BAR = "=" * 10
QUESTION = "What is this sound?"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, audio in {"a": tone(1.0), "b": tone(2.3, 880.0, 5), "long": tone(45.0, seed=3),
                        "empty": np.zeros(0, np.float32), "short": tone(100 / SR)}.items():
        out[name] = d / f"{name}.wav"
        sf.write(out[name], audio, SR)
    out["text"] = d / "notes.wav"
    out["text"].write_text("this is not audio\n")
    out["missing"] = d / "missing.wav"
    return out


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working folder, to check that nothing gets written."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def streamed(stdout: str) -> str:
    """The answer text printed between the two `==========` lines."""
    assert stdout.startswith(BAR + "\n"), stdout
    end = stdout.rfind("\n" + BAR + "\n")
    assert end >= len(BAR), stdout
    return stdout[len(BAR) + 1:end]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.rstrip("\n").splitlines()[-1])


def api_answer(model_and_processor, clip_paths, question=QUESTION, **kw):
    model, processor = model_and_processor
    prompt = prepare(model, processor, [load_audio(c) for c in clip_paths], question)
    return prompt, generate(model, processor, prompt, **kw)


# -- ask -----------------------------------------------------------------------------------------
def test_ask_streams_text_and_prints_stats(tiny_gqa, clips):
    r = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 8))
    prompt, ans = api_answer(tiny_gqa.mlx, [clips["a"]], max_tokens=8)
    assert streamed(r.stdout) == ans.text
    assert r.stdout.endswith(BAR + "\n")
    err = r.stderr.splitlines()
    assert f"Prompt: {len(prompt.ids)} tokens" in r.stderr
    assert any(line.startswith(f"Generation: {len(ans.tokens)} tokens") for line in err)
    assert any(line.startswith("Peak memory:") and line.endswith(" GB") for line in err)
    assert "Prompt:" not in r.stdout and "Traceback" not in r.output


def test_ask_json_matches_the_api(tiny_gqa, clips):
    r = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 8, "--json"))
    out = last_json(r.stdout)
    assert {"text", "tokens", "prompt_tokens", "prompt_tps", "generation_tps", "peak_memory"} <= set(out)
    prompt, ans = api_answer(tiny_gqa.mlx, [clips["a"]], max_tokens=8)
    assert out["tokens"] == ans.tokens and len(ans.tokens) == 8
    assert out["text"] == ans.text == streamed(r.stdout.rsplit("\n", 2)[0] + "\n")
    assert out["prompt_tokens"] == len(prompt.ids)
    assert out["audio_tokens"] == prompt.n_audio_tokens > 0
    assert out["prompt_tps"] > 0 and out["generation_tps"] > 0 and out["peak_memory"] > 0


def test_quiet_prints_only_the_answer(tiny_gqa, clips):
    r = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 8, "-q"))
    _, ans = api_answer(tiny_gqa.mlx, [clips["a"]], max_tokens=8)
    assert r.stdout == ans.text + "\n" and r.stderr == ""


def test_seeded_sampling_is_reproducible(tiny_gqa, clips):
    def sample(seed):
        r = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 8,
                      "--temp", 0.8, "--seed", seed, "--json"))
        return last_json(r.stdout)["tokens"]

    first = sample(3)
    assert sample(3) == first
    # Not greedy in disguise: another seed gives another sequence (8 draws over ~260 tokens).
    assert sample(4) != first
    _, greedy = api_answer(tiny_gqa.mlx, [clips["a"]], max_tokens=8)
    assert first != greedy.tokens


def test_hf_folder_gives_the_same_greedy_tokens(tiny_gqa, clips):
    hf = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.hf_path, "-m", 8, "--json"))
    mlx = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 8, "--json"))
    tokens = last_json(mlx.stdout)["tokens"]
    assert last_json(hf.stdout)["tokens"] == tokens and len(tokens) == 8


def test_two_clips(tiny_gqa, clips):
    q = "Which clip is higher?"
    r = ok(invoke("ask", clips["a"], clips["b"], q, "--model", tiny_gqa.mlx_path, "-m", 8, "--json"))
    out = last_json(r.stdout)
    prompt, ans = api_answer(tiny_gqa.mlx, [clips["a"], clips["b"]], q, max_tokens=8)
    one, _ = api_answer(tiny_gqa.mlx, [clips["a"]], q, max_tokens=1)
    assert out["tokens"] == ans.tokens
    assert out["audio_tokens"] == prompt.n_audio_tokens > one.n_audio_tokens
    assert out["audio_seconds"] == pytest.approx(1.0 + 2.3, abs=1e-3)


def test_long_clip_is_truncated_with_a_warning(tiny_gqa, clips):
    r = ok(invoke("ask", clips["long"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 2, "--json"))
    warnings = [line for line in r.stderr.splitlines() if line.startswith("[WARNING]")]
    assert len(warnings) == 1 and "45.0 s" in warnings[0] and "truncated" in warnings[0]
    out = last_json(r.stdout)
    assert out["audio_tokens"] == 750  # the full 30 s window: 3000 frames → 1500 → 750 tokens
    assert "[WARNING]" not in r.stdout


# -- convert -------------------------------------------------------------------------------------
def test_convert_command(tiny_gqa, clips, tmp_path):
    out = tmp_path / "converted"
    r = ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out))
    assert f"Saved the MLX model to {out}" in r.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_audio"
    a = ok(invoke("ask", clips["a"], QUESTION, "--model", out, "-m", 4, "--json"))
    b = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 4, "--json"))
    assert last_json(a.stdout)["tokens"] == last_json(b.stdout)["tokens"]

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out)
    assert_user_error(again, "--force")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out, "--force", "-q", "--q-bits", 8))
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temp folders left


# -- bad input -----------------------------------------------------------------------------------
def assert_user_error(result, *words):
    """Exit status 1 from `_friendly`, one `Error:` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 1, f"exit {result.exit_code}: {result.output}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def _no_weights(tiny, tmp_path):
    d = tmp_path / "no-weights"
    shutil.copytree(tiny.hf_path, d, ignore=shutil.ignore_patterns("*.safetensors"))
    return d


BAD = {
    # case: (clip, model (None: the tiny MLX folder; callable: built in tmp_path), question, words)
    "missing-clip": ("missing", None, QUESTION, ["audio file not found", "missing.wav"]),
    "text-as-wav": ("text", None, QUESTION, ["notes.wav", "not a readable audio file"]),
    "empty-wav": ("empty", None, QUESTION, ["empty.wav", "no audio samples"]),
    "too-short": ("short", None, QUESTION, ["short.wav", "too short", "100 samples"]),
    "no-such-folder": ("a", "/nonexistent/x", QUESTION, ["/nonexistent/x", "not found"]),
    "offline-repo": ("a", "nobody/no-such-model", QUESTION,
                     ["nobody/no-such-model", "Hugging Face hub", "--model /path/to/model"]),
    "no-weights": ("a", _no_weights, QUESTION, ["no model*.safetensors"]),
    "question-too-long": ("a", None, "x" * 9000, ["over the model's context of 8192"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_error(tiny_gqa, clips, cwd, tmp_path, monkeypatch, case):
    clip, model, question, words = BAD[case]
    if model is None:
        model = tiny_gqa.mlx_path
    elif callable(model):
        model = model(tiny_gqa, tmp_path)
    if case == "offline-repo":
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import; make sure
    model_files = sorted(os.listdir(model)) if Path(model).is_dir() else None
    clip_files = sorted(os.listdir(clips["a"].parent))
    r = invoke("ask", clips[clip], question, "--model", model, "-m", 4, env={"HF_HUB_OFFLINE": "1"})
    line = assert_user_error(r, *words)
    if case == "offline-repo":
        assert "set HF_HUB_OFFLINE=1" not in line  # already offline: that advice would be wrong
    assert os.listdir(cwd) == []
    assert sorted(os.listdir(clips["a"].parent)) == clip_files
    if model_files is not None:
        assert sorted(os.listdir(model)) == model_files


@pytest.mark.parametrize("args, words", [
    (["ask", "{a}"], ["give at least one CLIP and a QUESTION"]),
    (["ask", "{a}", QUESTION, "-m", "0"], ["--max-tokens", "0"]),  # mlx-lm would raise ValueError
    (["ask", "{a}", QUESTION, "-m", "-1"], ["--max-tokens"]),  # mlx-lm: no limit at all
    (["convert"], ["--hf-path"]),
    (["convert", "--hf-path", "{hf}", "--mlx-path", "{out}", "-q", "--q-group-size", "16"],
     ["--q-group-size", "16"]),  # MLX supports 32, 64, 128 only
    (["convert", "--hf-path", "{hf}", "--mlx-path", "{out}", "-q", "--q-bits", "3"], ["--q-bits"]),
])
def test_usage_errors(tiny_gqa, clips, tmp_path, args, words):
    fill = dict(a=clips["a"], hf=tiny_gqa.hf_path, out=tmp_path / "out")
    r = invoke(*[a.format(**fill) for a in args], "--model", tiny_gqa.mlx_path) if args[0] == "ask" \
        else invoke(*[a.format(**fill) for a in args])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.stdout == "" and "Traceback" not in r.output and "Usage:" in r.stderr
    for w in words:
        assert w in r.stderr.splitlines()[-1], r.stderr
    assert list(tmp_path.iterdir()) == []


# -- help and version ----------------------------------------------------------------------------
def test_help_and_version():
    top = ok(invoke("--help")).stdout
    assert "ask" in top and "convert" in top and "--version" in top
    assert "--max-tokens" in ok(invoke("ask", "--help")).stdout
    assert "--q-bits" in ok(invoke("convert", "--help")).stdout
    assert ok(invoke("-h")).stdout == top
    assert ok(invoke("--version")).stdout.strip() == __version__
    import mlx.core as mx
    import mlx_lm

    v = ok(invoke("version")).stdout
    assert __version__ in v and mx.__version__ in v and mlx_lm.__version__ in v


# -- the installed console script ----------------------------------------------------------------
def test_console_script(tiny_gqa, clips):
    exe = Path(sys.executable).parent / "mlx-listen"
    exe = str(exe) if exe.exists() else shutil.which("mlx-listen")
    assert exe, "the mlx-listen console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([exe, "ask", str(clips["a"]), QUESTION, "--model", str(tiny_gqa.mlx_path),
                        "-m", "4", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    _, ans = api_answer(tiny_gqa.mlx, [clips["a"]], max_tokens=4)
    assert last_json(p.stdout)["tokens"] == ans.tokens
    assert "Prompt:" in p.stderr and "Generation:" in p.stderr and "Prompt:" not in p.stdout


# -- model-free commands stay model-free -----------------------------------------------------------
MODEL_CODE = ("mlx_listen.model", "mlx_listen.language", "mlx_listen.load", "mlx_lm", "transformers", "torch")


@pytest.mark.parametrize("cmd", ["--help", "eval score", "eval compare", "make-demo-set"])
def test_model_free_commands_import_no_model_code(cmd, tmp_path):
    """`eval score` once pulled in mlx-lm, transformers and torch (6.6 s for a JSONL re-score;
    0.27 s now, benchmarks/bench_startup.py): the run folder readers live in `records`/`mmau`."""
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": f"i{i}", "question": "q", "choices": ["a", "b"], "answer": "a",
                                         "task": "sound", "difficulty": "easy", "model_output": "a"}) + "\n"
                             for i in range(3)))
    args = {"--help": ["--help"], "eval score": ["eval", "score", str(preds)],
            "eval compare": ["eval", "compare", str(preds), str(preds)],
            "make-demo-set": ["make-demo-set", str(tmp_path / "demo"), "--per-kind", "1"]}[cmd]
    code = ("import sys, atexit\n"
            "from mlx_listen.cli import main\n"
            f"atexit.register(lambda: print('MODULES', *{MODEL_CODE!r}.__class__(m for m in {MODEL_CODE!r} "
            "if m in sys.modules), file=sys.stderr))\n"
            f"main({args!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("MODULES")]
    assert line == ["MODULES"], f"{cmd} imported model code: {line}"
