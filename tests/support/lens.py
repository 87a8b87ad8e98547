"""The lens tests' edit of the tiny models: their final-norm weight is all ones, which would hide a
wrong `w ⊙`, so the lens tests run with a random positive weight written into both models."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np


@contextmanager
def norm_weight(tiny, seed=0):
    """A random positive final-norm weight in both the MLX and the torch model, restored after."""
    import torch

    model, _ = tiny.mlx
    norm = model.language_model.model.norm
    hf_norm = tiny.hf_model.model.language_model.norm
    old_mx, old_hf = norm.weight, hf_norm.weight.detach().clone()
    w = np.random.default_rng(seed).uniform(0.3, 2.0, old_mx.shape).astype(np.float32)
    norm.weight = mx.array(w)
    with torch.no_grad():
        hf_norm.weight.copy_(torch.from_numpy(w))
    try:
        yield w
    finally:
        norm.weight = old_mx
        with torch.no_grad():
            hf_norm.weight.copy_(old_hf)
