"""Model folders on disk: their tensors, copies to break or re-shard, and the last-position logits
of a loaded model (the converter and loader tests)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_listen.prompt import prepare

from . import tone

CONVERT = importlib.import_module("mlx_listen_convert.convert")  # the module (for monkeypatching)


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


def last_logits(model, processor, clips=None, question="q") -> np.ndarray:
    clips = [tone(1.0)] if clips is None else clips
    p = prepare(model, processor, clips, question)
    return np.array(model(mx.array(p.ids)[None], input_embeddings=p.embeddings[None])[0, -1].astype(mx.float32))


def hf_copy(tiny, dst: Path, weights=True) -> Path:
    """A copy of the HF folder (optionally without its weight file) to break or re-shard."""
    ignore = None if weights else shutil.ignore_patterns("*.safetensors")
    shutil.copytree(tiny.hf_path, dst, ignore=ignore)
    return dst


def model_copy(src: Path, dst: Path) -> Path:
    """A copy of a model folder, to damage."""
    shutil.copytree(src, dst)
    return dst


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}
