"""`mlx-listen eval` (`eval/evaluate.py`): the MMAU harness end to end on the synthetic demo set
with the tiny model.

Outputs and their agreement with the scorer, `--limit` / `--task` / `--prompt`, resume after a
clean stop, a half-written line, a corrupt line and a real SIGKILL, missing or unreadable audio,
`eval score` (also against another answer key), `eval compare`, and two ranks under `mlx.launch`.

The tiny model answers gibberish, so most in-process runs wrap the real `conditions.Answerer` in
`Script`: the model runs as usual (real prefill, decode and timings), then the answer text is
replaced by one fixed per item position, which makes the expected accuracy known:
position % 3 == 0 -> the right choice in <answer> tags, 1 -> a wrong choice in tags, 2 -> the
model's own output (no tags: unparsed, wrong). It also records which items the model answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import invoke, ok

from mlx_listen import presets
from mlx_listen.eval import evaluate, mmau

MAX_TOKENS = 4
N_DEMO = 28  # make-demo-set's default: 7 kinds x 4


def one_line_error(result) -> str:
    """A user error: exit 1, one `Error: ...` line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err, err
    assert result.stdout == ""
    return err


def lines(path: Path) -> list[bytes]:
    """The newline-terminated lines of a file, as bytes (a partial last line is left out)."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in lines(path)]


def scored_keys(summary: dict) -> dict:
    """The part of summary.json that comes from the scorer (Report.to_dict)."""
    keys = ("n", "correct", "skipped", "unparsed", "scorer", "accuracy", "ci95", "tables", "always_first")
    return {k: summary[k] for k in keys}


def eval_args(demo, model, out, *extra, max_tokens=MAX_TOKENS):
    root, data, _ = demo
    return ["eval", "--data", data, "--audio-dir", root, "--model", model, "--out", out,
            "--max-tokens", max_tokens, *extra]


class Script:
    """Patches the runner's `Answerer` (see the module docstring) and counts the model's answers."""

    def __init__(self, items, rewrite=True):
        self.position = {it["id"]: i for i, it in enumerate(items)}
        self.rewrite = rewrite
        self.calls: list[str] = []  # item ids, in the order the model answered them
        self.current = None

    def install(self, mp):
        build = presets.build_prompt
        script = self

        def build_prompt(item, preset=presets.DEFAULT_PRESET):
            self.current = item  # run_eval builds each item's prompt just before answering it
            return build(item, preset)

        class Answerer(evaluate.Answerer):
            def respond(self, prompt, options=None, only=None, generate=True):
                responses = super().respond(prompt, options, only, generate)
                item = script.current
                script.calls.append(item["id"])
                if not script.rewrite:
                    return responses
                return {k: dataclasses.replace(r, answer=dataclasses.replace(r.answer, text=script.text(item, r.answer.text)))
                        if r.answer is not None else r for k, r in responses.items()}

        mp.setattr(presets, "build_prompt", build_prompt)
        mp.setattr(evaluate, "Answerer", Answerer)
        return self

    def text(self, item, raw):
        kind = self.position[item["id"]] % 3
        if kind == 0:
            return f"<answer>{item['answer']}</answer>"
        if kind == 1:
            wrong = next(c for c in item["choices"] if c != item["answer"])
            return f"The answer is <answer>{wrong}</answer>"
        return raw


@pytest.fixture
def script(demo, monkeypatch):
    return Script(demo[2]).install(monkeypatch)


@pytest.fixture(scope="module")
def full_run(demo, tiny_gqa, tmp_path_factory):
    """One scripted CLI run over all 28 demo items."""
    out = tmp_path_factory.mktemp("runs") / "full"
    with pytest.MonkeyPatch.context() as mp:
        s = Script(demo[2]).install(mp)
        res = ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out)))
    return out, res, s


# -- end to end ------------------------------------------------------------------------------------


def test_eval_writes_predictions_summary_and_table(demo, tiny_gqa, full_run):
    _, data, items = demo
    out, res, s = full_run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["predictions.json", "predictions.jsonl", "run.json",
                                                       "summary.json"]
    assert s.calls == [it["id"] for it in items]  # the model answered every item once, in data order

    rows = rows_of(out / "predictions.jsonl")
    assert (out / "predictions.jsonl").read_bytes().endswith(b"\n")
    assert [r["id"] for r in rows] == [it["id"] for it in items]
    for i, (r, it) in enumerate(zip(rows, items)):
        assert {k: r[k] for k in it} == it  # every original field, unchanged
        assert r["prompt"] == "r1-aqa" and r["condition"] == "base" and r["rank"] == 0
        assert r["model_prediction"] == r["model_output"]
        assert r["audio_tokens"] > 0 and r["prompt_tokens"] > r["audio_tokens"]
        assert 1 <= r["generation_tokens"] <= MAX_TOKENS
        assert set(r["seconds"]) == {"audio_load", "features", "encoder", "prefill", "silence", "decode", "batch"}
        assert all(v >= 0 for v in r["seconds"].values()) and r["seconds"]["encoder"] > 0
        assert r["seconds"]["batch"] == 1 and r["seconds"]["silence"] == 0  # the baseline alone: no silence
        if i % 3 == 0:
            assert (r["model_output"], r["parsed"], r["correct"]) == (it["answer"], True, True)
        elif i % 3 == 1:
            assert r["parsed"] and r["model_output"] in it["choices"] and r["model_output"] != it["answer"]
            assert r["correct"] is False
        else:  # the tiny model's own text: no tags, the whole output is the extracted answer
            assert r["parsed"] is False and r["model_output"] == r["raw_output"].strip()
            assert r["correct"] is False

    # the official JSON array: the same rows, `model_output` included
    official = json.loads((out / "predictions.json").read_text())
    assert isinstance(official, list) and official == rows

    summary = json.loads((out / "summary.json").read_text())
    n_right, n_unparsed = len(range(0, N_DEMO, 3)), len(range(2, N_DEMO, 3))
    assert (summary["n"], summary["correct"], summary["unparsed"]) == (N_DEMO, n_right, n_unparsed)
    assert summary["accuracy"]["overall"] == pytest.approx(n_right / N_DEMO)
    for task in mmau.TASKS:
        mine = [i for i, it in enumerate(items) if it["task"] == task]
        assert summary["accuracy"][task] == pytest.approx(sum(i % 3 == 0 for i in mine) / len(mine))
    assert summary["always_first"]["overall"] == pytest.approx(0.25)  # the demo set balances positions
    assert summary["model"] == str(tiny_gqa.mlx_path)
    assert (summary["prompt"], summary["decoding"], summary["max_tokens"]) == ("r1-aqa", "greedy", MAX_TOKENS)
    assert summary["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (summary["missing_audio"], summary["n_missing_audio"]) == ([], 0)
    assert {"mlx_listen", "mlx", "mlx_lm", "python"} <= set(summary["versions"])
    timing = summary["timing"]
    keys = ("audio_load", "features", "encoder", "prefill", "silence", "decode")
    for k in keys:
        assert timing["total_s"][k] == pytest.approx(sum(r["seconds"][k] for r in rows), abs=1e-3)
    busy = sum(timing["total_s"][k] for k in keys)
    assert timing["items_per_s"] == pytest.approx(N_DEMO / busy, rel=1e-3)

    # summary == a re-score of predictions.json by the library == `eval score --json` on both files
    rescored = mmau.score(official).to_dict()
    assert scored_keys(summary) == rescored
    for f in (out / "predictions.jsonl", out / "predictions.json", out):
        assert json.loads(ok(invoke("eval", "score", f, "--json")).stdout) == rescored
    official_text = ok(invoke("eval", "score", out / "predictions.json", "--official")).stdout
    assert f"Total Accuracy: {100 * n_right / N_DEMO:.2f}% over {N_DEMO} samples" in official_text

    # the table on stdout, the progress bar (count, rate, ETA) on stderr
    assert f"== base: {out}" in res.stdout
    assert re.search(rf"^overall\s+{N_DEMO}\s+{n_right}\s+{100 * n_right / N_DEMO:.1f}%", res.stdout, re.M)
    assert f"unparsed outputs (no <answer> tag): {n_unparsed}" in res.stdout
    assert re.search(rf"{N_DEMO}/{N_DEMO} \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(item/s|s/item)\]", res.stderr), res.stderr
    assert "item/s" not in res.stdout


def test_limit_and_task_select_items(demo, tiny_gqa, script, tmp_path):
    items = demo[2]
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--task", "music,speech", "--limit", 5)))
    want = [it["id"] for it in items if it["task"] in ("music", "speech")][:5]
    assert [r["id"] for r in rows_of(out / "predictions.jsonl")] == want
    assert script.calls == want
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n"], summary["tasks"], summary["limit"]) == (5, ["music", "speech"], 5)
    assert [g["n"] for g in summary["tables"]["task"]] == [0, 3, 2]  # sound, music, speech

    res = invoke(*eval_args(demo, tiny_gqa.mlx_path, tmp_path / "bad", "--task", "sound,noise"))
    assert res.exit_code == 2 and "unknown task noise" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_prompt_preset_reaches_the_model_and_run_settings_cannot_mix(demo, tiny_gqa, script, tmp_path):
    from mlx_listen.chat import messages_for

    root, data, items = demo
    out = tmp_path / "mmau"
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--prompt", "mmau", "--limit", 3)))
    rows = rows_of(out / "predictions.jsonl")
    assert [r["prompt"] for r in rows] == ["mmau"] * 3
    assert json.loads((out / "summary.json").read_text())["prompt"] == "mmau"
    assert json.loads((out / "run.json").read_text())["prompt"] == "mmau"
    # The model saw the mmau text: its prompt length is that of the rebuilt mmau prompt, not r1-aqa's.
    _, processor = tiny_gqa.mlx
    for r, it in zip(rows, items):
        n = {p: len(processor.encode(messages_for(presets.build_prompt(it, p), 1), [r["audio_tokens"]]))
             for p in ("mmau", "r1-aqa")}
        assert r["prompt_tokens"] == n["mmau"] != n["r1-aqa"]

    # Any change of prompt, model, decoding or data refuses to add to this run, and touches nothing.
    before = {f.name: f.read_bytes() for f in out.iterdir() if not f.name.startswith(".")}
    other_data = tmp_path / "other.json"
    other_data.write_text(json.dumps(list(reversed(json.loads(data.read_text())))))
    for extra, what in [((), "prompt"),  # the default preset, r1-aqa
                        (("--prompt", "r1-aqa-think"), "prompt"),
                        (("--prompt", "mmau", "--max-tokens", 5), "max_tokens")]:
        err = one_line_error(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, *extra)))
        assert f"{out} holds a run with other settings ({what} differ)" in err
    err = one_line_error(invoke(*eval_args(demo, tmp_path / "no-such-model", out, "--prompt", "mmau")))
    assert "not found" in err
    # Another checkpoint converted into a folder of the same name: refused by its weight fingerprint.
    other = tmp_path / "elsewhere" / tiny_gqa.mlx_path.name
    shutil.copytree(tiny_gqa.mlx_path, other)
    index = json.loads((other / "model.safetensors.index.json").read_text())
    shard = other / sorted(set(index["weight_map"].values()))[0]
    import mlx.core as mx

    w = mx.load(str(shard))
    w = {k: v + 1e-3 if k.endswith("q_proj.weight") else v for k, v in w.items()}
    mx.save_safetensors(str(shard), w, metadata={"format": "mlx"})
    err = one_line_error(invoke(*eval_args(demo, other, out, "--prompt", "mmau")))
    assert "(model_fingerprint differ)" in err  # refused before trying to load the model
    err = one_line_error(invoke("eval", "--data", other_data, "--audio-dir", root, "--model", tiny_gqa.mlx_path,
                                "--out", out, "--prompt", "mmau", "--max-tokens", MAX_TOKENS))
    assert "(data_sha256 differ)" in err
    assert {f.name: f.read_bytes() for f in out.iterdir() if not f.name.startswith(".")} == before
    assert script.calls == [it["id"] for it in items[:3]]  # none of the refused runs reached the model


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_extends_without_redoing_items(demo, tiny_gqa, script, tmp_path, monkeypatch):
    ids = [it["id"] for it in demo[2]]
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 5)))
    first = (out / "predictions.jsonl").read_bytes()
    assert script.calls == ids[:5]

    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 10)))
    assert script.calls == ids[:10]  # only the five new items reached the model
    got = lines(out / "predictions.jsonl")
    assert b"".join(got[:5]) == first  # byte for byte, timings included
    assert [json.loads(x)["id"] for x in got] == ids[:10]
    assert json.loads((out / "summary.json").read_text())["n"] == 10
    assert len(json.loads((out / "predictions.json").read_text())) == 10

    # Nothing left to do: the model is not even loaded, and the results do not change.
    done = (out / "predictions.jsonl").read_bytes()
    summary = json.loads((out / "summary.json").read_text())

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although every item is done")

    monkeypatch.setattr(sys.modules["mlx_listen.load"], "load", no_load)  # the module, not the function
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 10)))
    assert (out / "predictions.jsonl").read_bytes() == done
    assert json.loads((out / "summary.json").read_text()) == summary
    assert script.calls == ids[:10]


def test_resume_after_a_kill_mid_write(demo, tiny_gqa, script, tmp_path):
    ids = [it["id"] for it in demo[2]]
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 4)))
    path = out / "predictions.jsonl"
    done = path.read_bytes()
    # What a kill in the middle of appending item 5 leaves: part of its line, no newline.
    row5 = json.dumps({**demo[2][4], "model_output": "x" * 50, "seconds": {}}, ensure_ascii=False).encode()
    with open(path, "ab") as f:
        f.write(row5[: len(row5) // 2])
    # A reader in the meantime sees the four finished items and leaves the file alone.
    assert json.loads(ok(invoke("eval", "score", path, "--json")).stdout)["n"] == 4
    assert path.read_bytes() == done + row5[: len(row5) // 2]

    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 5)))
    assert script.calls == ids[:5]  # item 5 recomputed, the others not
    got = lines(path)
    assert path.read_bytes() == b"".join(got)  # no partial line left behind
    assert b"".join(got[:4]) == done
    assert [json.loads(x)["id"] for x in got] == ids[:5]
    assert json.loads(got[4])["model_output"] != "x" * 50

    # Killed after the whole object but before its newline: still unfinished, redone, not doubled.
    done = path.read_bytes()
    with open(path, "ab") as f:
        f.write(json.dumps({**demo[2][5], "model_output": "stale"}).encode())
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 6)))
    assert script.calls == ids[:6]
    got = lines(path)
    assert b"".join(got[:5]) == done and [json.loads(x)["id"] for x in got] == ids[:6]
    assert json.loads(got[5])["model_output"] != "stale"
    assert json.loads((out / "summary.json").read_text())["n"] == 6


@pytest.mark.parametrize("bad", [b'{"id": "broken", "model_output": ', b"42", b"\x00\x00\x00"],
                         ids=["cut", "not-an-object", "zeros"])
def test_a_corrupt_line_in_the_middle_is_an_error(demo, tiny_gqa, full_run, script, tmp_path, bad):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(full_run[0] / "run.json", out / "run.json")  # same settings: a resumable run
    good = lines(full_run[0] / "predictions.jsonl")[:4]
    path = out / "predictions.jsonl"
    path.write_bytes(good[0] + bad + b"\n" + b"".join(good[2:]))
    before = path.read_bytes()

    err = one_line_error(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 6)))
    assert f"{path}: line 2 is corrupt" in err
    assert path.read_bytes() == before  # not repaired, not truncated
    assert script.calls == []
    err = one_line_error(invoke("eval", "score", path))
    assert "line 2 is corrupt" in err


@pytest.mark.slow
def test_resume_after_sigkill(demo, tiny_gqa, tmp_path, monkeypatch):
    """A real `mlx-listen eval` process, SIGKILLed once a few items are written, then rerun."""
    items = demo[2]
    out = tmp_path / "run"
    path = out / "predictions.jsonl"
    args = [str(a) for a in eval_args(demo, tiny_gqa.mlx_path, out, max_tokens=16)]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_listen", *args], stdout=log, stderr=log, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if path.exists() and path.read_bytes().count(b"\n") >= 3:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, f"eval ended before the kill:\n{(tmp_path / 'log').read_text()}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    survived = lines(path)
    assert 3 <= len(survived) < len(items)
    done = [json.loads(x)["id"] for x in survived]
    assert done == [it["id"] for it in items[: len(done)]]

    s = Script(items, rewrite=False).install(monkeypatch)  # count, but keep the model's own text
    ok(invoke(*args))
    assert s.calls == [it["id"] for it in items[len(done):]]  # nothing done twice, nothing skipped
    got = lines(path)
    assert got[: len(survived)] == survived
    ids = [json.loads(x)["id"] for x in got]
    assert ids == [it["id"] for it in items] and len(set(ids)) == len(items)
    assert json.loads((out / "summary.json").read_text())["n"] == len(items)


# -- missing audio ---------------------------------------------------------------------------------


def test_missing_or_unreadable_audio_is_listed_before_any_model_work(demo, tiny_gqa, script, tmp_path):
    root, _, items = demo
    audio = tmp_path / "audio"
    audio.mkdir()
    picked = [dict(it) for it in items[:6]]
    for it in picked:
        shutil.copy(root / it["audio_id"], audio / Path(it["audio_id"]).name)
        it["audio_id"] = Path(it["audio_id"]).name
    (audio / picked[1]["audio_id"]).unlink()
    (audio / picked[2]["audio_id"]).write_text("this is not audio\n")
    sf.write(audio / picked[4]["audio_id"], np.zeros(0, np.float32), 16000)
    bad = [picked[i]["audio_id"] for i in (1, 2, 4)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(picked))

    out = tmp_path / "run"
    res = invoke("eval", "--data", data, "--audio-dir", audio, "--model", tmp_path / "no-such-model",
                 "--out", out, "--max-tokens", MAX_TOKENS)
    assert res.exit_code == 1 and "Traceback" not in res.stderr and res.stdout == ""
    err = res.stderr
    assert err.startswith(f"Error: 3 of 6 items have missing or unreadable audio under {audio}")
    assert f"{bad[0]}: missing" in err and f"{bad[1]}: unreadable" in err and f"{bad[2]}: no audio samples" in err
    assert "--skip-missing" in err and "no-such-model" not in err  # the model was never looked at
    assert not out.exists() and script.calls == []

    ok(invoke("eval", "--data", data, "--audio-dir", audio, "--model", tiny_gqa.mlx_path, "--out", out,
              "--max-tokens", MAX_TOKENS, "--skip-missing"))
    good = [picked[i]["id"] for i in (0, 3, 5)]
    assert [r["id"] for r in rows_of(out / "predictions.jsonl")] == good and script.calls == good
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n"], summary["missing_audio"], summary["n_missing_audio"]) == (3, bad, 3)


# -- eval score / eval compare ---------------------------------------------------------------------


def test_score_against_another_answer_key(demo, full_run, tmp_path):
    _, data, items = demo
    out = full_run[0]
    rows = rows_of(out / "predictions.jsonl")
    key = json.loads(data.read_text())
    # Position % 3 == 1 holds a wrong choice in tags: make that choice the key's answer (9 more right);
    # move the answer of four right ones elsewhere (4 fewer); leave two items out of the key.
    for i in range(1, N_DEMO, 3):
        key[i]["answer"] = rows[i]["model_output"]
    for i in (0, 3, 6, 9):
        key[i]["answer"] = next(c for c in key[i]["choices"] if c != key[i]["answer"])
    dropped = {key[26]["id"], key[27]["id"]}  # positions 26 (unparsed) and 27 (right)
    key = key[:26]
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps(key))

    expect = 10 + 9 - 4 - 1
    for f in (out / "predictions.jsonl", out / "predictions.json"):
        got = json.loads(ok(invoke("eval", "score", f, "--data", key_file, "--json")).stdout)
        assert (got["n"], got["correct"]) == (26, expect)
        assert got["accuracy"]["overall"] == pytest.approx(expect / 26)
        by_id = {it["id"]: it for it in key}
        manual = [{**r, "answer": by_id[r["id"]]["answer"]} for r in rows if r["id"] not in dropped]
        assert got == mmau.score(manual).to_dict()
    # without --data the original key still gives the original score
    assert json.loads(ok(invoke("eval", "score", out / "predictions.json", "--json")).stdout)["correct"] == 10


def _run_file(items, right: set[int], path: Path, as_array: bool):
    rows = []
    for i, it in enumerate(items):
        wrong = next(c for c in it["choices"] if c != it["answer"])
        rows.append({**it, "model_output": it["answer"] if i in right else wrong})
    if as_array:
        path.write_text(json.dumps(rows))
    else:
        path.mkdir()
        (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("a_right, b_right, flips, p", [
    (range(10), range(15), (5, 0), 0.0625),            # b = 0, c = 5: 2 / 2**5
    (range(10), range(3, 15), (5, 3), 0.7265625),      # 2 * (1 + 8 + 28 + 56) / 2**8
])
def test_compare_counts_flips_and_mcnemar(demo, tmp_path, a_right, b_right, flips, p):
    items = demo[2][:20]
    a = _run_file(items, set(a_right), tmp_path / "run_a", as_array=False)  # a run folder
    b = _run_file(demo[2][:21], set(b_right), tmp_path / "b.json", as_array=True)  # + one item A lacks
    res = json.loads(ok(invoke("eval", "compare", a, b, "--json")).stdout)
    o = res["overall"]
    assert (res["n"], res["only_a"], res["only_b"]) == (20, 0, 1)
    assert (o["a_correct"], o["b_correct"]) == (len(a_right), len([i for i in b_right if i < 20]))
    assert (o["a"], o["b"]) == (len(a_right) / 20, o["b_correct"] / 20)
    assert (o["wrong_to_right"], o["right_to_wrong"]) == flips
    assert o["p_mcnemar"] == pytest.approx(p, abs=1e-12)
    for task in mmau.TASKS:
        idx = [i for i, it in enumerate(items) if it["task"] == task]
        t = res[task]
        assert t["n"] == len(idx)
        assert t["wrong_to_right"] == sum(i in b_right and i not in a_right for i in idx)
        assert t["right_to_wrong"] == sum(i in a_right and i not in b_right for i in idx)
    text = ok(invoke("eval", "compare", a, b)).stdout
    assert "20 paired items" in text
    assert re.search(rf"^overall\s+20\s+{100 * o['a']:.2f}%\s+{100 * o['b']:.2f}%\s+{flips[0]}\s+{flips[1]}"
                     rf"\s+{p:.4g}$", text, re.M), text


def test_compare_refuses_runs_on_different_questions(demo, tmp_path):
    items = demo[2][:4]
    a = _run_file(items, {0}, tmp_path / "a.json", as_array=True)
    changed = [dict(it) for it in items]
    changed[2]["answer"] = next(c for c in changed[2]["choices"] if c != changed[2]["answer"])
    b = _run_file(changed, {0}, tmp_path / "b.json", as_array=True)
    assert "different questions" in one_line_error(invoke("eval", "compare", a, b))


# -- several processes -----------------------------------------------------------------------------


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    pytest.skip("no two consecutive free TCP ports on 127.0.0.1 for MLX's ring backend")


def mlx_launch() -> str:
    """MLX's launcher: beside this interpreter (a venv not on PATH), else on PATH."""
    beside = Path(sys.executable).with_name("mlx.launch")
    return str(beside) if beside.exists() else (shutil.which("mlx.launch") or "mlx.launch")


@pytest.mark.slow
def test_two_ranks_under_mlx_launch(demo, tiny_gqa, script, tmp_path):
    """`mlx.launch -n 2 --backend ring`: two local processes split the remaining items, rank 0 merges."""
    items = demo[2]
    ids = [it["id"] for it in items]
    out = tmp_path / "run"
    ok(invoke(*eval_args(demo, tiny_gqa.mlx_path, out, "--limit", 4)))  # a head start, in this process
    head = lines(out / "predictions.jsonl")

    n = 12
    port = _free_port_pair()
    cmd = [mlx_launch(), "-n", "2", "--backend", "ring", "--starting-port", str(port),
           sys.executable, "-m", "mlx_listen", *map(str, eval_args(demo, tiny_gqa.mlx_path, out, "--limit", n))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    log = f"{' '.join(cmd)}\nrc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    # mlx.launch exits 0 even when a rank fails, so judge by what the ranks wrote.
    assert proc.returncode == 0 and "exited with code" not in proc.stdout + proc.stderr, log
    both = proc.stdout + proc.stderr
    assert "eval rank 0" in both and "eval rank 1" in both, log  # both ranks' progress bars
    assert proc.stdout.count("== base:") == 1, log  # only rank 0 reports

    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["predictions.json", "predictions.jsonl", "run.json",
                                                       "summary.json"]  # no rank files left
    got = lines(out / "predictions.jsonl")
    rows = [json.loads(x) for x in got]
    assert [r["id"] for r in rows] == ids[:n]  # every item exactly once, in data order
    assert got[:4] == head  # the head start was kept, not redone
    # The 8 remaining items alternate between the ranks (rank r takes remaining[r::2]).
    assert [r["rank"] for r in rows[4:]] == [0, 1] * 4
    assert all(r["model_output"] == r["raw_output"].strip() for r in rows[4:])  # real model text
    assert json.loads((out / "summary.json").read_text())["n"] == n
    assert [r["id"] for r in json.loads((out / "predictions.json").read_text())] == ids[:n]
