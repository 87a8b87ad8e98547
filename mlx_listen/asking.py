"""One question about one or more clips, the way `mlx-listen ask` answers it: streamed through
mlx-lm, optionally steered or ablated, with the listening score of a head set at T and at every
answer token. Everything is checked against the model before the first token.

    from mlx_listen import load, ask
    model, processor = load("Qwen/Qwen2-Audio-7B-Instruct")
    answer = ask(model, processor, ["clip.wav"], "What is making this sound?", heads=HeadSet.load("HEADS.json"))
    print(answer.text, answer.listening)
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import Sequence

import numpy as np

from .answers import Answer, generate
from .errors import ListenError, ListenWarning
from .headset import listening
from .hooks import AUDIO_MASS, Capture
from .identity import check_binding
from .interp.steering import SteerConfig, Steerer
from .prompt import Prompt, prepare


def ask(model, processor, clips: Sequence, question: str, *, system: str | None = None, heads=None,
        steer: SteerConfig | None = None, ablate=None, on_text=None, prompt: Prompt | None = None,
        bindings: Sequence[tuple[str, dict]] = (), force: bool = False, **gen) -> Answer:
    """The answer to `question` about `clips` (paths, 16 kHz arrays or `AudioFeatures`).

    `heads` (a `headset.HeadSet`): also the listening score, at T (`answer.listening`) and at the
    position that chose each answer token (`answer.listening_tokens`). `steer`: answer with
    audio–silence steering (the silence pass runs first and is never captured). `ablate` (an
    `interp.ablation.Ablation`): answer with those heads ablated or masked off the audio.
    `bindings`: (label, metadata) of the head sets and vector files behind these options, and the
    head set itself: each is refused if it was found on another model (unless `force`; then a
    ListenWarning says so). `gen`: sampling options of `answers.stream_generate` (greedy default)."""
    if steer is not None and ablate is not None:
        raise ListenError("steer or ablate, not both at once (the silence pass would not see the ablation)")
    if heads is not None:
        heads.check(model.n_layers, model.n_heads)
    if ablate is not None:
        ablate.check(model)
    if steer is not None:
        steer.validate(model.n_layers, model.hidden_size, model.n_heads)
    checks = list(bindings) + ([(str(heads.path or "the head set"), heads.meta or {})] if heads is not None else [])
    seen = set()
    for label, meta in checks:
        if label not in seen:
            seen.add(label)
            for w in check_binding(meta, label, model=model, force=force):
                warnings.warn(w, ListenWarning, stacklevel=2)
    prompt = prompt or prepare(model, processor, clips, question, system)
    T = prompt.last
    with ExitStack() as stack:
        if ablate is not None:
            stack.enter_context(ablate.hooks(model, prompt))
        if steer is not None:
            stack.enter_context(Steerer(model, steer).applied(prompt))
        cap = None
        if heads is not None:
            layers = sorted({l for l, _ in heads.heads})
            cap = stack.enter_context(Capture(model, [AUDIO_MASS.format(l) for l in layers],
                                              audio_positions=prompt.audio_positions, at=slice(T, None)))
        answer = generate(model, processor, prompt, on_text=on_text, **gen)
    if cap is not None:
        recorded = set(cap.recorded(AUDIO_MASS.format(heads.heads[0][0])).tolist())
        positions = [int(p) for p in T + np.arange(max(len(answer.tokens), 1)) if p in recorded]
        scores = [listening(cap.audio_mass(p), heads.heads) for p in positions]
        answer.listening = scores[0]
        answer.listening_tokens = scores[: len(answer.tokens)]
    return answer
