"""Validating a head set (`method/validation.py`): does the listening score separate the items whose
answer the audio changed? On synthetic records with a known answer, and through
`mlx-listen validate-heads` on the tiny model with the head set of the `heads_run` fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import invoke, ok
from support.heads import MAX_TOKENS, Counter, assert_png, rows_of, strict_json

from mlx_listen.eval import mmau
from mlx_listen.headset import HeadSet
from mlx_listen.method.validation import validate
from mlx_listen.presets import build_prompt


def test_validate_on_synthetic_records():
    rng = np.random.default_rng(6)
    n = 60
    mass = rng.random((n, 3, 4)) * 0.2
    kind = np.arange(n) % 4  # 0: changed, 1-2: unchanged, 3: the silence answer picks no option
    mass[kind == 0, 2, 1] += 0.5  # the selected head listens more when the audio matters
    rows = [{"audio_mass": m.tolist(), "choice_audio": 0, "choice_silence": {0: 1, 1: 0, 2: 0, 3: None}[int(k)]}
            for m, k in zip(mass, kind)]
    rep = validate(HeadSet([(2, 1)]), rows, seed=0, n_random=4)
    changed, unchanged = kind == 0, (kind == 1) | (kind == 2)
    assert (rep["n"], rep["n_changed"], rep["n_unchanged"], rep["n_unparsable"]) == (n, 15, 30, 15)
    h = rep["heads"]
    assert h["auc"] == 1.0 and h["auc_ci95"] is not None
    assert h["mean_changed"] == pytest.approx(mass[changed, 2, 1].mean())
    assert h["difference"] == pytest.approx(mass[changed, 2, 1].mean() - mass[unchanged, 2, 1].mean())
    assert h["difference_ci95"][0] < h["difference"] < h["difference_ci95"][1]
    assert len(rep["random_control"]) == 4
    for c in rep["random_control"]:  # matched: one head, in another layer
        assert len(c["heads"]) == 1 and c["heads"][0][0] != 2
    json.dumps(rep, allow_nan=False)
    # a group under 10 items: reported as too small, no interval
    few = rows[:30]
    rep = validate(HeadSet([(2, 1)]), few)
    assert rep["n_changed"] == 8 and rep["heads"]["too_small"] and rep["heads"]["auc_ci95"] is None
    # one group empty: undefined values are null, never NaN
    rep = validate(HeadSet([(2, 1)]), [dict(r, choice_silence=1) for r in rows])
    assert rep["heads"]["auc"] is None and rep["heads"]["difference_ci95"] is None
    assert rep["random_auc_mean"] is None and rep["heads"]["mean_unchanged"] is None
    json.dumps(rep, allow_nan=False)


def validate_args(demo, model, heads, out, *extra):
    root, data, _ = demo
    return ["validate-heads", "--heads", heads, "--model", model, "--data", data, "--audio-dir", root,
            "--out", out, "--max-tokens", MAX_TOKENS, *extra]


@pytest.mark.slow
def test_validate_heads_command(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    from mlx_listen.answers import generate
    from mlx_listen.audio import load_audio
    from mlx_listen.prompt import prepare

    root, _, items = demo
    n = 6
    out = tmp_path / "val"
    count = Counter(monkeypatch)
    # the tiny model's gibberish picks no option: let its length pick one, so both groups fill
    monkeypatch.setattr(mmau, "matched_choice", lambda pred, choices: len(pred) % len(choices))
    res = ok(invoke(*validate_args(demo, tiny_gqa.mlx_path, heads_run[0], out, "--limit", n)))
    assert count.n == 2 * n  # each item answered with its audio and with silence
    rep = strict_json(out / "validation.json")
    assert_png(out / "validation.png")
    rows = rows_of(out / "items.jsonl")
    assert [r["id"] for r in rows] == [it["id"] for it in items[:n]]

    # the audio answer and its mass are the calibration pass's (same prompt, same greedy decoding)
    calib = {r["id"]: r for r in rows_of(heads_run[0].with_name("HEADS.items.jsonl"))}
    for r in rows:
        assert r["answer_audio"] == calib[r["id"]]["answer"]
        assert np.abs(np.array(r["audio_mass"]) - np.array(calib[r["id"]]["audio_mass"])).max() < 1e-6
        assert r["choice_audio"] == len(r["answer_audio"]) % 4 and r["choice_silence"] == len(r["answer_silence"]) % 4
        assert r["changed"] == (r["choice_audio"] != r["choice_silence"])
    # the silence answer: the same question with equal-length digital zeros
    model, processor = tiny_gqa.mlx
    audio = load_audio(root / items[0]["audio_id"])
    silent = prepare(model, processor, [np.zeros_like(audio)], build_prompt(items[0]))
    sil = generate(model, processor, silent, max_tokens=MAX_TOKENS, temp=0.0)
    assert rows[0]["answer_silence"] == mmau.extract_answer(sil.text)[0]

    hs = HeadSet.load(heads_run[0])
    changed = np.array([r["changed"] for r in rows])
    L = np.array([hs.listening(np.array(r["audio_mass"])) for r in rows])
    assert (rep["n"], rep["n_changed"], rep["n_unchanged"]) == (n, changed.sum(), n - changed.sum())
    assert {k: v for k, v in rep.items() if k != "warnings"} == validate(hs, rows, 0)
    assert any("were used to find" in w for w in rep["warnings"])  # validated on its own calibration items
    assert "were used to find" in res.stderr
    h = rep["heads"]
    if changed.any() and not changed.all():
        from mlx_listen.stats import auc

        assert h["auc"] == pytest.approx(auc(L[changed], L[~changed]))
        assert h["difference"] == pytest.approx(L[changed].mean() - L[~changed].mean())
        assert f"AUC {h['auc']:.3f}" in res.stdout
    assert len(rep["random_control"]) == 10
    assert f"{n} items; the audio changed the chosen option on {changed.sum()}" in res.stdout
    assert "matched random head sets: AUC" in res.stdout

    # rerun: nothing recomputed, the same report
    before = (out / "items.jsonl").read_bytes()
    ok(invoke(*validate_args(demo, tiny_gqa.mlx_path, heads_run[0], out, "--limit", n)))
    assert count.n == 2 * n and (out / "items.jsonl").read_bytes() == before
    assert strict_json(out / "validation.json") == rep


@pytest.mark.slow
def test_validate_heads_with_one_group_writes_strict_json(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    """Audio and silence give the same answer everywhere: no AUC, and null (not NaN) in the report."""
    monkeypatch.setattr(mmau, "extract_answer", lambda text: ("same", True))
    monkeypatch.setattr(mmau, "matched_choice", lambda pred, choices: 0)
    out = tmp_path / "val"
    res = ok(invoke(*validate_args(demo, tiny_gqa.mlx_path, heads_run[0], out, "--limit", 2)))
    rep = strict_json(out / "validation.json")
    assert (rep["n"], rep["n_changed"], rep["n_unchanged"]) == (2, 0, 2)
    assert rep["heads"]["auc"] is None and rep["heads"]["difference"] is None
    assert rep["random_auc_mean"] is None
    assert "too few items" in res.stdout and "AUC n/a" in res.stdout
    assert_png(out / "validation.png")
