"""Head sets (`mlx_listen.headset`): the listening score, seeded random heads, HEADS.json (round
trip, bad files, heads outside the model), and every command that takes a HEADS.json refusing a
damaged one or heads the model does not have with one `Error:` line, before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import invoke
from support.cli import MAXT, Q, data_args, eval_args, user_error

from mlx_listen.errors import ListenError
from mlx_listen.headset import HeadSet, random_heads
from mlx_listen.method.heads import top_heads


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


# -- on the command line ---------------------------------------------------------------------------
BAD_SCORES = {
    "list": [0.1, 0.2], "not-pairs": {"a,b": 0.1}, "string-value": {"0,1": "high"}, "triple": {"0,1,2": 0.1},
    "single": {"0": 0.1}, "negative": {"0,-1": 0.1}, "null-value": {"0,1": None}, "string": "abc",
    "nan": {"0,1": float("nan")}, "absurd-index": {"999999999,999999999": 0.1},
    "empty": {},
}


@pytest.mark.parametrize("case", list(BAD_SCORES))
def test_heads_file_with_bad_scores_is_a_user_error(M, files, tmp_path, case):
    H = tmp_path / "H.json"
    H.write_text(json.dumps({"heads": [[0, 1]], "scores": BAD_SCORES[case]}))
    res = invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--heads", H)
    if case == "empty" and res.exit_code == 0:
        return  # an empty score table may be accepted; it must not crash
    user_error(res, str(H))


@pytest.mark.parametrize("heads", ["far_layer", "far_head"])
@pytest.mark.parametrize("command", ["ask", "ask --listen", "eval", "steer build", "steer sweep"])
def test_steering_commands_refuse_heads_not_in_the_model(demo, M, files, tmp_path, heads, command):
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
