"""Fixtures of the command-line tests: clips good and bad, an empty working folder, and a guard
against loading weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import SR, tone


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, audio in {"a": tone(1.0), "b": tone(2.3, 880.0, 5), "long": tone(45.0, seed=3),
                        "empty": np.zeros(0, np.float32), "short": tone(100 / SR)}.items():
        out[name] = d / f"{name}.wav"
        sf.write(out[name], audio, SR)
    out["text"] = d / "notes.wav"
    out["text"].write_text("this is not audio\n")
    out["missing"] = d / "missing.wav"
    return out


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working folder, to check that nothing gets written."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def no_load(monkeypatch):
    """Fail loudly if any command gets as far as loading weights."""
    import mlx_listen.load as L

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(L, "load_model", boom)
