"""Audio-specialist heads (arXiv 2603.06854): scores, ranking, the
listening score, the `heads` / `validate-heads` / `attention` commands and `ask --listen`.

The library half runs on synthetic arrays with known answers (Pearson r against numpy, AUC by
hand, a planted head). The command half runs the tiny model over the synthetic demo set. The
tiny model answers gibberish, so correctness is made non-trivial by patching
`mmau.string_match` (the heads module calls it through `mmau`): in `PARITY`, an item is right iff
its answer sits at an even choice position, which the demo set balances (accuracy exactly 50%);
in the planted run, an item is right iff one chosen head's audio mass is above its median.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from support import invoke, ok, tone

from mlx_listen import stats
from mlx_listen.errors import ListenError
from mlx_listen.eval import mmau
from mlx_listen.eval.conditions import Answerer
from mlx_listen.eval.demo_set import make_demo_set
from mlx_listen.headset import HeadSet, random_heads
from mlx_listen.method.heads import find_heads, top_heads
from mlx_listen.method.validation import validate
from mlx_listen.presets import build_prompt
from mlx_listen.records import file_sha256

MAX_TOKENS = 4
N_DEMO = 28
K = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTION = "What does the audio contain?"


def one_line_error(result) -> str:
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    err = result.stderr.strip().splitlines()[-1]  # a progress bar may come first
    assert err.startswith("Error: ") and "Traceback" not in result.output, result.output
    assert result.stdout == ""
    return err


def assert_png(path: Path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > 100 and h > 100 and len(data) > 1000, (path, w, h, len(data))


def strict_json(path: Path):
    """Parse as strict JSON: NaN / Infinity are not JSON."""
    def bad(c):
        raise AssertionError(f"{path} holds {c}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def parity(answer, prediction, choices) -> bool:
    return list(choices).index(answer) % 2 == 0


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


class Counter:
    """Wraps `Answerer.respond`, recording each answer's audio mass (the model's work)."""

    def __init__(self, mp):
        self.masses = []
        real = Answerer.respond

        def wrapped(answerer, *a, **kw):
            out = real(answerer, *a, **kw)
            self.masses.append(out["base"].answer.audio_mass)
            return out

        mp.setattr(Answerer, "respond", wrapped)

    @property
    def n(self):
        return len(self.masses)


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = make_demo_set(root)
    items = mmau.load_items(data)
    assert len(items) == N_DEMO
    return root, data, items


def heads_args(demo, model, out, *extra):
    root, data, _ = demo
    return ["heads", "--model", model, "--data", data, "--audio-dir", root, "--out", out,
            "--max-tokens", MAX_TOKENS, "--k", K, *extra]


@pytest.fixture(scope="module")
def heads_run(demo, tiny_gqa, tmp_path_factory):
    """`mlx-listen heads` over the whole demo set, correctness by answer-position parity."""
    out = tmp_path_factory.mktemp("heads") / "HEADS.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmau, "string_match", parity)
        count = Counter(mp)
        res = ok(invoke(*heads_args(demo, tiny_gqa.mlx_path, out)))
    return out, res, count


@pytest.fixture
def shape(tiny_gqa):
    model, _ = tiny_gqa.mlx
    return len(model.layers), model.config.text_config.num_attention_heads


# -- head scores (library) ----------------------------------------------------------------------

def test_pearson_r_equals_numpy_corrcoef_per_head():
    rng = np.random.default_rng(1)
    mass = rng.random((57, 3, 5))
    mass[:, 1] *= 1e-3  # small-valued heads are scored like any other
    correct = rng.random(57) < 0.4
    r = stats.head_scores(mass, correct)
    assert r.shape == (3, 5)
    for l in range(3):
        for h in range(5):
            assert r[l, h] == pytest.approx(np.corrcoef(mass[:, l, h], correct)[0, 1], abs=1e-12)
    assert np.abs(r).max() < 1 and len(np.unique(r)) == 15  # random data: no degenerate values


def test_constant_head_scores_zero():
    rng = np.random.default_rng(2)
    mass = rng.random((300, 2, 4))
    mass[:, 0, 1] = 0.1  # a mean of 300 copies of 0.1 is not exactly 0.1 in floating point
    mass[:, 1, 3] = 1 / 3
    mass[:, 1, 0] = 0.0
    correct = rng.random(300) < 0.5
    r = stats.head_scores(mass, correct)
    assert r[0, 1] == 0.0 and r[1, 3] == 0.0 and r[1, 0] == 0.0
    assert np.count_nonzero(r) == 5


@pytest.mark.parametrize("value,word", [(True, "right"), (False, "wrong")])
def test_all_right_or_all_wrong_is_a_clear_error(value, word):
    mass = np.random.default_rng(3).random((10, 2, 3))
    with pytest.raises(ListenError, match=f"every calibration item is {word}"):
        stats.head_scores(mass, np.full(10, value))
    rows = [{"audio_mass": m.tolist(), "correct": value} for m in mass]
    with pytest.raises(ListenError, match="undefined"):
        find_heads(rows, 3, {})
    with pytest.raises(ListenError, match="no calibration items"):
        find_heads([], 3, {})


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
        hs = find_heads(rows, 5, {"model": "m"})
        assert hs.heads[0] == (pl, ph)
        assert len(hs.heads) == 5 and len(set(hs.heads)) == 5
        others = np.delete(hs.scores.ravel(), pl * Hh + ph)
        assert hs.scores[pl, ph] > 0.6 > np.abs(others).max()
        assert hs.meta["n_items"] == n and hs.meta["accuracy"] == 0.5 and hs.meta["model"] == "m"
        # the opposite dependence makes it the worst head, not the best
        flipped = [dict(r, correct=not r["correct"]) for r in rows]
        assert top_heads(find_heads(flipped, 5, {}).scores, L * Hh)[-1] == (pl, ph)


def test_ranking_is_deterministic_and_order_free():
    rng = np.random.default_rng(7)
    mass = rng.random((40, 3, 4))
    rows = [{"audio_mass": m.tolist(), "correct": bool(c)} for m, c in zip(mass, rng.random(40) < 0.5)]
    a = find_heads(rows, 6, {})
    b = find_heads(rows, 6, {})
    c = find_heads([rows[i] for i in rng.permutation(40)], 6, {})
    assert a.heads == b.heads == c.heads
    assert np.allclose(a.scores, c.scores, atol=1e-12)
    with pytest.raises(ListenError, match="only 12 heads|12 heads"):  # k above the head count: refused, not capped
        find_heads(rows, 100, {})


# -- the listening score, AUC, bootstrap, random control ------------------------------------------

def test_listening_is_the_mean_over_the_selected_heads():
    mass = np.arange(12.0).reshape(3, 4) / 20
    hs = HeadSet([(0, 1), (2, 3), (1, 0)])
    assert hs.listening(mass) == pytest.approx((mass[0, 1] + mass[2, 3] + mass[1, 0]) / 3)
    assert hs.layers == [0, 1, 2]
    assert HeadSet([(2, 0), (2, 1)]).layers == [2]


def test_random_heads_seeded_distinct_and_uniform():
    L, Hh, k = 3, 4, 5
    assert random_heads(L, Hh, k, 0) == random_heads(L, Hh, k, 0)
    draws = [random_heads(L, Hh, k, s) for s in range(3000)]
    assert len({tuple(d) for d in draws[:50]}) > 40  # seeds give different sets
    for d in draws:
        assert len(d) == k and len(set(d)) == k
        assert all(0 <= l < L and 0 <= h < Hh and isinstance(l, int) and isinstance(h, int) for l, h in d)
    counts = np.zeros((L, Hh))
    for d in draws:
        for l, h in d:
            counts[l, h] += 1
    expected = 3000 * k / (L * Hh)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 31.3, counts  # chi-square, 11 degrees of freedom, p = 0.001
    assert sorted(random_heads(L, Hh, L * Hh, 9)) == [(l, h) for l in range(L) for h in range(Hh)]


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


# -- HEADS.json -------------------------------------------------------------------------------------

def test_headset_save_load_round_trip(tmp_path):
    scores = np.random.default_rng(8).uniform(-1, 1, (3, 5))
    hs = HeadSet(top_heads(scores, 4), scores, {"model": "m", "data": "abc", "n_items": 7, "accuracy": 0.5})
    path = tmp_path / "HEADS.json"
    hs.save(path)
    raw = json.loads(path.read_text())
    assert raw["heads"] == [list(h) for h in hs.heads] and raw["k"] == 4
    assert set(raw["scores"]) == {f"{l},{h}" for l in range(3) for h in range(5)}
    back = HeadSet.load(path)
    assert back.heads == hs.heads and all(isinstance(x, int) for h in back.heads for x in h)
    assert back.scores.shape == (3, 5) and np.allclose(back.scores, scores, atol=1e-6)
    assert back.meta == hs.meta
    back.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == raw

    (tmp_path / "plain.json").write_text(json.dumps({"heads": [[1, 2]]}))
    plain = HeadSet.load(tmp_path / "plain.json")
    assert plain.heads == [(1, 2)] and plain.scores is None


@pytest.mark.parametrize("text,why", [("not json", "not a HEADS.json"), ("[1, 2]", "not a HEADS.json"),
                                      ('{"k": 3}', "not a HEADS.json"), ('{"heads": [[1, 2, 3]]}', "not a HEADS"),
                                      ('{"heads": []}', "selects no heads"),
                                      ('{"heads": [[0, 1], [1, 0], [0, 1]]}', "more than once")])
def test_headset_load_refuses_bad_files(tmp_path, text, why):
    path = tmp_path / "h.json"
    path.write_text(text)
    with pytest.raises(ListenError, match=why):
        HeadSet.load(path)
    with pytest.raises(ListenError, match="not a HEADS.json"):
        HeadSet.load(tmp_path / "missing.json")


def test_headset_check_refuses_heads_outside_the_model():
    HeadSet([(0, 0), (1, 3)]).check(2, 4)
    for bad in [(2, 0), (0, 4), (-1, 0), (0, -1)]:
        with pytest.raises(ListenError, match=r"do not exist in this model \(2 layers x 4 heads\)"):
            HeadSet([(0, 0), bad]).check(2, 4)


# -- audio mass on the tiny model -------------------------------------------------------------------

def test_mass_captured_during_generation_equals_prefill_capture(demo, tiny_gqa):
    from mlx_listen.audio import load_audio
    from mlx_listen.generate import generate
    from mlx_listen.hooks import AUDIO_MASS, PATTERN, run_with_cache
    from mlx_listen.prompt import prepare

    model, processor = tiny_gqa.mlx
    root, _, items = demo
    for item in items[:3]:
        prompt = prepare(model, processor, [load_audio(root / item["audio_id"])], build_prompt(item))
        T = len(prompt.ids) - 1
        from mlx_listen.eval.conditions import Answerer, baseline

        ans = Answerer(model, processor, [baseline()], max_tokens=MAX_TOKENS, audio_mass=True)(prompt)["base"]
        mass = ans.audio_mass
        assert ans.text == generate(model, processor, prompt, max_tokens=MAX_TOKENS, temp=0.0).text
        _, cap = run_with_cache(model, prompt, [AUDIO_MASS.format("*"), PATTERN.format("*")], at=slice(0, None))
        prefill = cap.audio_mass(T)
        assert mass.shape == prefill.shape == (len(model.layers), model.config.text_config.num_attention_heads)
        assert np.abs(mass - prefill).max() < 1e-6
        # the definition, from the full pattern: row T summed over the <|AUDIO|> positions
        pattern = np.stack([np.array(cap.get(PATTERN.format(l))[0]) for l in range(len(model.layers))])  # (L, n, H, S)
        assert np.abs(pattern[:, T][..., prompt.audio_positions].sum(-1) - mass).max() < 1e-6
        assert 0.02 < mass.min() and mass.max() < 0.98  # heads split attention: a real test


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


# -- `mlx-listen heads` ----------------------------------------------------------------------------

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
    # scores = Pearson r of the stored records; heads = the K best, best first
    mass = np.array([r["audio_mass"] for r in rows])
    want = stats.head_scores(mass, np.array([r["correct"] for r in rows]))
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


# -- `mlx-listen attention` and `ask --listen` -------------------------------------------------------

def test_attention_json_and_png(demo, tiny_gqa, heads_run, tmp_path, shape):
    from mlx_listen.hooks import AUDIO_MASS, run_with_cache
    from mlx_listen.prompt import prepare

    clip = demo[0] / demo[2][0]["audio_id"]
    out, png = tmp_path / "sub" / "att.json", tmp_path / "att.png"
    res = ok(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--json", out,
                    "--heads", heads_run[0], "--png", png))
    att = strict_json(out)
    assert set(att) == {"layers", "heads", "audio_mass", "listening", "audio_tokens"}
    assert (att["layers"], att["heads"]) == shape
    mass = np.array(att["audio_mass"])
    assert mass.shape == shape and ((mass > 0) & (mass < 1)).all()
    heads = json.loads(heads_run[0].read_text())["heads"]
    assert att["listening"] == pytest.approx(np.mean([mass[l, h] for l, h in heads]), abs=1e-6)
    assert f"listening score {att['listening']:.4f}" in res.stderr
    assert_png(png)

    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [clip], QUESTION)
    _, cap = run_with_cache(model, prompt, AUDIO_MASS.format("*"))
    assert att["audio_tokens"] == prompt.n_audio_tokens > 0
    assert np.abs(mass - cap.audio_mass(len(prompt.ids) - 1)).max() < 1e-6

    ok(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--json", tmp_path / "plain.json"))
    plain = strict_json(tmp_path / "plain.json")
    assert plain["listening"] is None and plain["audio_mass"] == att["audio_mass"]


def test_attention_refuses_heads_outside_the_model(tiny_gqa, tmp_path, shape):
    import soundfile as sf

    clip = tmp_path / "a.wav"
    sf.write(clip, tone(1.0), 16000)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"heads": [[0, 0], [shape[0], 0]]}))
    err = one_line_error(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path,
                                "--json", tmp_path / "o.json", "--heads", bad))
    assert "do not exist in this model" in err and not (tmp_path / "o.json").exists()
    err = one_line_error(invoke("ask", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--listen", "--heads", bad))
    assert "do not exist in this model" in err


def test_ask_listen_equals_the_attention_command(demo, tiny_gqa, heads_run, tmp_path):
    import soundfile as sf

    clips = [demo[0] / demo[2][5]["audio_id"], tmp_path / "tone.wav"]
    sf.write(clips[1], tone(2.3, 880.0, 5), 16000)
    for clip in clips:
        ok(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--json", tmp_path / "a.json",
                  "--heads", heads_run[0]))
        want = json.loads((tmp_path / "a.json").read_text())["listening"]
        res = ok(invoke("ask", clip, QUESTION, "--model", tiny_gqa.mlx_path, "-m", MAX_TOKENS, "--listen",
                        "--heads", heads_run[0], "--json"))
        got = json.loads(res.stdout.rstrip("\n").splitlines()[-1])
        assert got["listening"] == pytest.approx(want, abs=1e-6)
        assert 1 <= got["generation_tokens"] <= MAX_TOKENS
        assert f"Listening: {got['listening']:.4f} (mean audio attention of {K} heads" in res.stderr
        quiet = ok(invoke("ask", clip, QUESTION, "--model", tiny_gqa.mlx_path, "-m", MAX_TOKENS, "--listen",
                          "--heads", heads_run[0], "-q"))
        assert quiet.stdout.strip() == got["text"].strip() and f"Listening: {want:.4f}" in quiet.stderr

    res = invoke("ask", clips[1], QUESTION, "--model", tiny_gqa.mlx_path, "--listen")
    assert res.exit_code == 2 and "--listen needs --heads" in res.stderr
    plain = ok(invoke("ask", clips[1], QUESTION, "--model", tiny_gqa.mlx_path, "-m", MAX_TOKENS, "--json"))
    assert "listening" not in json.loads(plain.stdout.splitlines()[-1]) and "Listening" not in plain.stderr


# -- `mlx-listen validate-heads` -------------------------------------------------------------------

def validate_args(demo, model, heads, out, *extra):
    root, data, _ = demo
    return ["validate-heads", "--heads", heads, "--model", model, "--data", data, "--audio-dir", root,
            "--out", out, "--max-tokens", MAX_TOKENS, *extra]


def test_validate_heads_command(demo, tiny_gqa, heads_run, tmp_path, monkeypatch):
    from mlx_listen.audio import load_audio
    from mlx_listen.generate import generate
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
