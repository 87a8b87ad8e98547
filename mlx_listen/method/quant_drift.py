"""`mlx-listen quant-drift`: does quantising a model change what it listens to?

The reference (e.g. the bf16 folder) and each quantised model answer the same items, one model in
memory at a time. Per item and model, from ONE prefill: the log-probabilities at T (the reference
keeps its top 256 and the rest as one tail bucket), every head's audio mass at T, the
audio–silence direction d(x) over the head set's layers, the greedy answer plain and steered
(α·d(x), one batched decode), and each choice's log-prob under both. Each model's records are a
resumable stage (`records.Stage`).

Per quantised model against the reference, on the items both answered:
- logits: KL(reference ‖ model) at T over the reference's top 256 tokens plus a tail bucket (a
  lower bound of the full KL, tight when the top tokens hold the mass), greedy agreement (same
  first token; same whole answer);
- listening: per-item Pearson and Spearman correlation of the (layers × heads) audio mass; the
  head set's listening score correlated across items; the top-k specialist heads of each model
  (found on these items the way `mlx-listen heads` scores them: correctness when both outcomes
  occur, else the correct option's log-prob margin) and their Jaccard overlap;
- steering: the cosine of d(x) with the reference's, per item;
- accuracy and steered gain: paired differences with Newcombe intervals (`stats.paired_accuracy`).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from scipy import stats as sps

from .. import presets, stats
from ..answers import decode, detokenize, prefill
from ..errors import ListenError
from ..eval import mmau
from ..eval.logprob import answer_index
from ..headset import HeadSet, listening
from ..interp.edit import Row, direction
from ..interp.scoring import margin, option_ids, score_options
from ..interp.steering import Silence
from ..load import ModelRef
from ..plots import curve_plot
from ..prompt import prepare
from ..records import Stage, claim, file_sha256, locked, write_atomic, write_json

TOP = 256  # reference log-probs kept per item for the KL


def _f32(a) -> str:
    return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode("ascii")


def _unf32(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), np.float32)


def item_record(model, processor, item: dict, audio_dir: Path, heads: HeadSet, alpha: float, preset: str,
                max_tokens: int, silence: Silence, ref_top: Sequence[int] | None = None) -> dict:
    """One item under one model: everything the comparison reads, from one prefill. `ref_top`: the
    reference's kept token ids for this item, whose log-probs this model records (for the KL)."""
    prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]], presets.build_prompt(item, preset))
    layers = heads.layers
    pre = prefill(model, prompt, layers=layers, audio_mass=True)
    d = direction(pre.resid, silence.residuals(prompt, layers), layers)
    rows = [Row(), Row(alpha * d, True)]
    options = option_ids(processor, prompt, item["choices"], preset)
    lp = score_options(model, pre, options, rows)  # (2, n_choices)
    answers = decode(model, processor, pre, rows, max_tokens)
    logits = model.unembed(pre.final[None]).astype(mx.float32)[0]
    logp = np.array(logits - mx.logsumexp(logits), np.float64)
    if not (np.isfinite(logp).all() and np.isfinite(lp).all() and bool(mx.isfinite(d).all())):
        raise ListenError("the forward pass gave NaN or infinite values")
    top = np.argsort(-logp, kind="stable")[:TOP] if ref_top is None else np.asarray(ref_top, np.int64)
    texts = [detokenize(processor, a.tokens) for a in answers]
    right = [mmau.string_match(item["answer"], mmau.extract_answer(t)[0], item["choices"]) for t in texts]
    correct = answer_index(item)
    return {"correct": bool(right[0]), "steered_correct": bool(right[1]), "tokens": answers[0].tokens,
            "margin": float(margin(lp[0], correct)), "steered_margin": float(margin(lp[1], correct)),
            "audio_mass": np.round(pre.audio_mass.astype(np.float64), 7).tolist(),
            "direction": _f32(np.array(d)), "top_ids": top.tolist(), "top_logp": np.round(logp[top], 6).tolist(),
            "n_audio_tokens": prompt.n_audio_tokens}


def kl_top(ref_ids: Sequence[int], ref_logp: Sequence[float], logp_at: np.ndarray) -> float:
    """KL(ref ‖ q) over the reference's kept tokens plus one tail bucket (a lower bound of the KL)."""
    p = np.exp(np.asarray(ref_logp, np.float64))
    q = np.exp(np.asarray(logp_at, np.float64))
    p_tail, q_tail = max(0.0, 1.0 - p.sum()), max(1e-300, 1.0 - q.sum())
    kl = float(np.sum(p * (np.asarray(ref_logp) - np.asarray(logp_at))))
    if p_tail > 0:
        kl += p_tail * (np.log(p_tail) - np.log(q_tail))
    return max(0.0, kl)


def _heads_of(rows: list[dict], k: int) -> tuple[list[tuple[int, int]], str]:
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    correct = np.array([r["correct"] for r in rows], bool)
    if correct.any() and not correct.all():
        y, target = correct, "correctness"
    else:
        y, target = np.array([r["margin"] for r in rows], np.float64), "option margin"
    scores = stats.head_scores(mass, y, center="none")
    return [tuple(h) for h in stats.top_k(scores, min(k, scores.size)).heads], target


def compare(ref: list[dict], other: list[dict], heads: HeadSet, k: int) -> dict:
    """The drift of one model's records from the reference's (same items, same order)."""
    kl, same_first, same_answer, mass_r, mass_rho, cos = [], [], [], [], [], []
    for a, b in zip(ref, other):
        if b["top_ids"] != a["top_ids"]:
            raise ListenError(f"item {a['id']}: the model's records were not made against this reference")
        kl.append(kl_top(a["top_ids"], a["top_logp"], np.array(b["top_logp"])))
        same_first.append(a["tokens"][:1] == b["tokens"][:1])
        same_answer.append(a["tokens"] == b["tokens"])
        ma, mb = np.ravel(a["audio_mass"]), np.ravel(b["audio_mass"])
        mass_r.append(float(np.corrcoef(ma, mb)[0, 1]) if ma.std() > 0 and mb.std() > 0 else float("nan"))
        mass_rho.append(float(sps.spearmanr(ma, mb).statistic))
        da, db = _unf32(a["direction"]), _unf32(b["direction"])
        den = np.linalg.norm(da) * np.linalg.norm(db)
        cos.append(float(da @ db / den) if den > 0 else float("nan"))
    la = np.array([listening(np.asarray(r["audio_mass"]), heads.heads) for r in ref])
    lb = np.array([listening(np.asarray(r["audio_mass"]), heads.heads) for r in other])
    ha, target = _heads_of(ref, k)
    hb, _ = _heads_of(other, k)
    base_ref = np.array([r["correct"] for r in ref], bool)
    base = np.array([r["correct"] for r in other], bool)
    steer = np.array([r["steered_correct"] for r in other], bool)
    n = len(ref)

    def summary(x):
        x = np.asarray(x, np.float64)
        x = x[np.isfinite(x)]
        return {"mean": float(x.mean()) if x.size else None, "median": float(np.median(x)) if x.size else None,
                "min": float(x.min()) if x.size else None, "n": int(x.size)}

    return {
        "n": n,
        "kl_top": summary(kl), "same_first_token": float(np.mean(same_first)), "same_answer": float(np.mean(same_answer)),
        "mass_pearson": summary(mass_r), "mass_spearman": summary(mass_rho),
        "listening_pearson": float(np.corrcoef(la, lb)[0, 1]) if n > 2 and la.std() > 0 and lb.std() > 0 else None,
        "heads": {"k": k, "target": target, "reference": [list(h) for h in ha], "model": [list(h) for h in hb],
                  "jaccard": stats.jaccard(ha, hb)},
        "direction_cosine": summary(cos),
        "accuracy": {"reference": float(base_ref.mean()), "model": float(base.mean()),
                     "vs_reference": stats.paired_accuracy(base_ref, base)},
        "steered_gain": {"model": float(steer.mean() - base.mean()), "vs_baseline": stats.paired_accuracy(base, steer)},
    }


def drift(reference, models: Sequence, data, audio_dir, out, *, heads: HeadSet, alpha: float = 1.0,
          k: int = 20, limit: int | None = None, prompt: str = presets.DEFAULT_PRESET, max_tokens: int = 32,
          progress: bool = True) -> dict:
    """The drift of each of `models` from `reference` on `data`'s items; resumable in `out`."""
    out = Path(out)
    refs = [ModelRef.of(reference)] + [ModelRef.of(m) for m in models]
    if len(refs) < 2:
        raise ListenError("give the reference and at least one model to compare with it")
    items = mmau.load_items(data)[:limit]
    missing = [it["audio_id"] for it in items if not (Path(audio_dir) / it["audio_id"]).is_file()]
    if missing:
        raise ListenError(f"{len(missing)} audio files missing under {audio_dir}, e.g. {missing[0]}")
    shapes = {r.shape for r in refs}
    if len(shapes) != 1:
        raise ListenError(f"the models differ in shape {sorted(shapes)}: not copies of one checkpoint")
    heads.check(*refs[0].shape)
    presets.canonical(prompt)
    names = [f"model{i}" if i else "reference" for i in range(len(refs))]
    records = {}
    with locked(out):
        claim(out / "drift.meta.json", {"models": [r.fingerprint() for r in refs], "data_sha256": file_sha256(data),
                                        "heads": [list(h) for h in heads.heads], "alpha": alpha, "prompt": prompt,
                                        "max_tokens": max_tokens},
              extra={"paths": [str(r) for r in refs]})
        for name, ref in zip(names, refs):
            stage = Stage(out / f"{name}.jsonl")
            if not stage.todo(items):
                records[name] = stage.rows(items)
                continue
            model, processor = ref.get()
            silence = Silence(model)
            tops = {} if name == "reference" else {r["id"]: r.get("top_ids") for r in records["reference"]}

            def work(it, model=model, processor=processor, silence=silence, tops=tops):
                if tops and tops.get(it["id"]) is None:
                    raise ListenError("the reference could not answer this item")
                return item_record(model, processor, it, Path(audio_dir), heads, alpha, prompt, max_tokens, silence,
                                   tops.get(it["id"]))

            records[name] = stage.run(items, work, desc=name, progress=progress)
            ref._loaded = None  # one model in memory at a time
            del model, processor, silence
            mx.clear_cache()
        ok = [i for i, it in enumerate(items) if all("error" not in records[n][i] for n in names)]
        if not ok:
            raise ListenError("no item was answered by every model")
        ref_rows = [records["reference"][i] for i in ok]
        report = {"reference": str(refs[0]), "models": {}, "n_items": len(items), "n_compared": len(ok),
                  "failed": sorted({records[n][i]["id"] for n in names for i in range(len(items))
                                    if "error" in records[n][i]}),
                  "definitions": {"kl_top": f"KL(reference || model) at T over the reference's top {TOP} tokens "
                                            "plus one tail bucket (a lower bound of the full KL)",
                                  "heads": f"top {k} heads scored on these items (Pearson r of audio mass with "
                                           "correctness, or with the option margin when every answer is right or "
                                           "every one wrong)"}}
        for name, ref in zip(names[1:], refs[1:]):
            report["models"][str(ref)] = compare(ref_rows, [records[name][i] for i in ok], heads, k)
        write_json(out / "drift.json", report)
        write_atomic(out / "drift.md", "\n".join(table(report)) + "\n")
        plot(report, out / "drift.png")
    return report


def table(report: dict) -> list[str]:
    """The drift table, one row per quantised model."""
    lines = [f"{report['n_compared']} items compared with the reference {report['reference']}", "",
             "| model | KL at T (mean) | same answer | mass r (median) | listening r | heads Jaccard | d(x) cosine "
             "(median) | accuracy vs ref (95% CI) | steered gain (95% CI) |", "|---|---|---|---|---|---|---|---|---|"]

    def ci(row):
        c = row.get("ci95")
        return f"{100 * row['difference']:+.1f} ({'n/a' if not c else f'{100 * c[0]:+.1f} to {100 * c[1]:+.1f}'})"

    for name, m in report["models"].items():
        lr = "n/a" if m["listening_pearson"] is None else f"{m['listening_pearson']:.3f}"
        lines.append(f"| {name} | {m['kl_top']['mean']:.4f} | {100 * m['same_answer']:.0f}% | "
                     f"{m['mass_pearson']['median']:.4f} | {lr} | {m['heads']['jaccard']:.2f} | "
                     f"{m['direction_cosine']['median']:.4f} | {ci(m['accuracy']['vs_reference'])} | "
                     f"{ci(m['steered_gain']['vs_baseline'])} |")
    return lines


def plot(report: dict, path: Path):
    names = list(report["models"])
    x = list(range(len(names)))
    series = {"same answer": [report["models"][n]["same_answer"] for n in names],
              "audio mass r (median)": [report["models"][n]["mass_pearson"]["median"] for n in names],
              "heads Jaccard": [report["models"][n]["heads"]["jaccard"] for n in names],
              "d(x) cosine (median)": [report["models"][n]["direction_cosine"]["median"] for n in names]}
    curve_plot(x, series, path, "model (" + "; ".join(f"{i}: {Path(n).name}" for i, n in enumerate(names)) + ")",
               "agreement with the reference (1 = the same)", "What quantisation changes in what the model listens to")
