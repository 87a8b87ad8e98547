"""Prompt presets: the question text an MMAU-style item is asked with, and the answer format it
asks for (what option scoring and patching score as each choice's continuation).

| preset | question text | answer format |
|---|---|---|
| `r1-aqa` (default) | R1-AQA's: the question, the options, "Output the final answer in <answer> </answer>." | `<answer>{choice}</answer>` |
| `r1-aqa-think` | the same, asking for `<think>` first | `<answer>{choice}</answer>` (the thinking not scored) |
| `mmau` | the MMAU authors' (MMAU issue #3) | the choice text itself |
"""

from __future__ import annotations

from .errors import ListenError

_R1 = "{question} Please choose the answer from the following options: {choices}. "
PROMPTS = {
    "r1-aqa": _R1 + "Output the final answer in <answer> </answer>.",
    "r1-aqa-think": _R1 + "Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
    # The MMAU authors' prompt (MMAU issue #3): leading newline, TWO spaces before "Select".
    "mmau": "\n{question}  Select one option from the provided choices.\n{choices}.",
}
DEFAULT_PRESET = "r1-aqa"
ALIASES = {"r1aqa": "r1-aqa", "r1aqa_think": "r1-aqa-think", "mmau_authors": "mmau"}


def canonical(preset: str) -> str:
    """The preset's name (aliases resolved); an unknown preset is a ListenError."""
    name = ALIASES.get(preset, preset)
    if name not in PROMPTS:
        raise ListenError(f"unknown prompt preset {preset!r}; choose one of {', '.join(PROMPTS)}")
    return name


def build_prompt(item: dict, preset: str = DEFAULT_PRESET) -> str:
    """The user text for one item; `{choices}` is Python's str() of the list, as both sources do."""
    return PROMPTS[canonical(preset)].format(question=item["question"], choices=str(list(item["choices"])))


def continuation(preset: str, choice: str) -> str:
    """The answer text a preset asks for, for one choice (stripped, as `mmau.extract_answer` reads it)."""
    c = choice.strip()
    return c if canonical(preset) == "mmau" else f"<answer>{c}</answer>"


