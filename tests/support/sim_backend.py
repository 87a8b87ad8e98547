"""A simulated experiment backend with a known truth, for `tests/method/test_method_experiment.py`
(and its SIGKILL subprocess). Items are synthetic MMAU rows; the "model" is a rule (`mode`):

- "signal": every head's audio mass is noise, except in `planted` heads, where it is higher on
  the items the model gets right; steering helps by `gain` (a chance to fix a wrong answer) only
  when the steered layers include a layer of a planted head; ablating a planted head breaks the
  answers it helped (a chance `drop` to turn right into wrong);
- "confound": accuracy rises with clip length and the planted heads track clip length only;
- "qlength": accuracy falls with question length (text tokens) and the planted heads track it only;
- "task": accuracy depends on the task and the planted heads' mass on the task only;
- "circular": the planted heads track correctness only, and the audio changes the answer (audio vs
  silence) far more often when the model is right (a wrong answer is the text prior, which silence
  repeats): heads that only track correctness look like listening, pooled;
- "format": a share `unparsable` of the baseline answers pick no option (so they are wrong); any
  steering turns such an answer into a parsable one with chance `fix`, which is then right when the
  item's latent answer is; nothing listens more (the option log-prob margin does not move).

Other conditions flip answers at random, in both directions, at `noise`. Each answer has a margin
(the correct option's log-prob margin) that follows its correctness. Every random choice is a hash
of (seed, item, condition), so a rerun reproduces every answer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

TASKS = ("sound", "music", "speech")


def u(*keys) -> float:
    """A uniform number in [0, 1) fixed by its keys."""
    h = hashlib.sha256(json.dumps(keys, default=str).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def make_items(n: int, path: Path) -> list[dict]:
    items = []
    for i in range(n):
        choices = ["alpha", "beta", "gamma", "delta"]
        items.append({"id": f"item-{i:04d}", "audio_id": f"a{i}.wav", "question": f"Question {i}?", "choices": choices,
                      "answer": choices[i % 4], "task": TASKS[i % 3], "difficulty": "easy", "category": "c",
                      "sub-category": "s"})
    Path(path).write_text(json.dumps(items))
    return items


class SimBackend:
    def __init__(self, *, n_layers=12, n_heads=8, planted=(), mode="signal", gain=0.0, noise=0.05, drop=0.0,
                 accuracy=0.5, seed=0, delay=0.0, unparsable=0.4, fix=0.7):
        self.shape = (n_layers, n_heads)
        self.planted, self.mode, self.gain, self.noise, self.drop = [tuple(h) for h in planted], mode, gain, noise, drop
        self.accuracy, self.seed, self.unparsable, self.fix = accuracy, seed, unparsable, fix
        self.fingerprint = f"sim-{seed}"
        self.calls: list[tuple[str, str]] = []
        self.delay = delay  # seconds per call, so a subprocess can be killed mid-stage

    def _wait(self):
        if self.delay:
            import time

            time.sleep(self.delay)

    def _length(self, item) -> int:
        return 50 + int(700 * u(self.seed, item["id"], "len"))

    def _text(self, item) -> int:
        return 40 + int(80 * u(self.seed, item["id"], "text"))

    def _correct(self, item) -> bool:
        """The item's latent answer: right or wrong when the answer parses."""
        p = self.accuracy
        if self.mode == "confound":  # long clips are easier
            p = 0.15 + 0.7 * (self._length(item) - 50) / 700
        elif self.mode == "qlength":  # long questions are harder
            p = 0.85 - 0.7 * (self._text(item) - 40) / 80
        elif self.mode == "task":
            p = {"sound": 0.8, "music": 0.5, "speech": 0.2}[item["task"]]
        return u(self.seed, item["id"], "correct") < p

    def _parses(self, item) -> bool:
        return self.mode != "format" or u(self.seed, item["id"], "parse") >= self.unparsable

    def _answer(self, item, ok: bool, parses: bool, margin: float) -> dict:
        k = item["choices"].index(item["answer"]) if ok else (item["choices"].index(item["answer"]) + 1) % 4
        if not parses:
            return {"answer": "I think it could be several things", "parsed": False, "choice": None, "correct": False,
                    "margin": round(margin, 6), "logprob_choice": k}
        return {"answer": item["choices"][k], "parsed": True, "choice": k, "correct": ok, "margin": round(margin, 6),
                "logprob_choice": k}

    def _margin(self, item, ok: bool, *keys) -> float:
        return (0.8 if ok else -0.8) + 0.6 * (u(self.seed, item["id"], "margin", *keys) - 0.5)

    def base(self, item) -> dict:
        self.calls.append(("base", item["id"]))
        self._wait()
        L, H = self.shape
        ok = self._correct(item)
        rng = np.random.default_rng(int(u(self.seed, item["id"], "mass") * 2**32))
        mass = rng.uniform(0.1, 0.3, (L, H))
        for l, h in self.planted:
            if self.mode in ("signal", "circular"):
                mass[l, h] += 0.15 if ok else 0.0
            elif self.mode == "confound":  # the head tracks clip length only
                mass[l, h] += 0.3 * (self._length(item) - 50) / 700
            elif self.mode == "qlength":
                mass[l, h] += 0.3 * (1 - (self._text(item) - 40) / 80)  # shorter question: more mass
            elif self.mode == "task":
                mass[l, h] += {"sound": 0.2, "music": 0.1, "speech": 0.0}[item["task"]]
        out = self._answer(item, ok, self._parses(item), self._margin(item, ok))
        c = item["choices"].index(item["answer"]) if ok else (item["choices"].index(item["answer"]) + 1) % 4
        p_change = (0.7 if ok else 0.15) if self.mode == "circular" else 0.5
        sil = (c + 2) % 4 if u(self.seed, item["id"], "sil") < p_change else c
        return {**out, "audio_tokens": self._length(item), "text_tokens": self._text(item),
                "audio_mass": np.round(mass, 7).tolist(),
                "silence": {"answer": item["choices"][sil], "parsed": True, "choice": sil,
                            "correct": sil == item["choices"].index(item["answer"])}}

    def direction(self, item, layers):
        self.calls.append(("direction", item["id"]))
        rng = np.random.default_rng(int(u(self.seed, item["id"], "dir") * 2**32))
        return rng.standard_normal(16).astype(np.float32)

    def _outcomes(self, item, conditions) -> dict:
        ok0, parses0 = self._correct(item), self._parses(item)
        planted_layers = {l for l, _ in self.planted}
        out = {}
        for c in conditions:
            ok, parses = ok0, parses0
            r = u(self.seed, item["id"], c.name, "flip")
            if c.steer is not None:
                hits = c.steer.vector is None and bool(planted_layers & set(c.steer.layers))
                if self.mode == "format":
                    if not parses and r < self.fix:
                        parses = True
                elif hits and not ok and r < self.gain:
                    ok = True
                elif r < self.noise:
                    ok = not ok
            else:
                heads = {tuple(h) for h in c.settings["ablation"]["heads"]}
                if heads & set(self.planted) and ok and r < self.drop:
                    ok = False
                elif r < self.noise:
                    ok = not ok
            m = self._margin(item, ok0) + (1.6 if ok and not ok0 else -1.6 if ok0 and not ok else 0.0) \
                + 0.2 * (u(self.seed, item["id"], c.name, "m") - 0.5)
            out[c.name] = self._answer(item, ok, parses, m)
        return out

    def answer(self, item, conditions) -> dict:
        self.calls.append(("answer", item["id"]))
        self._wait()
        return self._outcomes(item, conditions)

    def score(self, item, conditions) -> dict:
        self.calls.append(("score", item["id"]))
        self._wait()
        return {n: {"margin": o["margin"], "logprob_choice": o["logprob_choice"]}
                for n, o in self._outcomes(item, conditions).items()}


def main():  # the SIGKILL test runs this in a subprocess: python sim_backend.py DATA OUT DELAY
    import sys

    from mlx_listen.method.experiment import Settings, run_experiment

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    backend = SimBackend(planted=[(3, 1), (3, 5)], gain=0.6, drop=0.6, seed=4, delay=float(sys.argv[3]))
    run_experiment(Settings(k=2, random_sets=3, alphas=(1.0, 2.0), n_perm=50, n_boot=30, ablate_sets=2), data,
                   Path("."), "sim", out, backend=backend, progress=False)


if __name__ == "__main__":
    main()
