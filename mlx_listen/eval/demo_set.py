"""A small synthetic MMAU-format question set that anyone can generate offline.

The real MMAU audio cannot be shipped, so `make_demo_set` synthesises short clips with numpy
(16 kHz mono, 16-bit WAV) and writes `demo.json` in MMAU's exact schema, so the same loader,
prompts, scorer and reports run on it. Every answer is decided by the audio alone (a count, a
pitch contour, a loudness order...), and each choice position holds the correct answer equally
often, so the always-first baseline is 25% and any gain above chance needs listening.

Pure numpy + soundfile: no torch, transformers or mlx.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
NAMESPACE = uuid.UUID("5b0c3f9e-8a4d-4c1e-9d1b-6f2a7e0c4d11")  # fixed: ids stable across releases


def _ramp(x: np.ndarray, ms: float = 10.0) -> np.ndarray:
    """Raised-cosine fade in and out, so bursts have no clicks."""
    n = min(int(SR * ms / 1000), x.size // 2)
    if n:
        w = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
        x[:n] *= w
        x[-n:] *= w[::-1]
    return x


def _sine(freq, seconds: float, amp: float = 0.5) -> np.ndarray:
    """A tone; `freq` may be an array (a glide), integrated to phase so it stays continuous."""
    n = int(round(seconds * SR))
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    return _ramp(amp * np.sin(2 * np.pi * np.cumsum(f) / SR))


def _voice(f0, seconds: float, amp: float = 0.5) -> np.ndarray:
    """A crude vowel: harmonics of f0 weighted by two formant bumps (~700 and ~1200 Hz)."""
    n = int(round(seconds * SR))
    f0 = np.broadcast_to(np.asarray(f0, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = np.zeros(n)
    for h in range(1, 25):
        fh = h * float(np.mean(f0))
        if fh > 3500:
            break
        w = np.exp(-(((fh - 700) / 250) ** 2)) + 0.6 * np.exp(-(((fh - 1200) / 300) ** 2)) + 0.15 / h
        x += w * np.sin(h * phase)
    return _ramp(amp * x / np.max(np.abs(x)), ms=25)


def _sequence(parts, rng, lead=(0.2, 0.5), gap=(0.25, 0.4), tail=0.3) -> np.ndarray:
    """Bursts separated by silences of random length, padded to at least one second."""
    out = [np.zeros(int(rng.uniform(*lead) * SR))]
    for i, p in enumerate(parts):
        if i:
            out.append(np.zeros(int(rng.uniform(*gap) * SR)))
        out.append(p)
    out.append(np.zeros(int(tail * SR)))
    x = np.concatenate(out)
    return np.pad(x, (0, max(0, SR - x.size)))


def _contour(kind: int, lo: float, hi: float, n: int) -> np.ndarray:
    """0 rising, 1 falling, 2 steady, 3 rising then falling: an exponential pitch track."""
    t = np.linspace(0.0, 1.0, n)
    shape = [t, 1 - t, np.full(n, 0.5), 1 - np.abs(2 * t - 1)][kind]
    return lo * (hi / lo) ** shape


# Each kind: task, difficulty, category, sub-category, question, the four choices (in canonical
# order; the answer is the choice at index `value`), and a synthesiser (value, rng) -> samples.
CONTOUR = ["Rising", "Falling", "Steady", "Rising then falling"]


def _beeps(v, rng):
    f = rng.uniform(800, 1200)
    return _sequence([_sine(f, rng.uniform(0.12, 0.2)) for _ in range(v + 1)], rng)


def _content(v, rng):
    n = int(rng.uniform(1.5, 2.5) * SR)
    if v == 0:
        return np.zeros(n)
    if v == 1:
        return _ramp(0.2 * rng.standard_normal(n))
    if v == 2:
        return _sine(rng.uniform(300, 600), n / SR, 0.4)
    return _sequence([_sine(1000.0, 0.15) for _ in range(3)], rng)


def _loudest(v, rng):
    f = rng.uniform(500, 700)
    return _sequence([_sine(f, 0.4, 0.5 if i == v else 0.1) for i in range(4)], rng, gap=(0.2, 0.3))


def _syllables(v, rng):
    f0 = rng.uniform(100, 180)
    return _sequence([_voice(f0 * rng.uniform(0.95, 1.05), rng.uniform(0.18, 0.26)) for _ in range(v + 1)],
                     rng, gap=(0.15, 0.3))


def _glide(v, rng):
    n = int(rng.uniform(2.0, 3.0) * SR)
    return _sequence([_sine(_contour(v, 300, 900, n), n / SR, 0.4)], rng)


def _intonation(v, rng):
    n = int(rng.uniform(1.2, 1.8) * SR)
    return _sequence([_voice(_contour(v, 110, 220, n), n / SR)], rng)


def _pitch(v, rng):
    return _sequence([_sine([100.0, 250.0, 1000.0, 4000.0][v], rng.uniform(1.5, 2.5), 0.4)], rng)


KINDS = {
    "beeps": ("sound", "medium", "Information Extraction", "Event Counting",
              "How many beeps do you hear in the audio?",
              ["1 beep", "2 beeps", "3 beeps", "4 beeps"], _beeps),
    "content": ("sound", "easy", "Information Extraction", "Sound Type Identification",
                "What does the audio contain?",
                ["Silence", "White noise", "A steady tone", "Beeps"], _content),
    "pitch": ("music", "easy", "Information Extraction", "Pitch Estimation",
              "What is the approximate frequency of the tone?",
              ["100 Hz", "250 Hz", "1000 Hz", "4000 Hz"], _pitch),
    "glide": ("music", "medium", "Reasoning", "Melodic Contour",
              "How does the pitch of the tone change over time?", CONTOUR, _glide),
    "loudest": ("music", "hard", "Reasoning", "Loudness Comparison",
                "Four tones play one after another. Which one is the loudest?",
                ["The first", "The second", "The third", "The fourth"], _loudest),
    "syllables": ("speech", "hard", "Information Extraction", "Syllable Counting",
                  "How many syllable-like bursts does the voice produce?",
                  ["1 syllable", "2 syllables", "3 syllables", "4 syllables"], _syllables),
    "intonation": ("speech", "medium", "Reasoning", "Intonation",
                   "How does the pitch of the voice change?", CONTOUR, _intonation),
}


def make_demo_set(out_dir, n_per_kind: int = 4, seed: int = 0) -> Path:
    """Write `out_dir/audios/<id>.wav` and `out_dir/demo.json`; return the JSON path.

    `audio_id` is relative to out_dir (`./audios/<id>.wav`), so pass out_dir as the audio root.
    Items interleave the kinds, so a `--limit` run still sees every kind. Within a kind, each
    block of four items covers every answer value once and puts the answer at every position
    once, so positions are exactly balanced when n_per_kind is a multiple of 4 (default 4 gives
    28 items, about 1-4 s each). Same seed, same bytes.
    """
    if n_per_kind < 1:
        raise ValueError("n_per_kind must be at least 1")
    out = Path(out_dir)
    (out / "audios").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for j in range(n_per_kind):
        for k, (name, (task, diff, cat, sub, question, canon, synth)) in enumerate(KINDS.items()):
            value = j % 4
            pos = (j // 4 + j + k) % 4  # a permutation of positions within each block of four
            others = [canon[i] for i in rng.permutation(4) if i != value]
            choices = others[:pos] + [canon[value]] + others[pos:]
            index = len(items)
            uid = str(uuid.uuid5(NAMESPACE, f"mlx-listen-demo/{seed}/{index}"))
            x = synth(value, rng)
            x = x + 1e-3 * rng.standard_normal(x.size) * (name != "content" or value != 0)  # faint floor
            sf.write(out / "audios" / f"{uid}.wav", x.astype(np.float32), SR, subtype="PCM_16")
            items.append({
                "id": uid, "audio_id": f"./audios/{uid}.wav", "question": question,
                "choices": choices, "answer": canon[value], "dataset": "synthetic", "task": task,
                "split": "demo", "category": cat, "sub-category": sub, "difficulty": diff,
            })
    path = out / "demo.json"
    path.write_text(json.dumps(items, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
