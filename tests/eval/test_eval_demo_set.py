"""The synthetic MMAU-format demo set (`eval/demo_set.py`): valid schema, balanced answer positions,
deterministic, and every answer really decided by the audio (checked with simple signal
measurements)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from mlx_listen.eval.demo_set import KINDS, SR, make_demo_set
from mlx_listen.eval.mmau import load_items, score

KEYS = ["id", "audio_id", "question", "choices", "answer", "dataset", "task", "split", "category",
        "sub-category", "difficulty"]
ORDINAL = ["The first", "The second", "The third", "The fourth"]


@pytest.fixture(scope="module")
def demo_audio(demo_set):
    """The shared demo set (make_demo_set's defaults), each item with its audio: (demo.json, items)."""
    items = load_items(demo_set)
    for it in items:
        it["audio"], sr = sf.read(demo_set.parent / it["audio_id"], dtype="float64")
        assert sr == SR
    return demo_set, items


def of_kind(items, name):
    spec = KINDS[name]
    return [it for it in items if it["question"] == spec[4] and it["task"] == spec[0]]


def envelope(x, ms=10):
    n = SR * ms // 1000
    frames = x[: x.size // n * n].reshape(-1, n)
    return np.sqrt((frames ** 2).mean(axis=1))


def bursts(x):
    """(start, end) frame ranges where the 10 ms RMS exceeds a tenth of its maximum."""
    on = envelope(x) > 0.1 * envelope(x).max()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def centroid(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2  # power: the faint noise floor drops out
    f = np.fft.rfftfreq(x.size, 1 / SR)
    return float((f * spec).sum() / spec.sum())


def thirds(x):
    (s, _), (_, e) = bursts(x)[0], bursts(x)[-1]
    seg = x[s * SR // 100: e * SR // 100]
    k = seg.size // 3
    return [centroid(seg[i * k:(i + 1) * k]) for i in range(3)]


def test_schema_and_files(demo_audio):
    path, items = demo_audio
    raw = json.loads(path.read_text())
    assert len(raw) == 4 * len(KINDS) == 28
    assert all(list(it) == KEYS for it in raw)  # MMAU's 11 keys, nothing else
    assert len({it["id"] for it in raw}) == len(raw)
    for it in raw:
        assert it["audio_id"] == f"./audios/{it['id']}.wav" and it["split"] == "demo"
        assert it["answer"] in it["choices"] and len(set(it["choices"])) == len(it["choices"]) == 4
    for it in items:
        assert it["audio"].ndim == 1 and 1.0 <= it["audio"].size / SR <= 6.0
        assert np.abs(it["audio"]).max() < 1.0
    assert {it["task"] for it in raw} == {"sound", "music", "speech"}
    assert {it["difficulty"] for it in raw} == {"easy", "medium", "hard"}


def test_positions_balanced(demo_audio):
    _, items = demo_audio
    assert Counter(it["choices"].index(it["answer"]) for it in items) == {0: 7, 1: 7, 2: 7, 3: 7}
    for name in KINDS:
        group = of_kind(items, name)
        assert sorted(it["choices"].index(it["answer"]) for it in group) == [0, 1, 2, 3], name
        assert len({it["answer"] for it in group}) == 4, name  # every answer value once
    # so the always-first baseline is exactly chance
    r = score([dict(it, model_output=it["choices"][0]) for it in items])
    assert r.overall.accuracy == 0.25


def test_deterministic(tmp_path, demo_audio):
    path, _ = demo_audio

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.*"))}

    again = make_demo_set(tmp_path / "a")
    assert digest(again.parent) == digest(path.parent)
    other = make_demo_set(tmp_path / "b", seed=1)
    assert json.loads(other.read_text())[0]["id"] != json.loads(path.read_text())[0]["id"]


def test_counts_decided_by_audio(demo_audio):
    _, items = demo_audio
    for name in ("beeps", "syllables"):
        for it in of_kind(items, name):
            assert len(bursts(it["audio"])) == int(it["answer"].split()[0]), (name, it["answer"])


def test_loudest_decided_by_audio(demo_audio):
    _, items = demo_audio
    for it in of_kind(items, "loudest"):
        x = it["audio"]
        env = envelope(x)
        on = env > 0.02  # below the quiet tones (RMS ~0.07), far above the noise floor
        edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
        rms = [np.sqrt(np.mean(env[s:e] ** 2)) for s, e in zip(edges[::2], edges[1::2])]
        assert len(rms) == 4
        loud = int(np.argmax(rms))
        assert loud == ORDINAL.index(it["answer"]) and rms[loud] > 3 * sorted(rms)[-2]


def test_pitch_and_content_decided_by_audio(demo_audio):
    _, items = demo_audio
    for it in of_kind(items, "pitch"):
        x = it["audio"]
        f = np.fft.rfftfreq(x.size, 1 / SR)[np.argmax(np.abs(np.fft.rfft(x)))]
        assert abs(f - float(it["answer"].split()[0])) < 3, it["answer"]
    for it in of_kind(items, "content"):
        x = it["audio"]
        if it["answer"] == "Silence":
            assert np.abs(x).max() < 1e-3
            continue
        spec = np.abs(np.fft.rfft(x)) ** 2 + 1e-20
        flatness = np.exp(np.log(spec).mean()) / spec.mean()
        expected = {"White noise": (1, True), "A steady tone": (1, False), "Beeps": (3, False)}
        n, noisy = expected[it["answer"]]
        assert len(bursts(x)) == n and (flatness > 0.3) == noisy, it["answer"]


@pytest.mark.parametrize("name", ["glide", "intonation"])
def test_contours_decided_by_audio(demo_audio, name):
    _, items = demo_audio
    for it in of_kind(items, name):
        a, b, c = thirds(it["audio"])
        ans = it["answer"]
        if ans == "Rising":
            assert a * 1.2 < b * 1.1 < c, (ans, a, b, c)
        elif ans == "Falling":
            assert a > b * 1.1 > c * 1.2, (ans, a, b, c)
        elif ans == "Steady":
            assert max(a, b, c) < 1.05 * min(a, b, c), (ans, a, b, c)
        else:
            assert b > 1.2 * a and b > 1.2 * c, (ans, a, b, c)
