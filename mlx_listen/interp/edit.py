"""The steering edit, once: d(x) from the audio and silence residuals, and `h + delta` where it
applies. Every path that steers uses these two: the hook of `steering.Steerer.applied`, the
batched decode (`answers.decode`), option scoring (`scoring.score_options`) and the lens
(`lens.exact_delta`)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Row:
    """One answer's edit of the last block's output: `delta` (hidden,) added at T and, with
    `every_step`, at every later position (None: the plain model)."""

    delta: mx.array | None = None
    every_step: bool = True


def add(h: mx.array, delta: mx.array, on: mx.array | None = None) -> mx.array:
    """The steering edit: `h + delta` in h's dtype, where `on` holds (a mask broadcast over h's
    leading axes; None: everywhere). Adding exact zeros leaves h bit for bit."""
    d = delta.astype(h.dtype)
    return h + (d if on is None else mx.where(on, d, mx.zeros_like(d)))


def direction(audio: dict[int, mx.array], silence: dict[int, mx.array], layers) -> mx.array:
    """d(x) = mean over `layers` (L*) of h_l(audio)[T] - h_l(silence)[T], float32 residuals in."""
    return mx.stack([audio[l] - silence[l] for l in layers]).mean(0)
