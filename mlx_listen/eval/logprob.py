"""Option log-prob records and summaries of a run (eval, heads): what a prediction row keeps of one
item's option log-probs (`interp.scoring`), and the accuracy, margin and agreement over a run."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import stats
from ..errors import ListenError
from ..interp.scoring import choice, margin
from . import mmau


def answer_index(item: dict) -> int:
    """The index of an item's answer among its choices (compared stripped, as `load_items` checks)."""
    a = item["answer"].strip()
    for i, c in enumerate(item["choices"]):
        if c.strip() == a:
            return i
    raise ListenError(f"item {item.get('id')}: answer {item['answer']!r} is not one of its choices")


# -- per-item records and run summaries (eval, heads) ------------------------------------------

def row_fields(item: dict, logprobs) -> dict:
    """What a prediction row records of one item's option log-probs (n_options,)."""
    lp = np.asarray(logprobs, np.float64)
    if not np.isfinite(lp).all():  # never a score: argmax would pick the first NaN option
        raise ListenError("the option log-probs are not finite (NaN or inf in the forward pass)")
    correct = answer_index(item)
    best = choice(lp)
    return {"option_logprobs": [round(float(x), 6) for x in lp], "logprob_choice": best,
            "logprob_correct": best == correct, "margin": round(margin(lp, correct), 6)}


def summary(rows: Sequence[dict]) -> dict | None:
    """Log-prob accuracy (overall and per task, with 95% Wilson intervals), the margin's mean and
    median, and, where the rows also hold a generated answer (`choice`), how often the two agree.
    None when no row was scored."""
    rows = [r for r in rows if "logprob_choice" in r]
    if not rows:
        return None
    out = {"n": len(rows), "scorer": "option log-prob (argmax over the choices' continuations)"}
    groups = {"overall": rows} | {t: [r for r in rows if r.get("task") == t] for t in mmau.TASKS}
    acc, ci = {}, {}
    for name, g in groups.items():
        if g:
            k = sum(bool(r["logprob_correct"]) for r in g)
            acc[name], ci[name] = k / len(g), list(stats.wilson(k, len(g)))
    m = np.array([r["margin"] for r in rows], np.float64)
    m = m[np.isfinite(m)]
    out.update(accuracy=acc, ci95=ci, correct=sum(bool(r["logprob_correct"]) for r in rows),
               margin_mean=float(m.mean()) if m.size else None, margin_median=float(np.median(m)) if m.size else None)
    gen = [r for r in rows if "raw_output" in r and "correct" in r]
    if gen:
        out["generation_accuracy"] = sum(bool(r["correct"]) for r in gen) / len(gen)
        out["agreement"] = sum(r.get("choice") == r["logprob_choice"] for r in gen) / len(gen)
    return out


def summary_line(s: dict | None) -> str:
    """One terminal line of `summary`."""
    if not s:
        return "log-prob scoring: no item scored"
    a = s["accuracy"]
    line = (f"log-prob accuracy {100 * a['overall']:.1f}% over {s['n']} items ("
            + ", ".join(f"{t} {100 * a[t]:.1f}" for t in mmau.TASKS if t in a) + ")")
    if s.get("margin_mean") is not None:
        line += f"; margin mean {s['margin_mean']:+.3f}, median {s['margin_median']:+.3f}"
    if "generation_accuracy" in s:
        line += f"; generation {100 * s['generation_accuracy']:.1f}%, same choice on {100 * s['agreement']:.1f}%"
    return line
