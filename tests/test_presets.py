"""Prompt presets (`mlx_listen.presets`): the MMAU prompts byte for byte."""

from __future__ import annotations

import pytest

from mlx_listen.errors import ListenError
from mlx_listen.presets import PROMPTS, build_prompt

MWCR = ["Man", "Woman", "Child", "Robot"]


def item(i=0, task="sound", difficulty="easy", choices=MWCR, answer="Man", sub="Sub A", **kw):
    return {"id": f"id-{i}", "audio_id": f"./test-mini-audios/id-{i}.wav", "question": "Q?",
            "choices": list(choices), "answer": answer, "dataset": "x", "task": task,
            "split": "test-mini", "category": "Reasoning", "sub-category": sub,
            "difficulty": difficulty, **kw}


def test_prompts_byte_exact():
    it = item(choices=MWCR, answer="Man")
    it["question"] = "Who speaks?"
    lst = "['Man', 'Woman', 'Child', 'Robot']"
    assert build_prompt(it) == build_prompt(it, "r1-aqa") == (
        f"Who speaks? Please choose the answer from the following options: {lst}. "
        "Output the final answer in <answer> </answer>.")
    assert build_prompt(it, "r1-aqa-think") == (
        f"Who speaks? Please choose the answer from the following options: {lst}. "
        "Output the thinking process in <think> </think> and final answer in <answer> </answer>.")
    assert build_prompt(it, "mmau") == f"\nWho speaks?  Select one option from the provided choices.\n{lst}."
    assert build_prompt(it, "mmau_authors") == build_prompt(it, "mmau")  # design-note name
    it["choices"] = ["it's {x}", 'say "hi"']  # braces and quotes pass through str() untouched
    assert build_prompt(it, "mmau").endswith("""["it's {x}", 'say "hi"'].""")
    assert set(PROMPTS) == {"r1-aqa", "r1-aqa-think", "mmau"}
    with pytest.raises(ListenError, match="unknown prompt preset"):
        build_prompt(it, "nope")
