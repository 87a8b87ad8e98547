"""Prompt presets: the question text an MMAU-style item is asked with, and the answer format it
asks for (what option scoring and patching score as each choice's continuation).

Each family takes an R1-AQA-style and an MMAU-style preset; where its audio tokens go (Qwen2-Audio:
an `Audio 1:` line before the text; Audio Flamingo 3: `<sound>` glued to the text; Qwen2.5-Omni:
`<|audio_bos|>…<|audio_eos|>` then the text) is its chat template's placement, rendered from the
model folder. `r1-aqa-think` is R1-AQA's reasoning format (its GRPO target): Qwen2-Audio's family
only (`FAMILY_PRESETS`, `for_family`).

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


# model_type -> the presets that fit it (the first is its default)
FAMILY_PRESETS = {
    "qwen2_audio": ("r1-aqa", "r1-aqa-think", "mmau"),
    "audioflamingo3": ("r1-aqa", "mmau"),
    "qwen2_5_omni": ("r1-aqa", "mmau"),
}


def for_family(preset: str, model_type: str) -> str:
    """The preset's name if it fits the family (`FAMILY_PRESETS`); a ListenError names the ones that do."""
    name = canonical(preset)
    fits = FAMILY_PRESETS.get(model_type, tuple(PROMPTS))
    if name not in fits:
        why = {"r1-aqa-think": " (R1-AQA's reasoning format, for Qwen2-Audio)"}.get(name, "")
        raise ListenError(f"the {name!r} prompt preset does not fit a {model_type} model{why}; use {' or '.join(fits)}")
    return name


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


