"""Audio-specialist heads (`method/heads.py`, arXiv 2603.06854): finding and ranking them, on
synthetic arrays with known answers (a planted head) and through `mlx-listen heads` on the tiny
model over the synthetic demo set (the `heads_run` fixture).

The tiny model answers gibberish, so correctness is made non-trivial by patching
`mmau.string_match` (the heads module calls it through `mmau`): with `support.heads.parity`, an
item is right iff its answer sits at an even choice position, which the demo set balances
(accuracy exactly 50%); in the planted run, an item is right iff one chosen head's audio mass is
above its median.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from support import invoke, ok
from support.heads import (
    MAX_TOKENS,
    N_DEMO,
    Counter,
    K,
    assert_png,
    heads_args,
    one_line_error,
    parity,
    rows_of,
    strict_json,
)

from mlx_listen import stats
from mlx_listen.errors import ListenError
from mlx_listen.eval import mmau
from mlx_listen.headset import HeadSet
from mlx_listen.method.heads import find_heads, top_heads
from mlx_listen.records import file_sha256


@pytest.mark.parametrize("value,word", [(True, "right"), (False, "wrong")])
def test_all_right_or_all_wrong_is_a_clear_error(value, word):
    mass = np.random.default_rng(3).random((10, 2, 3))
    with pytest.raises(ListenError, match=f"every calibration item is {word}"):
        stats.head_scores(mass, np.full(10, value))
    rows = [{"audio_mass": m.tolist(), "correct": value} for m in mass]
    with pytest.raises(ListenError, match="undefined"):
        find_heads(rows, 3, {}, center="none")
    with pytest.raises(ListenError, match="no calibration items"):
        find_heads([], 3, {}, center="none")


def test_top_heads_best_first_ties_by_layer_then_head():
    s = np.array([[0.1, 0.5, -0.2],
                  [0.5, 0.9, 0.5],
                  [-0.7, 0.0, 0.5]])
    assert top_heads(s, 9) == [(1, 1), (0, 1), (1, 0), (1, 2), (2, 2), (0, 0), (2, 1), (0, 2), (2, 0)]
    assert top_heads(s, 2) == [(1, 1), (0, 1)]
    # largest positive r, not largest |r|: the strongly negative head (2, 0) comes last
    assert top_heads(s, 9)[-1] == (2, 0)


def test_planted_head_ranks_first_on_synthetic_data():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        n, L, Hh = 120, 4, 6
        mass = rng.random((n, L, Hh))
        pl, ph = int(rng.integers(L)), int(rng.integers(Hh))
        x = mass[:, pl, ph] + 0.05 * rng.standard_normal(n)
        rows = [{"audio_mass": m.tolist(), "correct": bool(c)} for m, c in zip(mass, x > np.median(x))]
        hs = find_heads(rows, 5, {"model": "m"}, center="none")
        assert hs.heads[0] == (pl, ph)
        assert len(hs.heads) == 5 and len(set(hs.heads)) == 5
        others = np.delete(hs.scores.ravel(), pl * Hh + ph)
        assert hs.scores[pl, ph] > 0.6 > np.abs(others).max()
        assert hs.meta["n_items"] == n and hs.meta["accuracy"] == 0.5 and hs.meta["model"] == "m"
        # the opposite dependence makes it the worst head, not the best
        flipped = [dict(r, correct=not r["correct"]) for r in rows]
        assert top_heads(find_heads(flipped, 5, {}, center="none").scores, L * Hh)[-1] == (pl, ph)


def test_ranking_is_deterministic_and_order_free():
    rng = np.random.default_rng(7)
    mass = rng.random((40, 3, 4))
    rows = [{"audio_mass": m.tolist(), "correct": bool(c)} for m, c in zip(mass, rng.random(40) < 0.5)]
    a = find_heads(rows, 6, {}, center="none")
    b = find_heads(rows, 6, {}, center="none")
    c = find_heads([rows[i] for i in rng.permutation(40)], 6, {}, center="none")
    assert a.heads == b.heads == c.heads
    assert np.allclose(a.scores, c.scores, atol=1e-12)
    with pytest.raises(ListenError, match="only 12 heads|12 heads"):  # k above the head count: refused, not capped
        find_heads(rows, 100, {}, center="none")


def test_planted_head_ranks_first_on_real_records(heads_run):
    """The demo set's real audio masses, with correctness rewritten to follow one head."""
    rows = rows_of(heads_run[0].with_name("HEADS.items.jsonl"))
    mass = np.array([r["audio_mass"] for r in rows])
    _, L, Hh = mass.shape
    for l in range(L):
        for h in range(Hh):
            x = mass[:, l, h]
            planted = [dict(r, correct=bool(v > np.median(x))) for r, v in zip(rows, x)]
            hs = find_heads(planted, K, {})
            assert hs.heads[0] == (l, h), (l, h, hs.heads)


# -- `mlx-listen heads` -----------------------------------------------------------------------------


def test_heads_command_outputs(demo, tiny_gqa, heads_run, shape):
    _, data, items = demo
    out, res, count = heads_run
    L, Hh = shape
    assert count.n == N_DEMO
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == sorted(
        ["HEADS.json", "HEADS.csv", "HEADS.scores.png", "HEADS.listening.png", "HEADS.items.jsonl",
         "HEADS.items.meta.json"])

    rows = rows_of(out.with_name("HEADS.items.jsonl"))
    assert [r["id"] for r in rows] == [it["id"] for it in items]
    assert [r["correct"] for r in rows] == [parity(it["answer"], "", it["choices"]) for it in items]
    for r, m in zip(rows, count.masses):
        assert np.abs(np.array(r["audio_mass"]) - m).max() < 1e-6  # the mass the model produced, stored
        assert r["audio_tokens"] > 0

    raw = strict_json(out)
    for key in ("heads", "scores", "k", "model", "data_sha256", "n_items", "accuracy", "calibration_ids", "prompt",
                "model_signature", "null", "stability", "other_center"):
        assert key in raw, key
    assert raw["k"] == K and len(raw["heads"]) == K
    assert raw["model"] == str(tiny_gqa.mlx_path) and raw["data_sha256"] == file_sha256(data)
    assert raw["n_items"] == N_DEMO and raw["accuracy"] == 0.5  # the demo set balances positions
    assert (raw["prompt"], raw["max_tokens"], raw["seed"]) == ("r1-aqa", MAX_TOKENS, 0)
    assert set(raw["scores"]) == {f"{l},{h}" for l in range(L) for h in range(Hh)}
    # scores = the default score of the stored records (within task, clip and question length
    # partialled out); heads = the K best, best first
    assert raw["center"] == "task" and raw["partialled_out"] == ["task", "log clip length (audio tokens)",
                                                                 "log question length (text tokens of the prompt)"]
    assert raw["score"].startswith("partial r(audio mass, correct | task, log clip length, log question length)")
    assert all(r["text_tokens"] > 0 and r["text_tokens"] + r["audio_tokens"] > r["audio_tokens"] for r in rows)
    mass = np.array([r["audio_mass"] for r in rows])
    want = stats.head_scores(mass, np.array([r["correct"] for r in rows]), center="task",
                             tasks=[r["task"] for r in rows],
                             covariates=stats.length_covariates([r["audio_tokens"] for r in rows],
                                                                [r["text_tokens"] for r in rows]))
    for l in range(L):
        for h in range(Hh):
            assert raw["scores"][f"{l},{h}"] == pytest.approx(want[l, h], abs=1e-6)
    assert [tuple(x) for x in raw["heads"]] == top_heads(want, K)
    r_sel = [raw["scores"][f"{l},{h}"] for l, h in raw["heads"]]
    assert r_sel == sorted(r_sel, reverse=True) and min(r_sel) >= max(
        v for k, v in raw["scores"].items() if [int(x) for x in k.split(",")] not in raw["heads"])

    csv = out.with_suffix(".csv").read_text().splitlines()
    assert csv[0] == "layer,head,r,selected,mean_mass,mean_mass_correct,mean_mass_wrong"
    assert len(csv) == 1 + L * Hh
    correct = np.array([r["correct"] for r in rows])
    for line in csv[1:]:
        l, h, r, sel, mm, mc, mw = line.split(",")
        l, h = int(l), int(h)
        assert float(r) == pytest.approx(want[l, h], abs=1e-6)
        assert int(sel) == ([l, h] in raw["heads"])
        assert float(mm) == pytest.approx(mass[:, l, h].mean(), abs=1e-6)
        assert float(mc) == pytest.approx(mass[correct, l, h].mean(), abs=1e-6)
        assert float(mw) == pytest.approx(mass[~correct, l, h].mean(), abs=1e-6)
    assert_png(out.with_name("HEADS.scores.png"))
    assert_png(out.with_name("HEADS.listening.png"))

    assert "28 items, accuracy 50.0%" in res.stdout
    for l, h in raw["heads"]:
        assert f"{l:>3} {h:>3}  {want[l, h]:+.3f}" in res.stdout
    assert f"{N_DEMO}/{N_DEMO}" in res.stderr and "item/s" in res.stderr  # the progress bar


@pytest.mark.slow
def test_heads_command_finds_a_planted_head(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    """End to end: correctness follows one head's audio mass (the parity run's worst head)."""
    rows = rows_of(heads_run[0].with_name("HEADS.items.jsonl"))
    parity_scores = HeadSet.load(heads_run[0]).scores
    l, h = np.unravel_index(np.argmin(parity_scores), parity_scores.shape)
    threshold = np.median([r["audio_mass"][l][h] for r in rows])
    count = Counter(monkeypatch)
    monkeypatch.setattr(mmau, "string_match", lambda a, p, c: bool(count.masses[-1][l, h] > threshold))
    out = tmp_path / "planted.json"
    ok(invoke(*heads_args(demo, tiny_gqa.mlx_path, out)))
    raw = json.loads(out.read_text())
    assert raw["heads"][0] == [l, h] and raw["accuracy"] == 0.5
    assert raw["scores"][f"{l},{h}"] > 0.5


@pytest.mark.slow
def test_heads_ranking_is_deterministic_across_runs(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    monkeypatch.setattr(mmau, "string_match", parity)
    out = tmp_path / "again.json"
    ok(invoke(*heads_args(demo, tiny_gqa.mlx_path, out, "--limit", 10)))
    first10 = rows_of(heads_run[0].with_name("HEADS.items.jsonl"))[:10]
    again = rows_of(out.with_name("again.items.jsonl"))
    def drop(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    assert [drop(r) for r in again] == [drop(r) for r in first10]  # same answers, same masses
    want = find_heads(first10, K, {})
    raw = json.loads(out.read_text())
    assert [tuple(x) for x in raw["heads"]] == want.heads and raw["n_items"] == 10


def copy_records(heads_run, dest: Path) -> Path:
    dest.mkdir()
    for name in ("HEADS.items.jsonl", "HEADS.items.meta.json"):
        shutil.copy(heads_run[0].with_name(name), dest / name)
    return dest / "HEADS.json"


@pytest.mark.slow
def test_heads_resumes_without_recomputing(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    ids = [it["id"] for it in demo[2]]
    out = copy_records(heads_run, tmp_path / "resume")
    records = out.with_name("HEADS.items.jsonl")
    before = records.read_bytes()
    monkeypatch.setattr(mmau, "string_match", parity)
    count = Counter(monkeypatch)
    ok(invoke(*heads_args(demo, tiny_gqa.mlx_path, out)))
    assert count.n == 0 and records.read_bytes() == before
    assert strict_json(out) == strict_json(heads_run[0])  # the same heads from the same records

    # a kill mid-append leaves half a line: it is cut and that item alone is redone
    lines = before.splitlines(keepends=True)
    records.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    ok(invoke(*heads_args(demo, tiny_gqa.mlx_path, out)))
    assert count.n == 1
    now = records.read_bytes().splitlines(keepends=True)
    assert now[:-1] == lines[:-1] and now[-1].endswith(b"\n")
    redone, orig = json.loads(now[-1]), json.loads(lines[-1])
    assert redone["id"] == ids[-1] and redone["audio_mass"] == orig["audio_mass"]
    assert strict_json(out)["heads"] == strict_json(heads_run[0])["heads"]


def test_heads_refuses_other_settings_in_the_same_out(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    out = copy_records(heads_run, tmp_path / "mix")
    before = {p.name: p.read_bytes() for p in out.parent.iterdir() if not p.name.startswith(".")}

    def no_load(*a, **k):
        raise AssertionError("the model was loaded for a refused run")

    monkeypatch.setattr(sys.modules["mlx_listen.load"], "load", no_load)
    for extra, what in [(("--prompt", "mmau"), "prompt"), (("--max-tokens", MAX_TOKENS + 1), "max_tokens")]:
        err = one_line_error(invoke(*heads_args(demo, tiny_gqa.mlx_path, out, *extra)))
        assert f"{what} differ" in err and "use another --out" in err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir() if not p.name.startswith(".")} == before


@pytest.mark.parametrize("value,word", [(False, "wrong"), (True, "right")])
def test_heads_with_one_outcome_is_a_one_line_error(demo, tiny_gqa, tmp_path, monkeypatch, value, word):
    monkeypatch.setattr(mmau, "string_match", lambda *a: value)
    out = tmp_path / "HEADS.json"
    err = one_line_error(invoke(*heads_args(demo, tiny_gqa.mlx_path, out, "--limit", 3)))
    assert f"every calibration item is {word}" in err
    assert not out.exists() and len(rows_of(out.with_name("HEADS.items.jsonl"))) == 3  # kept for a rerun


def test_heads_refuses_missing_audio_and_empty_data(demo, tiny_gqa, tmp_path):
    root, data, items = demo
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(items[0], audio_id="./audios/none.wav")] + items[1:3]))
    err = one_line_error(invoke(*heads_args((root, bad, None), tiny_gqa.mlx_path, tmp_path / "a.json")))
    assert "1 audio files missing" in err and "none.wav" in err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    err = one_line_error(invoke(*heads_args((root, empty, None), tiny_gqa.mlx_path, tmp_path / "b.json")))
    assert "holds no items" in err


@pytest.mark.slow
def test_heads_target_margin(tiny_gqa, tmp_path):
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.eval.mmau import load_items
    from mlx_listen.method.heads import calibrate, find_heads

    model, processor = tiny_gqa.mlx
    demo = make_demo_set(tmp_path / "demo", n_per_kind=1)
    items = load_items(demo)[:6]
    rows = calibrate(model, processor, items, demo.parent, tmp_path / "H.items.jsonl", "r1-aqa", max_tokens=4,
                     progress=False, margin=True)
    assert all(np.isfinite(r["margin"]) for r in rows)
    hs = find_heads(rows, 3, {}, target="margin", center="none")  # 6 items: the pooled score
    assert len(hs.heads) == 3 and "margin" in hs.meta["criterion"]
    y = np.array([r["margin"] for r in rows])
    mass = np.array([r["audio_mass"] for r in rows])
    l, h = hs.heads[0]
    assert hs.scores[l, h] == pytest.approx(np.corrcoef(mass[:, l, h], y)[0, 1], abs=1e-9)


def test_score_plot_title_names_the_score(tmp_path, monkeypatch):
    """Before: the heads PNG said "Pearson r(audio mass, correct)" under --center task --target margin."""
    from mlx_listen.method import heads as H

    titles = []
    monkeypatch.setattr(H, "score_heatmap", lambda s, heads, path, score: titles.append(score))
    monkeypatch.setattr(H, "plot_listening_split", lambda *a, **k: None)
    rng = np.random.default_rng(0)
    rows = [{"audio_mass": rng.random((2, 3)).tolist(), "correct": bool(i % 2)} for i in range(8)]
    hs = HeadSet([(0, 1)], rng.random((2, 3)), {"score": H.score_name("task", "margin")})
    H.write_side_files(hs, rows, tmp_path / "HEADS.json", 0)
    assert titles == ["partial r(audio mass, the correct option's log-prob margin | task, log clip length, "
                      "log question length)"]
    assert H.score_name("none") == "Pearson r(audio mass, correct)"
