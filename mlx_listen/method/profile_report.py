"""`mlx-listen profile`'s comparison: several models' experiment folders read back and set side by
side (`profile.json`, `profile.md`, `profile.png`). Nothing here runs a model: every number comes
from a model's `report.json` (the cross-fitted experiment's, `report.py`) and its `base.jsonl` (every
item's per-head audio mass at T), so the comparison is rebuilt exactly from the records.

Per model:
- audio attention mass per layer: each head's audio mass at the last prompt token, averaged over the
  items with a base answer; per layer the mean over the layer's heads and its largest head; beside
  it the audio share of the prompt (audio tokens / prompt tokens), what a head attending uniformly
  would put on the audio;
- heads against the permutation null, per fold: how many of the top-k specialist heads beat the
  null's family-wise 5% threshold, and in which layers; the head set's p against the null, combined
  over the folds (Bonferroni: "in some fold");
- listening AUC within strata (correctness x task), as `validate-heads` and the experiment report it,
  with its interval, its empirical p among the matched random head sets and whether it passes;
- baseline and steered (specialist, at each fold's tuned alpha) accuracy on the held-out items, their
  paired difference with its interval and p (Tango / McNemar score test; with repeats, paired t),
  the correct option's log-prob margin change, and whether the specialist beats the random sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..records import read_json, read_jsonl

SPECIALIST, BASELINE = "specialist", "baseline"


# -- one model ---------------------------------------------------------------------------------------

def layer_mass(base_rows: Sequence[dict]) -> dict:
    """Per layer, the mean over heads and the largest head of the items' mean audio mass at T, and
    the audio share of the prompt, from the experiment's base records (error rows left out)."""
    rows = [r for r in base_rows if "error" not in r and r.get("audio_mass") is not None]
    if not rows:
        return {"n": 0, "mean": [], "max": [], "max_head": [], "audio_share": None, "overall": None}
    M = np.mean([np.asarray(r["audio_mass"], np.float64) for r in rows], axis=0)  # (layers, heads)
    share = [r["audio_tokens"] / (r["audio_tokens"] + r["text_tokens"]) for r in rows
             if r.get("audio_tokens") is not None and r.get("text_tokens") is not None]
    return {"n": len(rows), "mean": [round(float(x), 6) for x in M.mean(axis=1)],
            "max": [round(float(x), 6) for x in M.max(axis=1)], "max_head": [int(h) for h in M.argmax(axis=1)],
            "audio_share": round(float(np.mean(share)), 6) if share else None, "overall": round(float(M.mean()), 6)}


def heads_vs_null(report: dict, n_layers: int) -> dict:
    """Per fold: the top-k heads, those above the null's family-wise 5% threshold, and per layer
    how many of each there are over all folds."""
    folds, selected, beating = [], np.zeros(n_layers, int), np.zeros(n_layers, int)
    for f in report.get("folds", []):
        null = f.get("null") or {}
        thr = null.get("fwer_threshold")
        obs = [(tuple(h), r) for h, r in zip(null.get("observed_heads", []), null.get("observed_r", []))]
        beat = [list(h) for h, r in obs if thr is not None and r > thr]
        heads = [tuple(h[:2]) for h in f.get("heads", [])]
        for l, _ in heads:
            if 0 <= l < n_layers:
                selected[l] += 1
        for l, _ in beat:
            if 0 <= l < n_layers:
                beating[l] += 1
        folds.append({"repeat": f.get("repeat", 0), "fold": f.get("index"), "k": len(heads),
                      "n_beating_null": len(beat), "beating": beat, "layers": sorted({h[0] for h in beat}),
                      "p_set": null.get("p_set"), "threshold": thr})
    combined = (report.get("heads_null") or {}).get("combined") or {}
    return {"folds": folds, "selected_per_layer": selected.tolist(), "beating_per_layer": beating.tolist(),
            "p_some_fold": combined.get("some"), "p_every_fold": combined.get("every")}


def _pick(d: dict | None, *keys) -> dict | None:
    return None if not d else {k: d.get(k) for k in keys}


def summarize(folder: Path, n_layers: int) -> dict:
    """One model's comparison numbers from its experiment folder (`report.json`, `base.jsonl`)."""
    folder = Path(folder)
    report = read_json(folder / "report.json", "experiment report")
    cond = report.get("conditions", {})
    base, spec = cond.get(BASELINE, {}), cond.get(SPECIALIST, {})
    val = report.get("validation") or {}
    within, pooled = val.get("within_strata") or {}, val.get("pooled") or {}
    steering_ctl = ((report.get("controls") or {}).get("steering") or {}).get("accuracy")
    return {
        "n_items": report.get("n_items"), "n_tested": report.get("n_tested"), "n_failed_items": len(report.get("failed", [])),
        "layer_mass": layer_mass(read_jsonl(folder / "base.jsonl")),
        "specialists": heads_vs_null(report, n_layers),
        "listening": {"auc": within.get("auc"), "ci95": within.get("auc_ci95"),
                      "empirical_p": (within.get("vs_random") or {}).get("empirical_p"),
                      "n_random": (within.get("vs_random") or {}).get("n"), "passes": bool(val.get("passes")),
                      "n_changed": val.get("n_changed"), "n_unchanged": val.get("n_unchanged"),
                      "n_unparsable": val.get("n_unparsable"), "pooled_auc": pooled.get("auc"),
                      "pooled_ci95": pooled.get("auc_ci95")},
        "accuracy": {"baseline": _pick(base, "n", "accuracy", "ci95"), "steered": _pick(spec, "n", "accuracy", "ci95"),
                     "difference": _pick(spec.get("vs_baseline"), "n", "difference", "ci95", "p", "method"),
                     "margin_difference": _pick(spec.get("margin_vs_baseline"), "n", "difference", "ci95", "p"),
                     "vs_random_p": steering_ctl.get("empirical_p") if steering_ctl else None,
                     "beats_random": bool((report.get("claims") or {}).get("steering_beats_random"))},
        "alpha": [f.get("alpha", {}).get(SPECIALIST) for f in report.get("folds", [])],
        "verdict": report.get("verdict", [])[:1],
    }


# -- all models --------------------------------------------------------------------------------------

def build(out: Path, runs: Sequence[dict], meta: dict) -> dict:
    """profile.json's content: `runs` (name, model, family, layers, heads, status, error?) with each
    finished model's summary read from `out/<name>/`."""
    models = []
    for run in runs:
        row = dict(run)
        if row.get("status") == "done":
            try:
                row.update(summarize(Path(out) / row["name"], int(row["layers"])))
            except Exception as e:  # a damaged report is this model's failure, not the comparison's
                row.update(status="failed", error=f"its report could not be read ({' '.join(str(e).split())})")
        models.append(row)
    return {**meta, "models": models}


def write(out: Path, profile: dict) -> list[Path]:
    """profile.json, profile.md and profile.png under `out`; returns their paths."""
    from ..records import write_atomic, write_json

    out = Path(out)
    write_json(out / "profile.json", profile)
    write_atomic(out / "profile.md", markdown(profile))
    plot(profile, out / "profile.png")
    return [out / "profile.json", out / "profile.md", out / "profile.png"]


def _num(x, fmt=".3f", none="n/a") -> str:
    return none if x is None else format(x, fmt)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci, scale=100.0, fmt=".1f", signed=False) -> str:
    if not ci:
        return "no interval: too few items"
    f = ("+" if signed else "") + fmt
    return f"95% CI {format(scale * ci[0], f)} to {format(scale * ci[1], f)}"


def _p(p) -> str:
    return "" if p is None else f", p = {p:.3g}"


def _fold_heads(h: dict) -> str:
    parts = []
    for f in h["folds"]:
        where = f"layers {', '.join(map(str, f['layers']))}" if f["layers"] else "none"
        tag = f"fold {f['fold']}" + (f" (repeat {f['repeat']})" if f["repeat"] else "")
        parts.append(f"{tag}: {f['n_beating_null']} of {f['k']} ({where})")
    return "; ".join(parts) or "n/a"


def rows(m: dict) -> list[tuple[str, str]]:
    """The side-by-side table's rows for one model (label, cell)."""
    head = [("family", m.get("family", "")), ("decoder", f"{m.get('layers')} layers x {m.get('heads')} heads")]
    if m.get("status") != "done":
        return head + [("items tested", f"**failed**: {m.get('error', '')}")]
    lm, h, ls, acc = m["layer_mass"], m["specialists"], m["listening"], m["accuracy"]
    top = int(np.argmax(lm["mean"])) if lm["mean"] else None
    d, md = acc["difference"] or {}, acc["margin_difference"] or {}
    b, s = acc["baseline"] or {}, acc["steered"] or {}
    return head + [
        ("items tested", f"{m['n_tested']} of {m['n_items']}" + (f" ({m['n_failed_items']} failed)"
                                                                 if m["n_failed_items"] else "")),
        ("audio share of the prompt", _pct(lm["audio_share"])),
        ("audio mass per head, mean over layers", _num(lm["overall"])),
        ("layer with the most audio mass (mean over heads)",
         "n/a" if top is None else f"{top} ({lm['mean'][top]:.3f}; its largest head {lm['max'][top]:.3f})"),
        ("specialist heads beating the permutation null", _fold_heads(h)),
        ("head set vs null, p in some fold (Bonferroni)", _num(h["p_some_fold"], ".3g")),
        ("listening AUC within strata", f"{ls['auc']:.3f} ({_ci(ls['ci95'], 1.0, '.3f')})" if ls["auc"] is not None
         else f"n/a: no stratum holds both changed and unchanged items ({ls['n_changed']} changed, "
              f"{ls['n_unchanged']} unchanged, {ls['n_unparsable']} unparsable)"),
        ("listening AUC vs random head sets", "n/a" if ls["empirical_p"] is None
         else f"empirical p {ls['empirical_p']:.3g} among {ls['n_random']}"),
        ("listening validation passes", "yes" if ls["passes"] else "no"),
        ("listening AUC pooled (not a pass by itself)", _num(ls["pooled_auc"])),
        ("baseline accuracy", f"{_pct(b.get('accuracy'))} ({_ci(b.get('ci95'))})"),
        ("steered accuracy (specialist)", f"{_pct(s.get('accuracy'))} ({_ci(s.get('ci95'))})"),
        ("steered - baseline (paired)", "n/a" if d.get("difference") is None else
         f"{100 * d['difference']:+.1f} points ({_ci(d.get('ci95'), signed=True)}{_p(d.get('p'))})"),
        ("option margin change (paired)", "n/a" if md.get("difference") is None else
         f"{md['difference']:+.3f} nats ({_ci(md.get('ci95'), 1.0, '.3f', True)}{_p(md.get('p'))})"),
        ("specialist vs random head sets (accuracy)", "n/a" if acc["vs_random_p"] is None else
         f"empirical p {acc['vs_random_p']:.3g}; " + ("beats them" if acc["beats_random"] else "no claim")),
        ("alpha per fold", ", ".join(_num(a, "g") for a in m["alpha"]) or "n/a"),
    ]


def markdown(profile: dict) -> str:
    models = profile["models"]
    s = profile.get("settings", {})
    done = [m for m in models if m.get("status") == "done"]
    lines = [f"# Profile: {len(models)} models measured the same way", "",
             f"Data: `{profile.get('data')}` ({profile.get('n_items')} items; tasks {', '.join(profile.get('tasks', []))}). "
             f"Each model: `mlx-listen experiment` into `<out>/<name>/` ({s.get('folds')} folds, "
             f"{s.get('repeats')} repeat(s), k = {s.get('k')}, {s.get('random_sets')} random head sets, "
             f"alphas {', '.join(format(a, 'g') for a in s.get('alphas', []))}, tuned by {s.get('tune')}, "
             f"prompt {s.get('prompt')}). {len(done)} of {len(models)} finished.", "",
             "Heads are selected and steering is tuned on the calibration folds; every number below is on "
             "held-out items. Listening AUC: items whose chosen option changed when the audio was replaced by "
             "silence against unchanged ones, within strata of correctness x task (it passes only with its "
             "interval above 0.5 and p < 0.05 among the random head sets).", "", "![profile](profile.png)", "",
             "## Side by side", ""]
    labels = [label for label, _ in rows(done[0] if done else models[0])]
    table = {m["name"]: dict(rows(m)) for m in models}
    lines.append("| | " + " | ".join(f"**{m['name']}**" for m in models) + " |")
    lines.append("|---" * (len(models) + 1) + "|")
    for label in labels:
        cells = [table[m["name"]].get(label, "") for m in models]
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if done:
        depth = max(m["layers"] for m in done)
        lines += ["", "## Audio attention mass per layer", "",
                  "Mean over the layer's heads (largest head in brackets) of the audio mass at the last prompt "
                  "token, averaged over the items; `*` marks layers holding heads that beat the permutation null "
                  "(count over folds).", "",
                  "| layer | " + " | ".join(m["name"] for m in done) + " |", "|---" * (len(done) + 1) + "|"]
        for layer in range(depth):
            cells = []
            for m in done:
                lm, beat = m["layer_mass"], m["specialists"]["beating_per_layer"]
                if layer >= len(lm["mean"]):
                    cells.append("")
                    continue
                star = f" *{beat[layer]}" if layer < len(beat) and beat[layer] else ""
                cells.append(f"{lm['mean'][layer]:.3f} ({lm['max'][layer]:.3f}){star}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "## Each model", ""]
    for m in models:
        if m.get("status") == "done":
            lines.append(f"- **{m['name']}** (`{m['model']}`): {' '.join(m['verdict'])} Full report: "
                         f"`{m['name']}/report.md`.")
        else:
            lines.append(f"- **{m['name']}** (`{m['model']}`) failed: {str(m.get('error', '')).rstrip('.')}. Rerun "
                         "the same command to retry it; the finished models are not run again.")
    return "\n".join(lines) + "\n"


# -- the plot ----------------------------------------------------------------------------------------

def plot(profile: dict, path: Path, dpi: int | None = None):
    """One PNG, a column per model: audio mass per layer (mean over heads, largest head, the audio
    share of the prompt); specialist heads per layer (selected over the folds, and those beating the
    null); baseline and steered accuracy and the listening AUC within strata, with 95% intervals.
    Rows share their y axis, so the models compare at a glance."""
    from ..plots import _figure, _integer_ticks, _plain, _save, _title, wrap

    models = profile["models"]
    n = len(models)
    fig = _figure(max(4.0, 3.3 * n), 8.4)
    axes = fig.subplots(3, n, squeeze=False, sharey="row")
    peak = max([max(m["layer_mass"]["max"] or [0]) for m in models if m.get("status") == "done"] + [0.05])
    heads_top = max([max(m["specialists"]["selected_per_layer"] or [0]) for m in models if m.get("status") == "done"] + [1])
    for j, m in enumerate(models):
        a_mass, a_heads, a_sum = axes[0, j], axes[1, j], axes[2, j]
        name = f"{_plain(m['name'])}\n({m.get('family', '?')}, {m.get('layers', '?')}x{m.get('heads', '?')})"
        a_mass.set_title(name, fontsize=10)
        if m.get("status") != "done":
            for ax in (a_mass, a_heads, a_sum):
                ax.set_axis_off()
            a_heads.text(0.5, 0.5, wrap("failed: " + _plain(m.get("error", "")), 2.8 * 72, 9), ha="center",
                         va="center", fontsize=9, color="#b00", transform=a_heads.transAxes)
            continue
        lm, h = m["layer_mass"], m["specialists"]
        x = np.arange(len(lm["mean"]))
        a_mass.bar(x, lm["mean"], color="#4c72b0", label="mean over heads")
        a_mass.plot(x, lm["max"], "o-", color="#dd8452", ms=3, lw=1, label="largest head")
        if lm["audio_share"] is not None:
            a_mass.axhline(lm["audio_share"], ls="--", color="0.4", lw=1, label="audio share of the prompt")
        a_mass.set_ylim(0, min(1.0, 1.1 * peak))
        a_mass.set_xlabel("layer")
        _integer_ticks(a_mass.xaxis)
        a_heads.bar(x, h["selected_per_layer"], color="#c7d3e8", label="specialist (top k, all folds)")
        a_heads.bar(x, h["beating_per_layer"], color="#2a4d8f", label="beating the null (FWER 5%)")
        a_heads.set_ylim(0, heads_top + 0.5)
        a_heads.set_xlabel("layer")
        a_heads.set_title(f"beating the null: {sum(h['beating_per_layer'])} of {sum(h['selected_per_layer'])} "
                          f"({len(h['folds'])} folds)", fontsize=9)
        _integer_ticks(a_heads.xaxis)
        _integer_ticks(a_heads.yaxis)
        acc, ls = m["accuracy"], m["listening"]
        points = [("baseline\naccuracy", (acc["baseline"] or {}).get("accuracy"), (acc["baseline"] or {}).get("ci95"),
                   "#555"),
                  ("steered\naccuracy", (acc["steered"] or {}).get("accuracy"), (acc["steered"] or {}).get("ci95"),
                   "#4c72b0"),
                  ("listening AUC\nwithin strata", ls["auc"], ls["ci95"], "#55a868" if ls["passes"] else "#c44e52")]
        for i, (_, v, ci, color) in enumerate(points):
            if v is None:
                a_sum.text(i, 0.12, "n/a", ha="center", va="center", fontsize=9, color="0.4")
                continue
            err = None if not ci else [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]
            a_sum.errorbar([i], [v], yerr=err, fmt="o", color=color, capsize=4, ms=6)
            a_sum.annotate(f"{v:.2f}" + ("" if ci else " (no CI)"), (i, v), xytext=(7, 0), textcoords="offset points",
                           fontsize=7, va="center", color=color)
        a_sum.axhline(0.5, ls=":", color="0.5", lw=1, label="AUC 0.5 (chance)")
        a_sum.set_xticks(range(3), [p[0] for p in points], fontsize=8)
        a_sum.set_xlim(-0.6, 2.6)
        a_sum.set_ylim(-0.04, 1.04)
        d = acc["difference"] or {}
        gain = "n/a" if d.get("difference") is None else f"{100 * d['difference']:+.1f} pts"
        ci = d.get("ci95")
        a_sum.set_title(f"steered - baseline: {gain}\n" + (f"paired 95% CI [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
                                                            if ci else "no interval: too few items"), fontsize=9)
    done = [j for j, m in enumerate(models) if m.get("status") == "done"]
    if done:
        axes[0, done[0]].set_ylabel("audio attention mass at T")
        axes[1, done[0]].set_ylabel("heads per layer")
        axes[2, done[0]].set_ylabel("accuracy / AUC (95% CI)")
        for r in (0, 1, 2):  # beside the last column, outside the panels
            axes[r, -1].legend(*axes[r, done[-1]].get_legend_handles_labels(), fontsize=7, loc="upper left",
                               bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    _title(fig, f"How much each model listens: {profile.get('n_items')} items, held-out folds "
                "(green AUC: the listening validation passes; red: it does not)")
    return _save(fig, path, dpi)
