"""The experiment's `report.md` (the verdict first, then the tables behind it, the PNGs, and why a
plot is missing when it is) and `predictions/`: one official-format JSON array per condition (and
repeat), which `mlx-listen eval score` re-scores like any eval run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..eval import mmau
from ..plots import curve_plot, hist_plot, rank_plot, roc_plot
from ..records import write_atomic
from .names import BASELINE, MEAN, RANDOM_DIRECTION, SPECIALIST, ablate_name, is_random_set
from .report import condition_names


def _pct(x, fmt=".1f"):
    return "-" if x is None else format(100 * x, fmt)


def _cmp_cells(vb: dict | None) -> str:
    if not vb:
        return "| | | "
    ci = f"{100 * vb['ci95'][0]:+.1f} to {100 * vb['ci95'][1]:+.1f}" if vb.get("ci95") else "n/a"
    p = "n/a" if vb.get("p") is None else f"{vb['p']:.3g}"
    return f"| {100 * vb['difference']:+.1f} | {ci} | {p} "


def _row(name: str, c: dict) -> str:
    mv = c.get("margin_vs_baseline")
    m = "" if not mv or mv.get("difference") is None else (
        f"{mv['difference']:+.3f}" + (f" [{mv['ci95'][0]:+.3f}, {mv['ci95'][1]:+.3f}]" if mv.get("ci95") else ""))
    tasks = " | ".join(_pct(c["per_task"][t]["accuracy"]) for t in mmau.TASKS)
    return (f"| {name} | {c['n']} | {_pct(c['accuracy'])} | {_pct(c['ci95'][0])}–{_pct(c['ci95'][1])} | "
            f"{_pct(c['parse']['option'])} {_cmp_cells(c.get('vs_baseline'))}| {m} | {tasks} |")


def _summary_row(label: str, conds: list[dict]) -> str:
    acc = [c["accuracy"] for c in conds if c["accuracy"] is not None]
    d = [c["vs_baseline"]["difference"] for c in conds if c.get("vs_baseline")]
    par = [c["parse"]["option"] for c in conds if c["parse"]["option"] is not None]
    m = [c["margin_vs_baseline"]["difference"] for c in conds
         if c.get("margin_vs_baseline") and c["margin_vs_baseline"].get("difference") is not None]
    return (f"| {label} ({len(conds)}) | | {_pct(np.mean(acc)) if acc else '-'} (mean) | | "
            f"{_pct(np.mean(par)) if par else '-'} | {100 * np.mean(d):+.1f} (mean; {100 * min(d):+.1f} to "
            f"{100 * max(d):+.1f}) | | | {np.mean(m):+.3f} (mean) | | | |" if d else f"| {label} (0) |||||||||||")


def write_report_md(r: dict, out: Path):
    s = r["settings"]
    c = r["conditions"]
    rand = [n for n in c if is_random_set(n)]
    part = r["folds"][0]["partialled_out"] if r["folds"] else []
    md = ["# Experiment report\n",
          f"{r['n_tested']} of {r['n_items']} items tested; {s['folds']} folds × {s['repeats']} repeat(s) (fold seeds "
          f"{s['seed']}..{s['seed'] + s['repeats'] - 1}); k = {s['k']}; head scores: center = {s['center']}"
          + (f" (partialled out: {', '.join(part)})" if part else " (pooled Pearson r)")
          + f"; alphas {s['alphas']}, each condition's alpha chosen on its calibration items by {s['tune']}; "
          f"{r['random_sets_used']} matched random head sets on distinct layer sets ({s['random_sets']} asked for); "
          + ("a norm-matched random direction; " if s["random_direction"] else "")
          + (f"ablation modes {', '.join(s['ablate_modes'])} with {min(s['ablate_sets'], r['random_sets_used'])} "
             "random ablations each; " if s["ablate"] else "no ablation; ")
          + f"prompt {s['prompt']}, greedy, max {s['max_tokens']} tokens. Intervals: "
          + ("Tango score intervals with the McNemar score test (accuracy), paired t (margin); conditional on one "
             "split." if s["repeats"] == 1 else f"per-item results averaged over {s['repeats']} splits, paired t."),
          "", "## Verdict\n"]
    md += [f"- {line}" for line in r["verdict"]]
    md += ["", "## Held-out items, each condition against the baseline\n",
           "Parse: answers that pick exactly one option. Margin: the correct option's log-prob minus the best "
           "other's (nats), change against the baseline with its 95% CI (the primary graded endpoint).\n",
           "| condition | n | accuracy | 95% CI | parse % | vs baseline | 95% CI | p | margin Δ | sound | music | speech |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    named = [BASELINE, SPECIALIST, MEAN, RANDOM_DIRECTION]
    md += [_row(n, c[n]) for n in named if n in c]
    if rand:
        md.append(_summary_row("random sets", [c[n] for n in rand]))
    if s["ablate"]:
        for mode in s["ablate_modes"]:
            md.append(_row(ablate_name(mode, SPECIALIST), c[ablate_name(mode, SPECIALIST)]))
            ab = [c[n] for n in c if n.startswith(ablate_name(mode, "random-"))]
            if ab:
                md.append(_summary_row(f"ablate-{mode} random sets", ab))
    md += ["", "Every random set's row is in report.json (`conditions`).", "", "## Flips by parse status\n",
           "| condition | wrong→right | of which from no option | right→wrong | of which to no option | "
           "became parsable | became unparsable | accuracy change where both parse |", "|---|---|---|---|---|---|---|---|"]
    for n in [x for x in named[1:] if x in c] + ([ablate_name(m, SPECIALIST) for m in s["ablate_modes"]]
                                                 if s["ablate"] else []):
        fp = c[n].get("flips_by_parse")
        if fp:
            ap = fp["among_parsable"]
            both = "-" if not ap else (f"{100 * ap['difference']:+.1f} (n {ap['n']}"
                                       + (f", {100 * ap['ci95'][0]:+.1f} to {100 * ap['ci95'][1]:+.1f}" if ap.get("ci95")
                                          else "") + ")")
            md.append(f"| {n} | {fp['wrong_to_right']} | {fp['wrong_to_right_from_unparsable']} | {fp['right_to_wrong']}"
                      f" | {fp['right_to_wrong_to_unparsable']} | {fp['became_parsable']} | {fp['became_unparsable']} "
                      f"| {both} |")
    spec = c[SPECIALIST].get("vs_baseline") or {}
    if spec.get("per_task"):
        md += ["", "Specialist vs baseline per task (Holm-adjusted p): "
               + ", ".join(f"{t['task']} {100 * t['difference']:+.1f} (p {t['p_holm']:.3g})" for t in spec["per_task"]
                           if t.get("difference") is not None)]
    md += _fold_table(r)
    md += ["", "## Plots\n"] + _plots(r, out)
    if r["failed"]:
        md += ["", f"## Failed items ({len(r['failed'])})\n"] + [f"- {f['id']}: {f['error']}" for f in r["failed"][:50]]
    cov = r["coverage"]
    md += ["", f"Coverage: every item tested exactly once per repeat: {cov['every_item_tested_once']}; calibration "
           f"and test disjoint in every fold: {cov['calibration_test_disjoint']}. `predictions/` holds each "
           "condition's answers in the official format (`mlx-listen eval score predictions/specialist.json`)."]
    write_atomic(out / "report.md", "\n".join(md) + "\n")


def _fold_table(r: dict) -> list[str]:
    s = r["settings"]
    other = "task" if s["center"] == "none" else "none"
    md = ["", "## Folds\n", "| repeat | fold | calibration | test | heads (layer.head, r) | layers | beat null | p (set) | "
          f"stability (null) | overlap with center={other} | random sets | alpha |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in r["folds"]:
        heads = ", ".join(f"{l}.{h} ({sc:+.2f})" for l, h, sc in f["heads"][:8]) + (" …" if len(f["heads"]) > 8 else "")
        st = f["stability"]
        alphas = ", ".join(f"{k} {v:g}" for k, v in f["alpha"].items() if not is_random_set(k))
        ra = sorted({v for k, v in f["alpha"].items() if is_random_set(k)})
        md.append(f"| {f['repeat']} | {f['index']} | {len(f['calibration_ids'])} | {len(f['test_ids'])} | {heads} | "
                  f"{f['layers']} | {f['null'].get('n_beating_null')} (r > {f['null'].get('fwer_threshold', float('nan')):.3f})"
                  f" | {f['null'].get('p_set', float('nan')):.3g} | {st['mean']:.2f} ({st['null_reference']['mean']:.2f}) "
                  f"| {f['other_center']['jaccard']:.2f} | {len(f['random_sets'])} | {alphas}; random sets {ra} |")
    md += ["", "Head sets across folds (Jaccard): " + (", ".join(f"{o['folds']}: {o['jaccard']:.2f}"
                                                                  for o in r["head_overlap_across_folds"]) or "-")]
    return md


def _plots(r: dict, out: Path) -> list[str]:
    s, lines = r["settings"], []
    for f in r["folds"]:
        tag = f"r{f['repeat']}_fold{f['index']}" if s["repeats"] > 1 else f"fold{f['index']}"
        series, bands = {}, {}
        for name in (SPECIALIST, MEAN, RANDOM_DIRECTION):
            if name in f["tuning"]:
                curve = f["tuning"][name]["curve"]
                series[name] = [curve[f"{a:g}"]["value"] for a in s["alphas"]]
                if all("ci95" in curve[f"{a:g}"] for a in s["alphas"]):
                    bands[name] = ([curve[f"{a:g}"]["ci95"][0] for a in s["alphas"]],
                                   [curve[f"{a:g}"]["ci95"][1] for a in s["alphas"]])
        rnd = [[f["tuning"][k]["curve"][f"{a:g}"]["value"] for a in s["alphas"]] for k in f["tuning"]
               if is_random_set(k)]
        if rnd:
            series["random sets (mean)"] = list(np.nanmean(np.array(rnd, float), axis=0))
        base = f["tuning"][SPECIALIST]["baseline"]
        if base is not None:
            series["baseline"] = [base] * len(s["alphas"])
        what = "mean margin (nats)" if s["tune"] == "margin" else "accuracy"
        path = out / f"alpha_{tag}.png"
        curve_plot(s["alphas"], series, path, "alpha", f"calibration {what}",
                   f"{tag}: calibration {what} vs steering strength", bands=bands)
        lines.append(f"![{path.name}]({path.name})")
        n = f["null"]
        if n.get("observed_r"):
            path = out / f"heads_{tag}.png"
            rank_plot(n["observed_r"], {"null median": n["rank_q50"], "null 95%": n["rank_q95"]}, path,
                      f"{tag}: top-{s['k']} head scores against the permutation null")
            lines.append(f"![{path.name}]({path.name})")
    ctl = (r["controls"].get("steering") or {}).get("accuracy")
    if ctl:
        path = out / "random_gains.png"
        hist_plot(ctl["values"], path, "test gain over baseline (accuracy)", "Matched random head sets vs specialist",
                  marker=ctl["specialist"], marker_label="specialist")
        lines.append(f"![{path.name}]({path.name})")
    else:
        lines.append("No random-gain histogram: no random set has a test result.")
    v = r["validation"]
    sc = v.get("scores") or {}
    if sc.get("changed") and sc.get("unchanged"):
        path = out / "listening_roc.png"
        roc_plot({"specialist heads": (sc["changed"], sc["unchanged"])}, path,
                 "Listening score: option changed with silence vs unchanged (pooled)")
        lines.append(f"![{path.name}]({path.name})")
    else:
        lines.append(f"No listening ROC: it needs items whose option changed with silence and items whose option did "
                     f"not ({len(sc.get('changed', []))} changed, {len(sc.get('unchanged', []))} unchanged, "
                     f"{len(sc.get('unparsable', []))} unparsable).")
    return lines


def write_predictions(r: dict, items: list[dict], base: dict, folds: list, out: Path):
    """`predictions/<condition>.json` (repeat 0) and `predictions/repeat<r>/<condition>.json`: the items
    each condition answered, with `model_output` (the extracted answer) and `parsed`, in the official
    JSON-array format `eval score` and MMAU's evaluation.py read. Failed items are left out."""
    from types import SimpleNamespace

    s = SimpleNamespace(**r["settings"])
    s.n_ablate_random = min(s.ablate_sets, s.random_sets)
    names = condition_names(s, folds)
    by_id = {it["id"]: it for it in items}
    per_repeat: dict[int, dict[str, list]] = {}
    for fold, test in folds:
        rows = per_repeat.setdefault(fold.repeat, {n: [] for n in names})
        for i in fold.test_ids:
            b, t = base[i], test[i]
            if "error" in b or "error" in t:
                continue
            for n in names:
                o = b if n == BASELINE or fold.alpha.get(n) == 0 else t["results"].get(n)
                if o is None or "error" in o or "answer" not in o:
                    continue
                rows[n].append({**by_id[i], "model_output": o["answer"], "model_prediction": o["answer"],
                                "parsed": o["parsed"], "condition": n, "repeat": fold.repeat})
    order = {it["id"]: k for k, it in enumerate(items)}
    for rep, conds in per_repeat.items():
        folder = out / "predictions" / ("" if rep == 0 else f"repeat{rep}")
        folder.mkdir(parents=True, exist_ok=True)
        for n, rows in conds.items():
            rows.sort(key=lambda x: order[x["id"]])
            write_atomic(folder / f"{n}.json", json.dumps(rows, ensure_ascii=False))
