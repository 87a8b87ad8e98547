"""The experiment's backend: how an item gets answered by the MLX model (base answers with every
head's audio mass and the options' log-probs, directions, answers and option scores under
conditions), and `outcome`, what one answer becomes in the records. `experiment.Experiment` drives
any object with this interface; the tests drive a simulated one with a known truth."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import presets
from ..errors import ListenError
from ..eval import mmau
from ..eval.conditions import Answerer, baseline
from ..eval.logprob import answer_index
from ..interp.scoring import choice as best_choice
from ..interp.scoring import margin as option_margin
from ..interp.scoring import option_ids
from ..interp.steering import SteerConfig, Steerer
from ..load import ModelRef
from ..prompt import prepare
from .heads import text_tokens


def outcome(item: dict, text: str | None, logprobs=None, error: str | None = None) -> dict:
    """What the report needs of one answer: the extracted answer, whether it parsed (<answer> tags),
    the option the official matcher reads in it (None: no option or several), whether it is right,
    and from the options' log-probs the correct option's margin and the best option. `error`: a
    forward pass that was not finite (no answer, no score)."""
    if error is not None:
        return {"error": error}
    out = {}
    if text is not None:
        answer, parsed = mmau.extract_answer(text)
        out = {"answer": answer, "parsed": parsed, "choice": mmau.matched_choice(answer, item["choices"]),
               "correct": mmau.string_match(item["answer"], answer, item["choices"])}
    if logprobs is not None:
        lp = np.asarray(logprobs, np.float64)
        m = option_margin(lp, answer_index(item))
        out.update(margin=round(float(m), 6) if np.isfinite(m) else None, logprob_choice=best_choice(lp))
    return out


class ModelBackend:
    """The MLX model: base answers, directions, and answers or option scores under conditions."""

    def __init__(self, model, audio_dir: Path, settings):
        self.model, self.processor = ModelRef.of(model).get()
        self.audio_dir, self.settings = Path(audio_dir), settings
        self.shape = (self.model.n_layers, self.model.n_heads)
        self.hidden_size = self.model.hidden_size
        self._base = Answerer(self.model, self.processor, [baseline()], max_tokens=settings.max_tokens,
                              audio_mass=True)
        self._answerer = (None, None)  # (the condition list it was built for, the Answerer)

    def _prompt(self, item):
        return prepare(self.model, self.processor, [self.audio_dir / item["audio_id"]],
                       presets.build_prompt(item, self.settings.prompt))

    def _options(self, item, prompt):
        return option_ids(self.processor, prompt, item["choices"], self.settings.prompt)

    def base(self, item) -> dict:
        prompt = self._prompt(item)
        r = self._base.respond(prompt, self._options(item, prompt))["base"]
        sil = self._base.respond(self._base.silence.prompt(prompt))["base"]
        for x in (r, sil):
            if x.error:
                raise ListenError(x.error)
        return {**outcome(item, r.answer.text, r.logprobs), "audio_tokens": prompt.n_audio_tokens,
                "text_tokens": text_tokens(prompt),
                "audio_mass": np.round(r.answer.audio_mass.astype(np.float64), 7).tolist(),
                "silence": outcome(item, sil.answer.text)}

    def direction(self, item, layers: Sequence[int]) -> np.ndarray:
        st = Steerer(self.model, SteerConfig(layers=list(layers)), self._base.silence)
        return np.array(st.direction(self._prompt(item)))

    def _for(self, conditions):
        if self._answerer[0] is not conditions:  # a new stage: a fold's tuning or test conditions
            self._answerer = (conditions, Answerer(self.model, self.processor, conditions,
                                                   max_tokens=self.settings.max_tokens, silence=self._base.silence))
        return self._answerer[1]

    def answer(self, item, conditions: list) -> dict[str, dict]:
        """Greedy answers and option log-probs of every condition (one prefill for the shared ones)."""
        prompt = self._prompt(item)
        res = self._for(conditions).respond(prompt, self._options(item, prompt))
        return {name: outcome(item, r.answer.text if r.answer else None, r.logprobs, r.error)
                for name, r in res.items()}

    def score(self, item, conditions: list) -> dict[str, dict]:
        """Option log-probs of every condition, without answering (tuning by margin)."""
        prompt = self._prompt(item)
        res = self._for(conditions).respond(prompt, self._options(item, prompt), generate=False)
        return {name: outcome(item, None, r.logprobs, r.error) for name, r in res.items()}
