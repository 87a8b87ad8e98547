"""One question about one or more clips, the way `mlx-listen ask` answers it: streamed through
mlx-lm, optionally steered, with the listening score of a head set at T and at every answer token.

    from mlx_listen import load, ask
    model, processor = load("Qwen/Qwen2-Audio-7B-Instruct")
    answer = ask(model, processor, ["clip.wav"], "What is making this sound?", heads=HeadSet.load("HEADS.json"))
    print(answer.text, answer.listening)
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import numpy as np

from .capture import AUDIO_MASS, Capture
from .errors import ListenError
from .generate import Answer, generate
from .prompt import Prompt, prepare
from .steering import SteerConfig, Steerer


def ask(model, processor, clips: Sequence, question: str, *, system: str | None = None, heads=None,
        steer: SteerConfig | None = None, ablate=None, on_text=None, prompt: Prompt | None = None, **gen) -> Answer:
    """The answer to `question` about `clips` (paths, 16 kHz arrays or `AudioFeatures`).

    `heads` (a `heads.HeadSet`): also the listening score, at T (`answer.listening`) and at the
    position that chose each answer token (`answer.listening_tokens`). `steer`: answer with
    audio–silence steering (the silence pass runs first and is never captured). `ablate` (an
    `ablation.Ablation`): answer with those heads ablated or masked off the audio. `gen`: sampling
    options of `generate.stream_generate` (greedy by default)."""
    if steer is not None and ablate is not None:
        raise ListenError("steer or ablate, not both at once (the silence pass would not see the ablation)")
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
        positions = T + np.arange(max(len(answer.tokens), 1))
        scores = [float(np.mean([np.array(cap.get(AUDIO_MASS.format(l), int(p))[0, h]) for l, h in heads.heads]))
                  for p in positions if p in set(cap.recorded(AUDIO_MASS.format(heads.heads[0][0])).tolist())]
        answer.listening = scores[0]
        answer.listening_tokens = scores[: len(answer.tokens)]
    return answer
