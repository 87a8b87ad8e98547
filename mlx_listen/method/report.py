"""The experiment's report: `report.json` (every number, machine-readable) and `report.md` with its
PNGs, the verdict first. Built from the stages' records alone, so a rerun rebuilds it exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import stats
from ..eval import mmau
from ..headset import listening
from ..plots import curve_plot, hist_plot, rank_plot, roc_plot
from ..records import write_atomic

BASELINE, SPECIALIST, MEAN = "baseline", "specialist", "mean-vector"


def random_name(i: int) -> str:
    return f"random-{i + 1}"


def tuned(name: str, alpha: float) -> str:
    return f"{name}@{alpha:g}"


def condition_names(s) -> list[str]:
    names = [BASELINE, SPECIALIST, MEAN] + [random_name(i) for i in range(s.random_sets)]
    if s.ablate:
        names += ["ablate-specialist"] + [f"ablate-{random_name(i)}" for i in range(s.n_ablate_random)]
    return names


def build_report(s, items: list[dict], base: dict, folds: list) -> dict:
    """Everything report.md shows, machine-readable. Each item's result under each condition comes
    from its own fold's test pass (the baseline from the base pass)."""
    names = condition_names(s)
    results: dict[str, dict[str, bool]] = {n: {} for n in names}
    failed = {}
    fold_of = {}
    for fold, test in folds:
        for i in fold.test_ids:
            fold_of[i] = fold.index
            row, b = test[i], base[i]
            if "error" in b or "error" in row:
                failed[i] = b.get("error") or row.get("error")
                continue
            results[BASELINE][i] = bool(b["correct"])
            for n in names[1:]:
                results[n][i] = bool(row["results"][n]["correct"])
    ids = [it["id"] for it in items if it["id"] in results[BASELINE]]
    tasks = {it["id"]: it["task"] for it in items}
    base_ok = np.array([results[BASELINE][i] for i in ids], bool)
    conditions = {}
    for n in names:
        ok = np.array([results[n][i] for i in ids], bool)
        lo, hi = stats.wilson(int(ok.sum()), len(ok))
        entry = {"n": len(ok), "correct": int(ok.sum()), "accuracy": float(ok.mean()) if len(ok) else None,
                 "ci95": [lo, hi],
                 "per_task": {t: _acc([results[n][i] for i in ids if tasks[i] == t]) for t in mmau.TASKS}}
        if n != BASELINE and len(ok):
            entry["vs_baseline"] = stats.paired_accuracy(base_ok, ok, tasks=[tasks[i] for i in ids],
                                                         min_group=s.min_group)
        conditions[n] = entry
    gain = {n: conditions[n]["accuracy"] - conditions[BASELINE]["accuracy"] for n in names[1:] if ids}
    randoms = [random_name(i) for i in range(s.random_sets)]
    controls = {}
    if ids:
        controls["steering"] = stats.compare_to_controls(gain[SPECIALIST], [gain[r] for r in randoms])
        if s.ablate and s.n_ablate_random:
            drops = [-gain[f"ablate-{r}"] for r in randoms[: s.n_ablate_random]]
            controls["ablation"] = stats.compare_to_controls(-gain["ablate-specialist"], drops)
    report = {
        "settings": s.to_json(),
        "n_items": len(items), "n_tested": len(ids), "failed": [{"id": i, "error": e} for i, e in failed.items()],
        "folds": [_fold_json(fold) for fold, _ in folds],
        "conditions": conditions,
        "gains": gain,
        "controls": controls,
        "head_overlap_across_folds": _pairwise_jaccard([f.heads for f, _ in folds]),
        "validation": _validation(s, items, base, [f for f, _ in folds]),
        "coverage": {"every_item_tested_once": sorted(fold_of) == sorted(it["id"] for it in items),
                     "calibration_test_disjoint": all(not set(f.calibration_ids) & set(f.test_ids) for f, _ in folds)},
    }
    report["verdict"] = verdict(report)
    return report


def _acc(vals) -> dict:
    n, c = len(vals), int(sum(vals))
    lo, hi = stats.wilson(c, n)
    return {"n": n, "correct": c, "accuracy": c / n if n else None, "ci95": [lo, hi]}


def _fold_json(fold) -> dict:
    return {
        "index": fold.index, "calibration_ids": fold.calibration_ids, "test_ids": fold.test_ids,
        "heads": [[int(l), int(h), round(float(fold.scores[l, h]), 6)] for l, h in fold.heads],
        "layers": sorted({l for l, _ in fold.heads}),
        "calibration_accuracy": fold.calibration_accuracy,
        "null": {k: v for k, v in (fold.null or {}).items() if k != "null_topk"},
        "stability": fold.stability, "other_center": fold.other_center,
        "random_sets": [[list(h) for h in rs] for rs in fold.random_sets],
        "alpha": fold.alpha, "tuning": fold.tuning,
        "mean_vector_norm": float(np.linalg.norm(fold.mean_vector)) if hasattr(fold, "mean_vector") else None,
    }


def _pairwise_jaccard(sets) -> list[dict]:
    return [{"folds": [a, b], "jaccard": stats.jaccard(sets[a], sets[b])}
            for a in range(len(sets)) for b in range(a + 1, len(sets))]


def _validation(s, items, base: dict, folds: list) -> dict:
    """Does the listening score of the fold's heads rise on its test items when the audio changes the
    chosen option (audio vs silence)? Unparsable answers are their own category."""
    groups = {"changed": [], "unchanged": [], "unparsable": []}
    random_groups: list[dict] = [{"changed": [], "unchanged": []} for _ in range(s.random_sets)]
    for fold in folds:
        for i in fold.test_ids:
            b = base[i]
            if "error" in b:
                continue
            mass = np.asarray(b["audio_mass"])
            L = listening(mass, fold.heads)
            a, z = b["choice"], b["silence"]["choice"]
            g = "unparsable" if a is None or z is None else ("changed" if a != z else "unchanged")
            groups[g].append(L)
            if g != "unparsable":
                for r, rs in zip(random_groups, fold.random_sets):
                    r[g].append(listening(mass, rs))
    out = {k: len(v) for k, v in groups.items()}
    out["auc"] = stats.auc_ci(groups["changed"], groups["unchanged"], seed=s.seed, min_group=s.min_group)
    out["mean_diff"] = stats.mean_diff_ci(groups["changed"], groups["unchanged"], seed=s.seed, min_group=s.min_group)
    rand = [stats.auc(r["changed"], r["unchanged"]) if r["changed"] and r["unchanged"] else None for r in random_groups]
    out["random_auc"] = rand
    ok = [x for x in rand if x is not None]
    if out["auc"]["auc"] is not None and ok:
        out["auc_vs_random"] = stats.compare_to_controls(out["auc"]["auc"], ok)
    out["scores"] = {k: v for k, v in groups.items()}
    out["definition"] = ("changed: the option the official matcher reads differs between the audio and the silence "
                         "answer; unparsable: either answer picks no option (left out of the AUC)")
    return out


def verdict(r: dict) -> list[str]:
    """Plain sentences a reader can check against the tables."""
    lines = []
    c, g = r["conditions"], r["gains"]
    if not r["n_tested"]:
        return ["No item could be tested."]
    spec = c[SPECIALIST]["vs_baseline"]
    ci = spec["ci95"]
    lines.append(f"Specialist steering changed accuracy by {100 * g[SPECIALIST]:+.1f} points (95% CI "
                 + (f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}" if ci else "n/a: too few items")
                 + f", McNemar p = {spec['mcnemar_p']:.3g}) on {r['n_tested']} held-out items.")
    ctl = r["controls"].get("steering")
    if ctl:
        beats = ctl["empirical_p"] <= 0.05
        lines.append(f"Matched random head sets gained {100 * ctl['mean']:+.1f} points on average (range "
                     f"{100 * ctl['min']:+.1f} to {100 * ctl['max']:+.1f}); the specialist gain's empirical p among "
                     f"them is {ctl['empirical_p']:.3g} (smallest possible {ctl['min_possible_p']:.3g}): "
                     + ("the specialist heads beat the random sets." if beats else
                        "the specialist gain is not distinguishable from the random sets."))
    lines.append(f"The dataset-mean vector changed accuracy by {100 * g[MEAN]:+.1f} points.")
    null = [f["null"] for f in r["folds"]]
    beating = [n.get("n_beating_null", 0) for n in null]
    lines.append("Heads above the permutation null's family-wise 5% threshold, per fold: "
                 + ", ".join(str(b) for b in beating)
                 + (" — no head beats the null." if not any(beating) else "."))
    ab = r["controls"].get("ablation")
    if ab:
        lines.append(f"Ablating the specialist heads lowered accuracy by {100 * ab['specialist']:+.1f} points; matched "
                     f"random ablations by {100 * ab['mean']:+.1f} on average (empirical p {ab['empirical_p']:.3g}).")
    v = r["validation"]
    auc = v["auc"]
    if auc["auc"] is None or auc["too_small"]:
        lines.append(f"Listening validation: too few items ({v['changed']} changed, {v['unchanged']} unchanged, "
                     f"{v['unparsable']} unparsable) for an interval.")
    else:
        lines.append(f"Listening validation: AUC {auc['auc']:.3f} (95% CI {auc['ci95'][0]:.3f} to "
                     f"{auc['ci95'][1]:.3f}) for items whose option changed with silence ({v['changed']}) against "
                     f"unchanged ones ({v['unchanged']}); {v['unparsable']} unparsable left out.")
    return lines


def write_report_md(r: dict, out: Path):
    """report.md with its PNGs: the verdict first, then the tables behind it."""
    s = r["settings"]
    md = ["# Experiment report\n", f"{r['n_tested']} of {r['n_items']} items tested, {s['folds']} folds (seed "
          f"{s['seed']}), k = {s['k']}, center = {s['center']}, alphas {s['alphas']}, {s['random_sets']} matched "
          f"random head sets, prompt {s['prompt']}, greedy, max {s['max_tokens']} tokens.\n", "## Verdict\n"]
    md += [f"- {line}" for line in r["verdict"]]
    md += ["", "## Accuracy on the held-out items\n",
           "| condition | n | accuracy | 95% CI | vs baseline | 95% CI | McNemar p | sound | music | speech |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in r["conditions"].items():
        vb = c.get("vs_baseline")
        d = f"{100 * vb['difference']:+.1f}" if vb else ""
        ci = (f"{100 * vb['ci95'][0]:+.1f} to {100 * vb['ci95'][1]:+.1f}" if vb and vb["ci95"] else ("" if not vb else "n/a"))
        p = f"{vb['mcnemar_p']:.3g}" if vb else ""
        tasks = " | ".join(f"{100 * c['per_task'][t]['accuracy']:.1f}" if c["per_task"][t]["accuracy"] is not None else "-"
                           for t in mmau.TASKS)
        acc = "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}"
        md.append(f"| {name} | {c['n']} | {acc} | {100 * c['ci95'][0]:.1f}–{100 * c['ci95'][1]:.1f} | {d} | {ci} | {p} "
                  f"| {tasks} |")
    spec = r["conditions"][SPECIALIST].get("vs_baseline", {})
    if spec.get("per_task"):
        md += ["", "Specialist vs baseline per task (Holm-adjusted McNemar p): "
               + ", ".join(f"{t['task']} {100 * t['difference']:+.1f} (p {t['p_holm']:.3g})" for t in spec["per_task"])]
    md += ["", "## Folds\n", "| fold | calibration | test | heads (layer.head, r) | layers | beat null | p (set) | "
           "stability (mean) | overlap with center=" + ("task" if s["center"] == "none" else "none") + " | alpha |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for f in r["folds"]:
        heads = ", ".join(f"{l}.{h} ({sc:+.2f})" for l, h, sc in f["heads"][:8]) + (" …" if len(f["heads"]) > 8 else "")
        stab = np.mean(f["stability"]["frequency"]) if f["stability"]["frequency"] else float("nan")
        alphas = ", ".join(f"{k} {v:g}" for k, v in f["alpha"].items() if not k.startswith("random-")) \
            + f", random sets {sorted({v for k, v in f['alpha'].items() if k.startswith('random-')})}"
        md.append(f"| {f['index']} | {len(f['calibration_ids'])} | {len(f['test_ids'])} | {heads} | {f['layers']} | "
                  f"{f['null'].get('n_beating_null')} (r > {f['null'].get('fwer_threshold', float('nan')):.3f}) | "
                  f"{f['null'].get('p_set', float('nan')):.3g} | {stab:.2f} | {f['other_center']['jaccard']:.2f} | {alphas} |")
    md += ["", "Head sets across folds (Jaccard): " + ", ".join(f"{o['folds']}: {o['jaccard']:.2f}"
                                                                 for o in r["head_overlap_across_folds"])]
    # plots
    pngs = []
    for f in r["folds"]:
        series, bands = {}, {}
        for name in (SPECIALIST, MEAN):
            curve = f["tuning"][name]["curve"]
            series[name] = [curve[f"{a:g}"]["accuracy"] for a in s["alphas"]]
            bands[name] = ([curve[f"{a:g}"]["ci95"][0] for a in s["alphas"]], [curve[f"{a:g}"]["ci95"][1] for a in s["alphas"]])
        rnd = [[f["tuning"][k]["curve"][f"{a:g}"]["accuracy"] for a in s["alphas"]] for k in f["tuning"] if k.startswith("random-")]
        if rnd:
            series["random sets (mean)"] = list(np.mean(np.array(rnd, float), axis=0))
        base = f["tuning"][SPECIALIST]["baseline"]
        if base is not None:
            series["baseline"] = [base] * len(s["alphas"])
        path = out / f"alpha_fold{f['index']}.png"
        curve_plot(s["alphas"], series, path, "alpha", "calibration accuracy",
                   f"Fold {f['index']}: accuracy vs steering strength on its calibration items", bands=bands)
        pngs.append(path.name)
        n = f["null"]
        if n.get("observed_r"):
            path = out / f"heads_fold{f['index']}.png"
            rank_plot(n["observed_r"], {"null median": n["rank_q50"], "null 95%": n["rank_q95"]}, path,
                      f"Fold {f['index']}: top-{s['k']} head scores against the permutation null")
            pngs.append(path.name)
    ctl = r["controls"].get("steering")
    if ctl:
        path = out / "random_gains.png"
        hist_plot(ctl["values"], path, "test gain over baseline (accuracy)", "Matched random head sets vs specialist",
                  marker=ctl["specialist"], marker_label="specialist")
        pngs.append(path.name)
    v = r["validation"]
    if v["scores"]["changed"] and v["scores"]["unchanged"]:
        path = out / "listening_roc.png"
        roc_plot({"specialist heads": (v["scores"]["changed"], v["scores"]["unchanged"])}, path,
                 "Listening score: option changed with silence vs unchanged")
        pngs.append(path.name)
    md += ["", "## Plots\n"] + [f"![{p}]({p})" for p in pngs]
    if r["failed"]:
        md += ["", f"## Failed items ({len(r['failed'])})\n"] + [f"- {f['id']}: {f['error']}" for f in r["failed"][:50]]
    md += ["", "Coverage: every item tested exactly once: " + str(r["coverage"]["every_item_tested_once"])
           + "; calibration and test disjoint in every fold: " + str(r["coverage"]["calibration_test_disjoint"]) + "."]
    write_atomic(out / "report.md", "\n".join(md) + "\n")
