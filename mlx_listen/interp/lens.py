"""The logit lens of a steering direction: what adding d to the last block's output does to the logits.

The steering edit (`interp.steering.add`) adds α·d to the last decoder block's output h at T,
before the final RMSNorm y = w ⊙ h / r(h), r(h) = sqrt(mean(h²) + eps), then `lm_head`. Three lenses
read d through that head (each a vocabulary-sized vector; its top-k are the tokens d promotes, its
bottom-k the ones it demotes; logits are shift-invariant, so only the order and differences count):

- `direct`: lm_head(w ⊙ d). State-free. It is the Jacobian below at a state h ⊥ d, up to the
  positive factor 1/r(h), so it ranks tokens without any data (a fixed vector alone).
- `jacobian`: the first-order effect at the model's actual state, J(h)·d with
      J(h)·d = lm_head(w ⊙ (d − h (h·d) / (n r²)) / r),     n = hidden size, r = r(h).
  Linear in d, so a mean over items is lm_head(w ⊙ mean of the tangents). The h-term is what
  RMSNorm takes away: the part of d along h only rescales the state. Per unit α.
- `exact`: unembed(h + α d) − unembed(h), for the strength α steering uses. exact ≈ α·jacobian
  for small α.

`method.inspect` runs these over a data set (`mlx-listen steer inspect`).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from .edit import add

LENSES = ("direct", "jacobian", "exact")
ALL = "all"


# -- the lenses -----------------------------------------------------------------------------------

def norm_eps(model) -> float:
    return float(model.final_norm.eps)


def tangent(h: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
    """(d − h (h·d) / (n r²)) / r, r = sqrt(mean(h²) + eps): J(h)·d before w ⊙ and lm_head (float64)."""
    h, d = np.asarray(h, np.float64), np.asarray(d, np.float64)
    r2 = float(np.mean(h * h)) + eps
    return (d - h * (float(h @ d) / (h.size * r2))) / np.sqrt(r2)


def lens_of(model, hidden_vec: np.ndarray) -> np.ndarray:
    """lm_head(w ⊙ v) for a hidden-space vector v (float32 math, float64 result)."""
    w = model.final_norm.weight.astype(mx.float32)
    out = model.head((w * mx.array(np.asarray(hidden_vec, np.float32)))[None])[0]
    return np.array(out.astype(mx.float32), np.float64)


def exact_delta(model, h: np.ndarray, d: np.ndarray, alpha: float) -> np.ndarray:
    """unembed(h + α d) − unembed(h) (float32 math, float64 result)."""
    h = mx.array(np.asarray(h, np.float32))
    d = mx.array(np.asarray(d, np.float32))
    logits = model.unembed(mx.stack([add(h, alpha * d), h])).astype(mx.float32)
    return np.array(logits[0] - logits[1], np.float64)


def lens_vectors(model, d, h=None, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """The lenses of one direction d (hidden,): `direct` always; `jacobian` and `exact` at state h
    (the last block's output at T, pre-norm) when given. Vocabulary-sized float64 arrays."""
    d = np.asarray(d, np.float32)
    out = {"direct": lens_of(model, d)}
    if h is not None:
        out["jacobian"] = lens_of(model, tangent(h, d, norm_eps(model)))
        out["exact"] = exact_delta(model, h, d, alpha)
    return out


# -- ranking tokens ----------------------------------------------------------------------------------

def _token_names(processor, ids: Sequence[int]) -> list[tuple[str, str]]:
    tok = processor.tokenizer
    out = []
    for i in ids:
        try:
            text = tok.decode([int(i)])
        except Exception:  # an id the tokenizer does not know (padded head rows)
            text = f"<id {int(i)}>"
        try:
            piece = tok.convert_ids_to_tokens(int(i))
        except Exception:
            piece = None
        out.append((text, piece if isinstance(piece, str) else text))
    return out


def n_ranked_tokens(model, processor) -> int:
    """Ids ranked by the lenses: the head's rows the tokenizer knows (Qwen pads lm_head past them)."""
    V = int(model.vocab_size)
    tok = getattr(processor.tokenizer, "_tokenizer", processor.tokenizer)
    try:
        return min(V, len(tok))
    except TypeError:
        return V


def top_tokens(values: np.ndarray, processor, k: int, n_ranked: int | None = None) -> dict:
    """The k highest (promoted) and k lowest (demoted) entries of a lens vector, ties by id."""
    v = np.asarray(values, np.float64)[: n_ranked or len(values)]
    ids = np.arange(v.size)
    k = min(k, v.size)
    up = np.lexsort((ids, -v))[:k]
    down = np.lexsort((ids, v))[:k]

    def rows(idx):
        return [{"id": int(i), "token": t, "piece": p, "value": float(v[i])}
                for i, (t, p) in zip(idx, _token_names(processor, idx))]

    return {"promoted": rows(up), "demoted": rows(down)}
