"""MMAU scoring (`eval/mmau.py`): the official string match and report, checked on hand-made cases
and on the golden values computed with MMAU's own evaluation.py, over the two test-mini answer
keys shipped in tests/data/mmau/ (byte-exact upstream copies, sha256-checked)."""

from __future__ import annotations

import json

import pytest
from support import DATA

from mlx_listen.errors import ListenError
from mlx_listen.eval.mmau import compare, extract_answer, load_items, score, string_match, tokens
from mlx_listen.records import file_sha256
from mlx_listen.stats import wilson

MMAU = DATA / "mmau"  # shipped with the tests: never skipped
FILES = {"v05.15.25": MMAU / "mmau-test-mini.json", "orig": MMAU / "mmau-test-mini-pre-v05.15.25.json"}


SHA = {"v05.15.25": "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c",
       "orig": "e8cc09223b497191781756212cb616315690aaa6ea7ac359db1b65d97d1e2433"}
MWCR = ["Man", "Woman", "Child", "Robot"]
GUITAR = ["Acoustic guitar", "Electric guitar", "Piano", "Drums"]
LETTERS = "ABCDEFGHIJ"


def item(i=0, task="sound", difficulty="easy", choices=MWCR, answer="Man", sub="Sub A", **kw):
    return {"id": f"id-{i}", "audio_id": f"./test-mini-audios/id-{i}.wav", "question": "Q?",
            "choices": list(choices), "answer": answer, "dataset": "x", "task": task,
            "split": "test-mini", "category": "Reasoning", "sub-category": sub,
            "difficulty": difficulty, **kw}


# -- tokenisation and matching (§6.2, §6.3) ---------------------------------------------------------


@pytest.mark.parametrize("s, toks", [
    ("Rock-n-roll", {"rock", "n", "roll"}), ("don't", {"don", "t"}), ("3.5 kHz", {"3", "5", "khz"}),
    ("(B) Man", {"b", "man"}), ("Café", {"café"}), ("  ", set()), ("snake_case x", {"snake_case", "x"}),
])
def test_tokens(s, toks):
    assert tokens(s) == toks


@pytest.mark.parametrize("choices, answer, pred, ok", [
    (MWCR, "Man", "Man", True),
    (MWCR, "Man", "It is a man.", True),
    (MWCR, "Man", "B", False),
    (MWCR, "Man", "man or woman", False),
    (GUITAR, "Acoustic guitar", "guitar", False),
    (GUITAR, "Acoustic guitar", "an acoustic guitar, not electric", False),
    (GUITAR, "Acoustic guitar", "<answer>Acoustic guitar</answer>", True),
    (GUITAR, "Acoustic guitar", "GUITAR, acoustic!", True),  # order, case, punctuation ignored
    (MWCR, "Man", "", False),  # empty prediction
    (MWCR, "Man", " ... !? ", False),  # no word characters at all
    (["Man", "Man", "Woman", "Child"], "Man", "Man", True),  # duplicate choices
    (["Man", "Woman"], "Man", "(A) Man", True),  # 2-choice item, letter is not a wrong token
    (["a b", "c", "d", "e", "f"], "a b", "b a", True),  # 5-choice item
    ([" First speaker.", "Second speaker."], " First speaker.", "first speaker", True),  # whitespace
    (["dog barks", "barks dog", "cat"], "dog barks", "barks dog", True),  # same word set as answer
    (["The dog", "The dog barks", "A cat"], "The dog", "The dog", True),  # answer ⊂ another choice
    (["The dog", "The dog barks", "A cat"], "The dog", "The dog barks", False),
    (["The dog", "The dog barks", "A cat"], "The dog barks", "The dog", False),
    (["Café", "Cafe", "Tea"], "Café", "café", True),  # Unicode \w keeps é inside the word
    (["Café", "Cafe", "Tea"], "Café", "Cafe", False),
    (["Café", "Caf", "Tea"], "Caf", "Café", False),  # an ASCII-only \w would split "caf" + "é"
])
def test_string_match(choices, answer, pred, ok):
    assert string_match(answer, pred, choices) is ok


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> Man </answer>", ("Man", True)),
    ("<answer>Man</answer> then <answer>Woman</answer>", ("Man", True)),  # first match wins
    ("<answer>Man\n</answer>", ("<answer>Man\n</answer>", False)),  # no DOTALL: fallback
    ("<answer></answer>", ("", True)),
    ("  It is a man.\n", ("It is a man.", False)),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# -- loading ---------------------------------------------------------------------------------------


def write(tmp_path, items, name="q.json"):
    p = tmp_path / name
    p.write_text(json.dumps(items))
    return p


def test_load_items_normalises_and_validates(tmp_path):
    items = load_items(write(tmp_path, [item(0, category=["Reasoning"]), item(1)]))
    assert [it["category"] for it in items] == ["Reasoning", "Reasoning"]
    bad = [
        ([item(0, task="speechh")], "task"),
        ([item(0, difficulty="Hard")], "difficulty"),
        ([item(0, answer="Dog")], "not one of its choices"),
        ([item(0), item(0)], "twice"),
        ([{k: v for k, v in item(0).items() if k != "choices"}], "lacks choices"),
        ([item(0, choices="Man, Woman")], "choices"),
        ({"not": "a list"}, "JSON array"),
    ]
    for data, msg in bad:
        with pytest.raises(ListenError, match=msg) as e:
            load_items(write(tmp_path, data))
        if isinstance(data, list):
            assert "id-0" in str(e.value)
    with pytest.raises(ListenError):
        load_items(tmp_path / "missing.json")
    p = write(tmp_path, [item(0)])
    assert len(file_sha256(p)) == 64


# -- scoring and reports ---------------------------------------------------------------------------


def test_score_skips_missing_and_groups():
    items = [
        item(0, "sound", "easy", model_output="a man"),
        item(1, "sound", "hard", model_output="woman"),
        item(2, "music", "hard", sub="Sub B", category=["Reasoning"], model_output="Man"),
        item(3, "music", "medium", sub="Sub B"),  # no prediction: skipped, not wrong
        item(4, "speech", "medium", answer="Woman", model_output="", parsed=False),
    ]
    r = score(items)
    d = r.to_dict()
    assert (d["n"], d["correct"], d["skipped"]) == (4, 2, 1)
    assert d["accuracy"] == {"overall": 0.5, "sound": 0.5, "music": 1.0, "speech": 0.0}
    assert [(g["name"], g["correct"], g["n"]) for g in d["tables"]["difficulty"]] == [
        ("easy", 1, 1), ("hard", 1, 2), ("medium", 0, 1)]
    assert [(g["name"], g["n"]) for g in d["tables"]["sub-category"]] == [("Sub A", 3), ("Sub B", 1)]
    assert d["tables"]["category"] == [{"name": "Reasoning", "correct": 2, "n": 4, "accuracy": 0.5,
                                        "ci95": list(wilson(2, 4))}]
    assert d["unparsed"] == 1  # only item 4 says whether it parsed
    assert d["always_first"]["overall"] == 0.75 and d["always_first"]["speech"] == 0.0
    assert json.loads(json.dumps(d)) == d
    assert [x["correct"] for x in r.items] == [True, False, True, False]
    with pytest.raises(ListenError, match="no item"):
        score([item(0)])
    assert score([item(0, model_output=None)]).overall.correct == 0


def test_score_unparsed_from_raw_and_extract():
    items = [item(0, raw_output="<answer>Man</answer>", model_output="Man"),
             item(1, raw_output="I think man", model_output="I think man")]
    assert score(items).unparsed == 1
    assert score([item(0, model_output="x")]).unparsed is None
    r = score([item(0, model_output="<answer>Man</answer>"), item(1, model_output="Woman?")], extract=True)
    assert (r.overall.correct, r.unparsed) == (1, 1)
    r = score([item(0, model_prediction="Man")], key="model_prediction")
    assert r.overall.correct == 1


def test_official_text_layout():
    items = [item(0, "sound", "easy", model_output="Man"), item(1, "sound", "medium", sub="Sub B",
                                                                   model_output="Woman"),
             item(2, "music", "medium", model_output="man"), item(3, "sound", "easy")]
    star = "*" * 30
    assert score(items).official_text() == "\n".join([
        star, "Task-wise Accuracy:",
        "sound : 50.00% over 2 samples", "music : 100.00% over 1 samples", "speech : 0.00% over 0 samples",
        star, "Difficulty-wise Accuracy:",
        "easy : 100.00% over 1 samples", "hard : 0.00% over 0 samples", "medium : 50.00% over 2 samples",
        star, "Sub-category-wise Accuracy:",
        "Sub A : 100.00% over 2 samples", "Sub B : 0.00% over 1 samples",
        star, "Total Accuracy: 66.67% over 3 samples", star, "No prediction count: 0",
    ])
    t = score(items).table()
    assert "always-first" in t and "unparsed" in t and "skipped (no prediction): 1" in t


def test_compare():
    base = [item(i, t, answer="Man") for i, t in enumerate(["sound"] * 4 + ["speech"] * 2)]
    a = [dict(it, model_output=o) for it, o in zip(base, ["Man", "Woman", "Woman", "Man", "Man", "Man"])]
    b = [dict(it, model_output=o) for it, o in zip(base, ["Man", "Man", "Man", "Woman", "Man", "Man"])]
    b.append(item(9, model_output="Man"))
    c = compare(a, b)
    assert (c["n"], c["only_a"], c["only_b"]) == (6, 0, 1)
    assert c["overall"] == {"n": 6, "a": 4 / 6, "b": 5 / 6, "a_correct": 4, "b_correct": 5,
                                 "wrong_to_right": 2, "right_to_wrong": 1, "p_mcnemar": 1.0}
    assert (c["sound"]["n"], c["music"]["n"], c["speech"]["wrong_to_right"]) == (4, 0, 0)
    b[0]["answer"] = "Woman"
    with pytest.raises(ListenError, match="different questions"):
        compare(a, b)


# -- the real test-mini files: counts and the golden values of §6.6 --------------------------------


def _letter(it):
    return LETTERS[it["choices"].index(it["answer"])]


PATTERNS = {
    "exact": lambda it: it["answer"],
    "(B) answer": lambda it: f"({_letter(it)}) {it['answer']}",
    "B. answer": lambda it: f"{_letter(it)}. {it['answer']}",
    "The answer is": lambda it: f"The answer is {it['answer']}.",
    "letter only": _letter,
    "all choices": lambda it: " ".join(it["choices"]),
    "first choice": lambda it: it["choices"][0],
}
GOLDEN = {  # percent, one decimal, computed with MMAU's evaluation.py
    "v05.15.25": {"exact": 100.0, "(B) answer": 96.7, "B. answer": 96.7, "The answer is": 90.7,
                  "letter only": 0.2, "all choices": 0.1, "first choice": 39.8},
    "orig": {"exact": 100.0, "(B) answer": 96.5, "B. answer": 96.5, "The answer is": 92.8,
             "letter only": 0.0, "all choices": 0.1, "first choice": 37.8},
}


@pytest.fixture(scope="module")
def real():
    # The golden values hold for these exact bytes: a changed file must fail here, not pass with other numbers.
    for version, path in FILES.items():
        assert file_sha256(path) == SHA[version], f"{path} is not the upstream MMAU {version} file"
    return {v: load_items(p) for v, p in FILES.items()}


@pytest.mark.parametrize("version", list(FILES))
def test_answer_key_sha256(version):
    assert file_sha256(FILES[version]) == SHA[version]
    assert SHA[version] in (MMAU / "README.md").read_text()  # the README cites the same hash


@pytest.mark.parametrize("version", list(FILES))
def test_real_files_load(real, version):
    items = real[version]
    assert len(items) == 1000
    r = score([dict(it, model_output=it["answer"]) for it in items])
    assert [(g.name, g.n) for g in r.tables["task"]] == [("sound", 333), ("music", 334), ("speech", 333)]
    assert all(isinstance(it["category"], str) for it in items)
    assert {g.name for g in r.tables["category"]} == {"Reasoning", "Information Extraction"}
    assert len(r.tables["sub-category"]) == 27


@pytest.mark.parametrize("version", list(FILES))
def test_golden_values(real, version):
    items = real[version]
    for name, pattern in PATTERNS.items():
        r = score([dict(it, model_output=pattern(it)) for it in items])
        assert round(100 * r.overall.accuracy, 1) == GOLDEN[version][name], name
        # the always-first line of every report equals scoring the first choice directly
        assert round(100 * r.always_first["overall"].accuracy, 1) == GOLDEN[version]["first choice"]
    if version == "v05.15.25":
        first = r.to_dict()["always_first"]
        assert {t: round(100 * first[t], 1) for t in ("sound", "music", "speech")} == {
            "sound": 49.2, "music": 30.2, "speech": 39.9}
        assert "Total Accuracy: 39.80% over 1000 samples" in r.official_text()
        assert "sound : 49.25% over 333 samples" in r.official_text()
