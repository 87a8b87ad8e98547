"""`mlx-listen ask` and `attention` (`cli/ask.py`): the streamed answer and its stats, `--json`,
`-q`, seeded sampling, several clips, long and damaged audio files, and bad input: one `Error:`
line (exit 1) or a usage error (exit 2), no traceback, nothing written.

In-process through click's CliRunner (click >= 8.2 keeps `result.stdout` and `result.stderr`
apart; `result.output` interleaves both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok, tone
from support.cli import MAXT, Q, api_answer, assert_user_error, audio_line, last_json, usage_error, warnings_of

BAR = "=" * 10
QUESTION = "What is this sound?"


def streamed(stdout: str) -> str:
    """The answer text printed between the two `==========` lines."""
    assert stdout.startswith(BAR + "\n"), stdout
    end = stdout.rfind("\n" + BAR + "\n")
    assert end >= len(BAR), stdout
    return stdout[len(BAR) + 1:end]


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


@pytest.mark.parametrize("top_k", ["100000", "vocab"])
def test_top_k_over_the_vocabulary_does_not_crash(tiny_gqa, files, top_k):
    vocab = tiny_gqa.mlx[0].config.text_config.vocab_size
    k = str(vocab) if top_k == "vocab" else top_k
    res = invoke("ask", files["a"], Q, "--model", tiny_gqa.mlx_path, "-m", MAXT, "--temp", "0.7", "--top-k", k,
                 "--seed", "1", "--json")
    if res.exit_code == 2:  # refused as a usage error: fine
        usage_error(res, "--top-k")
    else:  # clamped: a normal answer
        ok(res)
        assert len(last_json(res.stdout)["tokens"]) >= 1


# -- audio files -----------------------------------------------------------------------------------


def test_three_hour_file_stats_line_is_honest(M, tmp_path):
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


def test_45s_clip_stats_line_says_the_first_30s_were_used(M, files):
    res = ok(invoke("ask", files["long"], Q, "--model", M, "-m", MAXT))
    line = audio_line(res.stderr)
    assert line.startswith("Audio: 45.0 s (first 30.0 s used) -> 750 tokens"), line


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
def test_a_truncated_file_warns(M, tmp_path, fmt):
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


# -- bad input -------------------------------------------------------------------------------------


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
])
def test_usage_errors(tiny_gqa, clips, tmp_path, args, words):
    fill = dict(a=clips["a"], hf=tiny_gqa.hf_path, out=tmp_path / "out")
    r = invoke(*[a.format(**fill) for a in args], "--model", tiny_gqa.mlx_path)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.stdout == "" and "Traceback" not in r.output and "Usage:" in r.stderr
    for w in words:
        assert w in r.stderr.splitlines()[-1], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_second_clip_taken_as_the_question_warns(M, files):
    res = ok(invoke("ask", files["a"], files["b"], "--model", M, "-m", MAXT))
    w = warnings_of(res)
    assert len(w) == 1 and str(files["b"]) in w[0] and "question" in w[0], res.stderr


def test_heads_without_listen_is_not_silent(M, files):
    res = invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--heads", files["H"])
    if res.exit_code == 2:
        usage_error(res, "--listen")
    else:
        ok(res)
        assert "Listening:" in res.stderr or warnings_of(res), res.stderr


@pytest.mark.parametrize("png", ["x.xyz", "x", "no/such/dir/x.png"])
def test_attention_png_is_refused_before_any_work(M, files, tmp_path, no_load, png):
    out = tmp_path / "a.json"
    usage_error(invoke("attention", files["a"], Q, "--model", M, "--json", out, "--png", tmp_path / png), "--png")
    assert not out.exists()
