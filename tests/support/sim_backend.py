"""A simulated experiment backend with a known truth, for `tests/method/test_method_experiment.py`
(and its SIGKILL subprocess). Items are synthetic MMAU rows; the "model" is a rule:

- every head's audio mass is noise, except in `planted` heads, where it is higher on the items the
  model gets right (signal), or tracks clip length only (confound: longer clips are also easier);
- steering helps by `gain` (a chance to fix a wrong answer) only when the steered layers include
  a layer of a planted head; otherwise it flips answers at random, in both directions, at `noise`;
- ablating a planted head breaks the answers it helped (a chance `drop` to turn right into wrong).

Every random choice is a hash of (seed, item, condition), so a rerun reproduces every answer.
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
                 accuracy=0.5, seed=0, delay=0.0):
        self.shape = (n_layers, n_heads)
        self.planted, self.mode, self.gain, self.noise, self.drop = [tuple(h) for h in planted], mode, gain, noise, drop
        self.accuracy, self.seed = accuracy, seed
        self.fingerprint = f"sim-{seed}"
        self.calls: list[tuple[str, str]] = []
        self.delay = delay  # seconds per call, so a subprocess can be killed mid-stage

    def _wait(self):
        if self.delay:
            import time

            time.sleep(self.delay)

    def _length(self, item) -> int:
        return 50 + int(700 * u(self.seed, item["id"], "len"))

    def _correct(self, item) -> bool:
        p = self.accuracy
        if self.mode == "confound":  # long clips are easier
            p = 0.15 + 0.7 * (self._length(item) - 50) / 700
        return u(self.seed, item["id"], "correct") < p

    def base(self, item) -> dict:
        self.calls.append(("base", item["id"]))
        self._wait()
        L, H = self.shape
        ok = self._correct(item)
        rng = np.random.default_rng(int(u(self.seed, item["id"], "mass") * 2**32))
        mass = rng.uniform(0.1, 0.3, (L, H))
        for l, h in self.planted:
            if self.mode == "signal":
                mass[l, h] += 0.15 if ok else 0.0
            else:  # the head tracks clip length only
                mass[l, h] += 0.3 * (self._length(item) - 50) / 700
        c = item["choices"].index(item["answer"]) if ok else (item["choices"].index(item["answer"]) + 1) % 4
        sil = c if u(self.seed, item["id"], "sil") < 0.5 else (c + 2) % 4
        return {"answer": item["choices"][c], "parsed": True, "choice": c, "correct": ok,
                "audio_tokens": self._length(item), "audio_mass": np.round(mass, 7).tolist(),
                "silence": {"answer": item["choices"][sil], "parsed": True, "choice": sil,
                            "correct": sil == item["choices"].index(item["answer"])}}

    def direction(self, item, layers):
        self.calls.append(("direction", item["id"]))
        rng = np.random.default_rng(int(u(self.seed, item["id"], "dir") * 2**32))
        return rng.standard_normal(16).astype(np.float32)

    def answer(self, item, conditions) -> dict:
        self.calls.append(("answer", item["id"]))
        self._wait()
        ok0 = self._correct(item)
        planted_layers = {l for l, _ in self.planted}
        out = {}
        for c in conditions:
            ok = ok0
            r = u(self.seed, item["id"], c.name, "flip")
            if c.steer is not None:
                hits = c.steer.vector is None and bool(planted_layers & set(c.steer.layers))
                if hits and not ok and r < self.gain:
                    ok = True
                elif r < self.noise:
                    ok = not ok
            else:
                heads = {tuple(h) for h in c.settings["ablation"]["heads"]}
                if heads & set(self.planted) and ok and r < self.drop:
                    ok = False
                elif r < self.noise:
                    ok = not ok
            k = item["choices"].index(item["answer"]) if ok else (item["choices"].index(item["answer"]) + 1) % 4
            out[c.name] = {"answer": item["choices"][k], "parsed": True, "choice": k, "correct": ok}
        return out


def main():  # the SIGKILL test runs this in a subprocess: python sim_backend.py DATA OUT
    import sys

    from mlx_listen.method.experiment import Settings, run_experiment

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    backend = SimBackend(planted=[(3, 1), (3, 5)], gain=0.6, drop=0.6, seed=4, delay=float(sys.argv[3]))
    run_experiment(Settings(k=2, random_sets=3, alphas=(1.0, 2.0), n_perm=50, n_boot=30), data, Path("."), "sim",
                   out, backend=backend, progress=False)


if __name__ == "__main__":
    main()
