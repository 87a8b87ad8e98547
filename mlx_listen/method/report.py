"""The experiment's numbers: `report.json` (every number, machine-readable), built from the stages'
records alone, so a rerun rebuilds it exactly. The verdict sentences are `verdict.py`, the markdown
and the plots `report_md.py`.

Endpoints, both on the held-out items, each condition against the baseline (paired):
- accuracy (greedy answer, official string match): with one repeat, Tango's score interval and
  the McNemar score test (one method: the interval excludes 0 exactly when p < 0.05); with R > 1
  repeats, each item's result averaged over the repeats and a paired t interval and test;
- the correct option's log-prob margin (declared primary graded endpoint: it does not depend on
  the answer's format, so a steering that only makes answers parse cannot move it): the per-item
  change with a paired t interval and test.
Beside them: parse rates per condition, flips split by parse status, the specialist minus the mean
of the random sets per item (paired), the power of the design (minimum detectable effects).
"""

from __future__ import annotations

import numpy as np

from .. import stats
from ..eval import mmau
from ..headset import listening
from .names import BASELINE, MEAN, RANDOM_DIRECTION, SPECIALIST, ablate_name, random_name
from .validation import listening_validation, strata_of
from .verdict import claims, verdict


def n_random_used(folds) -> int:
    """Random sets every fold has (a fold with fewer distinct layer sets than asked has fewer)."""
    return min(len(f.random_sets) for f, _ in folds)


def condition_names(s, folds) -> list[str]:
    n = n_random_used(folds)
    names = [BASELINE, SPECIALIST, MEAN] + ([RANDOM_DIRECTION] if s.random_direction else [])
    names += [random_name(i) for i in range(n)]
    if s.ablate:
        for mode in s.ablate_modes:
            names += [ablate_name(mode, SPECIALIST)] + [ablate_name(mode, random_name(i))
                                                        for i in range(min(s.n_ablate_random, n))]
    return names


def collect(s, items, base: dict, folds) -> tuple[dict, dict, list[str]]:
    """results[name][id] = the item's outcomes under `name`, one per repeat (errors left out; an alpha
    of 0 is the baseline's answer); the failed items; the tested ids in data order."""
    names = condition_names(s, folds)
    results: dict[str, dict[str, list]] = {n: {} for n in names}
    failed = {}
    for fold, test in folds:
        for i in fold.test_ids:
            b, row = base[i], test[i]
            if "error" in b or "error" in row:
                failed[i] = b.get("error") or row.get("error")
                continue
            results[BASELINE].setdefault(i, []).append(b)
            for n in names[1:]:
                got = b if fold.alpha.get(n) == 0 else row["results"].get(n)
                if got is not None and "error" not in got:
                    results[n].setdefault(i, []).append(got)
    ids = [it["id"] for it in items if it["id"] in results[BASELINE] and it["id"] not in failed]
    return results, failed, ids


def _mean(outs: list, key: str):
    vals = [o.get(key) for o in outs if o.get(key) is not None]
    return float(np.mean([float(v) for v in vals])) if vals else None


def _per_item(results: dict, name: str, key: str, ids) -> dict[str, float]:
    out = {}
    for i in ids:
        v = _mean(results[name].get(i, []), key)
        if v is not None:
            out[i] = v
    return out


def paired(base: dict, treat: dict, tasks: dict, repeats: int, min_group: int) -> dict | None:
    """treat - base accuracy on the items both have: one repeat, Tango + McNemar score test per task
    with Holm; more, the per-item mean over repeats with a paired t (per task too, Holm)."""
    ids = [i for i in base if i in treat]
    if not ids:
        return None
    b, t = np.array([base[i] for i in ids]), np.array([treat[i] for i in ids])
    task = [tasks[i] for i in ids]
    if repeats == 1:
        return stats.paired_accuracy(b.astype(bool), t.astype(bool), tasks=task, min_group=min_group)
    out = {"method": "per-item mean over repeats, paired t", **stats.paired_mean_diff(b, t, min_group=min_group),
           "wrong_to_right": None, "right_to_wrong": None}
    rows = []
    for name in sorted(set(task)):
        sel = np.array([x == name for x in task])
        rows.append({"task": name, **stats.paired_mean_diff(b[sel], t[sel], min_group=min_group)})
    ps = [r["p"] if r["p"] is not None else 1.0 for r in rows]
    for r, adj in zip(rows, stats.holm(ps)):
        r["p_holm"] = adj
    out["per_task"] = rows
    return out


def margin_shift(base: dict, treat: dict, min_group: int) -> dict | None:
    ids = [i for i in base if i in treat]
    return stats.paired_mean_diff([base[i] for i in ids], [treat[i] for i in ids], min_group=min_group) if ids else None


def parse_table(results: dict, name: str, ids) -> dict:
    """Shares of answers with <answer> tags and of answers that pick exactly one option."""
    outs = [o for i in ids for o in results[name].get(i, []) if "parsed" in o]
    n = len(outs)
    tags, option = sum(bool(o["parsed"]) for o in outs), sum(o.get("choice") is not None for o in outs)
    return {"n": n, "tags": tags / n if n else None, "option": option / n if n else None,
            "option_ci95": list(stats.wilson(option, n))}


def flips_by_parse(results: dict, name: str, ids, tasks: dict, min_group: int) -> dict | None:
    """Wrong->right and right->wrong flips against the baseline, split by whether the answers pick an
    option; and the accuracy change among the items whose answers pick an option under both."""
    pairs = [(b, t, i) for i in ids for b, t in zip(results[BASELINE].get(i, []), results[name].get(i, []))
             if "correct" in t]
    if not pairs:
        return None
    parsable = lambda o: o.get("choice") is not None  # noqa: E731
    w2r = [(b, t) for b, t, _ in pairs if not b["correct"] and t["correct"]]
    r2w = [(b, t) for b, t, _ in pairs if b["correct"] and not t["correct"]]
    both = [(b, t) for b, t, _ in pairs if parsable(b) and parsable(t)]
    out = {"n": len(pairs), "wrong_to_right": len(w2r), "right_to_wrong": len(r2w),
           "wrong_to_right_from_unparsable": sum(not parsable(b) for b, _ in w2r),
           "right_to_wrong_to_unparsable": sum(not parsable(t) for _, t in r2w),
           "became_parsable": sum(not parsable(b) and parsable(t) for b, t, _ in pairs),
           "became_unparsable": sum(parsable(b) and not parsable(t) for b, t, _ in pairs)}
    out["parse_change"] = stats.paired_accuracy(np.array([parsable(b) for b, _, _ in pairs]),
                                                np.array([parsable(t) for _, t, _ in pairs]), min_group=min_group)
    out["among_parsable"] = (stats.paired_accuracy(np.array([b["correct"] for b, _ in both], bool),
                                                   np.array([t["correct"] for _, t in both], bool),
                                                   min_group=min_group) if both else None)
    return out


def build_report(s, items: list[dict], base: dict, folds: list) -> dict:
    """Everything report.md shows, machine-readable."""
    names = condition_names(s, folds)
    results, failed, ids = collect(s, items, base, folds)
    tasks = {it["id"]: it["task"] for it in items}
    acc = {n: _per_item(results, n, "correct", ids) for n in names}
    marg = {n: _per_item(results, n, "margin", ids) for n in names}
    conditions = {}
    for n in names:
        vals = np.array(list(acc[n].values()))
        entry = {"n": int(vals.size), "n_errors": len(ids) - int(vals.size),
                 "accuracy": float(vals.mean()) if vals.size else None, "ci95": _acc_ci(vals, s.repeats),
                 "margin_mean": float(np.mean(list(marg[n].values()))) if marg[n] else None,
                 "parse": parse_table(results, n, ids),
                 "per_task": {t: _task_acc(acc[n], tasks, t) for t in mmau.TASKS}}
        if n != BASELINE:
            entry["vs_baseline"] = paired(acc[BASELINE], acc[n], tasks, s.repeats, s.min_group)
            entry["margin_vs_baseline"] = margin_shift(marg[BASELINE], marg[n], s.min_group)
            entry["flips_by_parse"] = flips_by_parse(results, n, ids, tasks, s.min_group)
        conditions[n] = entry
    n_rand = n_random_used(folds)
    randoms = [random_name(i) for i in range(n_rand)]
    report = {
        "settings": s.to_json(), "n_items": len(items), "n_tested": len(ids),
        "failed": [{"id": i, "error": e} for i, e in failed.items()],
        "random_sets_used": n_rand, "random_sets_per_fold": [len(f.random_sets) for f, _ in folds],
        "folds": [_fold_json(fold) for fold, _ in folds], "conditions": conditions,
        "gains": {n: conditions[n]["accuracy"] - conditions[BASELINE]["accuracy"] for n in names[1:]
                  if conditions[n]["accuracy"] is not None and ids},
        "controls": _controls(s, names, randoms, acc, marg, conditions) if ids else {},
        "heads_null": _null_summary(folds),
        "head_overlap_across_folds": _pairwise_jaccard([f.heads for f, _ in folds]),
        "validation": _validation(s, items, base, [f for f, _ in folds], n_rand),
        "power": _power(conditions.get(SPECIALIST, {}), ids, tasks, s),
        "coverage": _coverage(items, folds, s.repeats),
    }
    report["claims"] = claims(report)
    report["verdict"] = verdict(report)
    return report


def _acc_ci(vals: np.ndarray, repeats: int):
    if not vals.size:
        return [0.0, 1.0]
    if repeats == 1:
        return list(stats.wilson(int(vals.sum()), int(vals.size)))
    r = stats.paired_mean_diff(np.zeros(vals.size), vals, min_group=2)
    return r["ci95"]


def _task_acc(acc: dict, tasks: dict, t: str) -> dict:
    vals = [v for i, v in acc.items() if tasks[i] == t]
    n = len(vals)
    return {"n": n, "accuracy": float(np.mean(vals)) if n else None}


def _controls(s, names, randoms, acc, marg, conditions) -> dict:
    """The specialist (steering; each ablation mode) against its matched random sets: the empirical p
    of its gain among theirs, and the per-item specialist minus the mean of the random sets (paired)."""
    def against(spec: str, rand: list[str], sign: float) -> dict:
        rand = [r for r in rand if conditions[r]["accuracy"] is not None]
        if not rand or conditions[spec]["accuracy"] is None:
            return {}
        base = conditions[BASELINE]["accuracy"]
        gain = lambda n: sign * (conditions[n]["accuracy"] - base)  # noqa: E731
        out = {"accuracy": stats.compare_to_controls(gain(spec), [gain(r) for r in rand])}
        out["accuracy_vs_mean_random"] = _vs_mean(acc, spec, rand, s.min_group)
        mshift = lambda n: conditions[n]["margin_vs_baseline"]  # noqa: E731
        if mshift(spec) and mshift(spec)["difference"] is not None:
            vals = [sign * mshift(r)["difference"] for r in rand if mshift(r) and mshift(r)["difference"] is not None]
            if vals:
                out["margin"] = stats.compare_to_controls(sign * mshift(spec)["difference"], vals)
            out["margin_vs_mean_random"] = _vs_mean(marg, spec, rand, s.min_group)
        out["n_random"] = len(rand)
        return out

    controls = {"steering": against(SPECIALIST, randoms, 1.0)}
    if RANDOM_DIRECTION in names:
        ids = [i for i in acc[SPECIALIST] if i in acc[RANDOM_DIRECTION]]
        controls["random_direction"] = stats.paired_mean_diff([acc[RANDOM_DIRECTION][i] for i in ids],
                                                              [acc[SPECIALIST][i] for i in ids], min_group=s.min_group)
    if s.ablate:
        for mode in s.ablate_modes:
            rand = [ablate_name(mode, r) for r in randoms if ablate_name(mode, r) in names]
            controls[f"ablation:{mode}"] = against(ablate_name(mode, SPECIALIST), rand, -1.0)
    return controls


def _vs_mean(values: dict, spec: str, rand: list[str], min_group: int) -> dict | None:
    """Per item, `spec`'s value minus the mean of the random sets' (items every one of them has), paired."""
    ids = list(values[spec])
    M = np.array([[values[r].get(i, np.nan) for i in ids] for r in rand], np.float64)
    keep = ~np.isnan(M).any(axis=0)
    if not keep.any():
        return None
    return stats.paired_mean_diff(M[:, keep].mean(axis=0), np.array([values[spec][i] for i in ids])[keep],
                                  min_group=min_group)


def _power(spec: dict, ids, tasks: dict, s) -> dict:
    """The smallest effects this design detects with 80% power (two-sided 5%), from the specialist's
    own discordance (accuracy) and spread (margin): overall and for a task of average size."""
    vb, mv = spec.get("vs_baseline"), spec.get("margin_vs_baseline")
    n = len(ids)
    out = {"n": n, "power": 0.8, "alpha": 0.05, "accuracy_mde": vb.get("mde80") if vb else None,
           "margin_mde": mv.get("mde80") if mv else None}
    if vb and n:
        per = [r for r in vb.get("per_task", []) if r.get("mde80") is not None]
        out["accuracy_mde_per_task"] = {r["task"]: r["mde80"] for r in per}
        out["n_per_task"] = {r["task"]: r["n"] for r in per}
        if vb.get("wrong_to_right") is not None:
            out["discordant_share"] = (vb["wrong_to_right"] + vb["right_to_wrong"]) / n
    return out


def _null_summary(folds) -> dict:
    """The folds' permutation-null claims combined (every fold of every repeat)."""
    p_set = [f.null.get("p_set") for f, _ in folds]
    return {"n_beating_null": [f.null.get("n_beating_null", 0) for f, _ in folds], "p_set": p_set,
            "combined": stats.combine_fold_p(p_set),
            "stability": [f.stability["mean"] for f, _ in folds],
            "stability_null": [f.stability["null_reference"]["mean"] for f, _ in folds]}


def _coverage(items, folds, repeats: int) -> dict:
    per_repeat = {}
    for f, _ in folds:
        per_repeat.setdefault(f.repeat, []).extend(f.test_ids)
    every = all(sorted(v) == sorted(it["id"] for it in items) for v in per_repeat.values())
    return {"every_item_tested_once": every and len(per_repeat) == repeats, "repeats": repeats,
            "calibration_test_disjoint": all(not set(f.calibration_ids) & set(f.test_ids) for f, _ in folds)}


def _fold_json(fold) -> dict:
    return {
        "repeat": fold.repeat, "index": fold.index, "calibration_ids": fold.calibration_ids, "test_ids": fold.test_ids,
        "heads": [[int(l), int(h), round(float(fold.scores[l, h]), 6)] for l, h in fold.heads],
        "layers": fold.layers, "partialled_out": fold.partialled_out,
        "calibration_accuracy": fold.calibration_accuracy,
        "null": {k: v for k, v in (fold.null or {}).items() if k != "null_topk"},
        "stability": fold.stability, "other_center": fold.other_center,
        "random_sets": [[list(h) for h in rs] for rs in fold.random_sets],
        "alpha": fold.alpha, "tuning": fold.tuning,
        "mean_vector_norm": float(np.linalg.norm(fold.mean_vector)) if fold.mean_vector is not None else None,
        "zero_directions": fold.zero_directions,
    }


def _pairwise_jaccard(sets) -> list[dict]:
    return [{"folds": [a, b], "jaccard": stats.jaccard(sets[a], sets[b])}
            for a in range(len(sets)) for b in range(a + 1, len(sets))]


def _validation(s, items, base: dict, folds: list, n_rand: int) -> dict:
    """Listening validation of each fold's heads on its own test items (`validation.listening_validation`:
    pooled and within strata of correctness x task, against the fold's matched random sets); with
    repeats, each item's listening score is averaged over the repeats' head sets."""
    L, R = {}, {}
    for fold in folds:
        for i in fold.test_ids:
            if "error" in base[i]:
                continue
            mass = np.asarray(base[i]["audio_mass"])
            L.setdefault(i, []).append(listening(mass, fold.heads))
            R.setdefault(i, []).append([listening(mass, rs) for rs in fold.random_sets[:n_rand]])
    ids = [it["id"] for it in items if it["id"] in L]
    if not ids:
        return {"n": 0, "verdict": "Listening validation: no item to validate on."}
    rows = [base[i] for i in ids]
    cat = []
    for b in rows:
        a, z = b["choice"], b["silence"]["choice"]
        cat.append("unparsable" if a is None or z is None else ("changed" if a != z else "unchanged"))
    rand = [np.array([np.mean([r[j] for r in R[i]]) for i in ids]) for j in range(n_rand)]
    rep = listening_validation(np.array([np.mean(L[i]) for i in ids]), np.array(cat), strata_of(rows), rand,
                               seed=s.seed, min_group=s.min_group)
    rep["n"] = len(ids)
    rep["scores"] = {g: [float(np.mean(L[i])) for i, c in zip(ids, cat) if c == g]
                     for g in ("changed", "unchanged", "unparsable")}
    return rep
