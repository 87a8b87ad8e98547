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


def synthetic_rows(seed=6, n=60):
    rng = np.random.default_rng(seed)
    mass = rng.random((n, 3, 4)) * 0.2
    kind = np.arange(n) % 4  # 0: changed, 1-2: unchanged, 3: the silence answer picks no option
    mass[kind == 0, 2, 1] += 0.5  # the selected head listens more when the audio matters
    rows = [{"audio_mass": m.tolist(), "choice_audio": 0, "choice_silence": {0: 1, 1: 0, 2: 0, 3: None}[int(k)],
             "correct": bool(i % 3 == 0), "task": ("sound", "music")[i % 2]}
            for i, (m, k) in enumerate(zip(mass, kind))]
    return mass, kind, rows


def test_validate_on_synthetic_records():
    mass, kind, rows = synthetic_rows()
    n = len(rows)
    rep = validate(HeadSet([(2, 1)]), rows, seed=0)
    changed, unchanged = kind == 0, (kind == 1) | (kind == 2)
    assert (rep["n"], rep["n_changed"], rep["n_unchanged"], rep["n_unparsable"]) == (n, 15, 30, 15)
    p, w = rep["pooled"], rep["within_strata"]
    assert p["auc"] == 1.0 and p["auc_ci95"] is not None and w["auc"] == 1.0
    assert p["mean_changed"] == pytest.approx(mass[changed, 2, 1].mean())
    assert p["difference"] == pytest.approx(mass[changed, 2, 1].mean() - mass[unchanged, 2, 1].mean())
    assert p["difference_ci95"][0] < p["difference"] < p["difference_ci95"][1]
    # matched controls: one head in another layer; 3 layers leave 2 distinct layer sets, and both are used
    assert [len(s) for s in rep["random_sets"]] == [1, 1] and {s[0][0] for s in rep["random_sets"]} == {0, 1}
    # with 2 random sets the smallest empirical p is 1/3: the heads cannot pass, however clear the AUC
    assert w["vs_random"]["min_possible_p"] == pytest.approx(1 / 3) and not rep["passes"]
    assert "does not pass" in rep["verdict"] and "does not beat the random head sets" in rep["verdict"]
    json.dumps(rep, allow_nan=False)
    # a group under 10 items: reported as too small, no interval
    rep = validate(HeadSet([(2, 1)]), rows[:30])
    assert rep["n_changed"] == 8 and rep["pooled"]["too_small"] and rep["pooled"]["auc_ci95"] is None
    assert "too few items" in rep["verdict"]
    # one group empty: undefined values are null, never NaN
    rep = validate(HeadSet([(2, 1)]), [dict(r, choice_silence=1) for r in rows])
    assert rep["pooled"]["auc"] is None and rep["pooled"]["difference_ci95"] is None
    assert rep["within_strata"]["auc"] is None and rep["pooled"]["mean_unchanged"] is None
    assert "nothing to validate" in rep["verdict"]
    json.dumps(rep, allow_nan=False)


def circular_rows(seed: int, n: int = 400, layers: int = 8, heads: int = 8):
    """The circular world: the planted heads track correctness only; the audio changes the answer far
    more often when the model is right (a wrong answer is the text prior, which silence repeats)."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.5
    changed = rng.random(n) < np.where(correct, 0.7, 0.15)
    mass = 0.15 + 0.03 * rng.standard_normal((n, layers, heads))
    for l, h in [(2, 1), (4, 5), (5, 3)]:
        mass[:, l, h] += 0.04 * correct
    return [{"audio_mass": m.tolist(), "choice_audio": 0, "choice_silence": 1 if c else 0, "correct": bool(ok),
             "task": ("sound", "music", "speech")[i % 3]}
            for i, (m, c, ok) in enumerate(zip(mass, changed, correct))]


def test_circular_world_does_not_pass_within_strata():
    """Heads that track correctness only: the pooled comparison 'passes' (AUC well above 0.5 and
    above every random set, as the old validation reported), the within-strata one does not, in
    every one of 3 worlds (~0.4 s each: the bootstraps)."""
    heads = HeadSet([(2, 1), (4, 5), (5, 3)])
    for seed in range(3):
        rep = validate(heads, circular_rows(seed), seed=seed, n_random=39)
        assert rep["pooled"]["passes"] and rep["pooled"]["auc_ci95"][0] > 0.55
        assert not rep["passes"] and rep["within_strata"]["auc_ci95"][0] < 0.5 < rep["within_strata"]["auc_ci95"][1]
        assert "does not pass within strata" in rep["verdict"] and "only track correctness" in rep["verdict"]


def test_listening_heads_pass_within_strata():
    """The same world with heads whose mass rises when the audio changes the answer, within right and
    within wrong answers: the validation passes (so the circular test above can fail)."""
    rows = circular_rows(0)
    for r in rows:
        if r["choice_silence"] == 1:
            r["audio_mass"][2][1] += 0.05
            r["audio_mass"][4][5] += 0.05
    rep = validate(HeadSet([(2, 1), (4, 5), (5, 3)]), rows, seed=0, n_random=39)
    assert rep["passes"] and rep["within_strata"]["vs_random"]["empirical_p"] == pytest.approx(1 / 40)
    assert rep["n_random_sets"] == 39
    assert rep["verdict"].startswith("Listening validation passes within strata")


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
    assert rep["strata"] == "the audio answer's correctness x task"
    assert any("were used to find" in w for w in rep["warnings"])  # validated on its own calibration items
    assert "were used to find" in res.stderr
    h = rep["pooled"]
    if changed.any() and not changed.all():
        from mlx_listen.stats import auc

        assert h["auc"] == pytest.approx(auc(L[changed], L[~changed]))
        assert h["difference"] == pytest.approx(L[changed].mean() - L[~changed].mean())
        assert f"AUC {h['auc']:.3f}" in res.stdout
    assert len(rep["random_sets"]) == rep["n_random_sets"] >= 1
    assert f"{n} items; the audio changed the chosen option on {changed.sum()}" in res.stdout
    assert "within strata: AUC" in res.stdout and "matched random head sets" in res.stdout

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
    assert rep["pooled"]["auc"] is None and rep["pooled"]["difference"] is None
    assert rep["within_strata"]["auc"] is None and "nothing to validate" in res.stdout and "AUC n/a" in res.stdout
    assert_png(out / "validation.png")
