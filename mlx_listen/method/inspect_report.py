"""What `mlx-listen steer inspect` prints and writes: the terminal summary, inspect.json,
inspect.txt and the PNGs (per-layer contrast, consistency, task cosines)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..interp.lens import LENSES
from ..plots import DPI, curve_plot, heatmap
from ..records import write_atomic, write_json


def _shown(row: dict) -> str:
    """The decoded token, or its raw piece where decoding one token alone gives a partial character."""
    return repr(row["piece"] if "\ufffd" in row["token"] else row["token"])


def _fmt_tokens(rows: list[dict], n: int) -> str:
    return ", ".join(f"{_shown(r)} {r['value']:+.3g}" for r in rows[:n])


def _g(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def inspect_lines(res: dict, n_tokens: int = 10) -> list[str]:
    """The terminal summary of `inspect_direction`."""
    src, lines = res["source"], []
    if src["kind"] == "heads":
        lines.append(f"direction: per input (audio - silence), mean over L* = {src['layers']}")
    else:
        lines.append(f"direction: fixed vector{' ' + src['path'] if src.get('path') else ''} (applied after block "
                     f"{src['apply_layer']}; L* = {src['layers'] if src['layers'] else 'unknown'})")
    data = res.get("data")
    if data:
        by = ", ".join(f"{t} {n}" for t, n in data["by_task"].items())
        lines.append(f"items: {data['used']} used ({by})" + (f", {len(data['failed'])} failed (e.g. "
                     f"{data['failed'][0]['id']}: {data['failed'][0]['error']})" if data["failed"] else ""))
    dr = res["direction"]
    parts = []
    if "vector_norm" in dr:
        parts.append(f"|v| = {dr['vector_norm']:.4g}")
    if "item_norm_mean" in dr:
        parts.append(f"|d(x)| = {_g(dr['item_norm_mean'], '{:.4g}')} ± {_g(dr['item_norm_sd'])}, "
                     f"|mean d| = {dr['mean_direction_norm']:.4g}")
    if dr.get("applied_relative_norm_mean") is not None:
        parts.append(f"|d|/|h_final[T]| = {dr['applied_relative_norm_mean']:.3g}, |h_final[T]| = {dr['final_norm_mean']:.4g}")
    if "vector_cos_mean_direction" in dr:
        parts.append(f"cos(v, mean d) = {_g(dr['vector_cos_mean_direction'])}")
    if parts:
        lines.append("; ".join(parts))
    has_exact = any("exact" in e for e in res["lens"].values())
    lines.append(f"logit lens, top {n_tokens} promoted (+) and demoted (-)"
                 + (f"; 'exact' at alpha {src['alpha']:g}:" if has_exact else " (state-free; --data adds the "
                    "lenses at the model's states):"))
    for g, entry in res["lens"].items():
        tag = f"{g}, n={entry['n']}" if entry["n"] else g
        for kind in LENSES:
            if kind in entry:
                lines.append(f"  [{tag}] {kind:8s} + {_fmt_tokens(entry[kind]['promoted'], n_tokens)}")
                lines.append(f"  [{tag}] {kind:8s} - {_fmt_tokens(entry[kind]['demoted'], n_tokens)}")
        for kind, a in entry.get("agreement_with_direct", {}).items():
            lines.append(f"  [{g}] {kind} vs direct: centered cosine {_g(a['centered_cosine'])}, "
                         f"{a['promoted_overlap']}/{res['top_k']} promoted in common")
    pl = res.get("per_layer")
    if pl:
        lines.append("per layer, |h_l(audio)[T] - h_l(silence)[T]| (* = L*):")
        lines.append("  layer   norm mean      sd   relative  consistency  cos(d)")
        cos_d = pl.get("cos_direction_mean") or [None] * len(pl["layers"])
        for l in pl["layers"]:
            lines.append(f"  {'*' if l in pl['marked'] else ' '}{l:>4d}  {_g(pl['norm_mean'][l], '{:10.4g}')}  "
                         f"{_g(pl['norm_sd'][l], '{:7.3g}')}  {_g(pl['relative_norm_mean'][l], '{:8.3g}')}  "
                         f"{_g(pl['consistency'][l], '{:11.3f}')}  {_g(cos_d[l], '{:6.3f}')}")
    tk = res.get("tasks")
    if tk:
        names = tk["tasks"]
        lines.append("task cosines (mean directions | per-item mean pairwise, diagonal = within):")
        lines.append("  " + " " * 8 + "".join(f"{t:>9s}" for t in names) + "  |" + "".join(f"{t:>9s}" for t in names))
        item = tk.get("item_cosine") or []
        for i, t in enumerate(names):
            row = item[i] if i < len(item) else [None] * len(names)  # every direction zero: no item cosine
            lines.append(f"  {t:8s}" + "".join(_g(x, "{:9.3f}") for x in tk["mean_direction_cosine"][i]) + "  |"
                         + "".join(_g(x, "{:9.3f}") if x is not None else f"{'-':>9s}" for x in row))
        lines.append(f"  per-item cosine: across tasks {_g(tk['item_cosine_across'])}, all pairs {_g(tk['item_cosine_all'])}")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return lines


def write_outputs(res: dict, out: Path):
    """inspect.json, inspect.txt and the PNGs into `out` (the text is formed first: a failure there
    leaves no PNG behind)."""
    text = "\n".join(inspect_lines(res)) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    files = ["inspect.json", "inspect.txt"]
    pl = res.get("per_layer")
    if pl:
        plot_layers(res, out / "layers.png")
        plot_consistency(res, out / "consistency.png")
        files += ["layers.png", "consistency.png"]
    tk = res.get("tasks")
    if tk and len(tk["tasks"]) > 1:
        plot_tasks(res, out / "tasks.png")
        files.append("tasks.png")
    res["files"] = files
    write_json(out / "inspect.json", res)
    write_atomic(out / "inspect.txt", text)


def _mark_layers(fig, path: Path, marked: Sequence[int]):
    """Shade L* on a saved curve plot and save it again."""
    if not marked:
        return fig
    ax = fig.axes[0]
    for l in marked:
        ax.axvspan(l - 0.35, l + 0.35, color="0.5", alpha=0.12, lw=0, zorder=0)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.06)
    return fig


def _layer_title(res, what: str) -> str:
    src = res["source"]
    return f"{what}; L* = {src['layers']} shaded" if src.get("layers") else what


def plot_layers(res: dict, path: Path):
    pl = res["per_layer"]
    series = {"all items": pl["norm_mean"]}
    for t, s in pl["by_task"].items():
        series[t] = s["norm_mean"]
    mean = np.array([np.nan if x is None else x for x in pl["norm_mean"]])
    sd = np.array([0.0 if x is None else x for x in pl["norm_sd"]])
    series = {k: [np.nan if x is None else x for x in v] for k, v in series.items()}
    fig = curve_plot(pl["layers"], series, path, "decoder layer", "|h_l(audio)[T] - h_l(silence)[T]|",
                     _layer_title(res, f"Audio-silence contrast per layer (mean over {pl['n']} items, band ±1 sd)"),
                     bands={"all items": (mean - sd, mean + sd)})
    return _mark_layers(fig, path, pl["marked"])


def plot_consistency(res: dict, path: Path):
    pl = res["per_layer"]
    series = {"relative norm |Δ_l| / |h_l(audio)|": pl["relative_norm_mean"],
              "mean pairwise cosine of Δ_l (all items)": pl["consistency"]}
    if pl.get("cos_direction_mean"):
        series["cosine of Δ_l with d"] = pl["cos_direction_mean"]
    series = {k: [np.nan if x is None else x for x in v] for k, v in series.items()}
    fig = curve_plot(pl["layers"], series, path, "decoder layer", "value",
                     _layer_title(res, "Where the audio-silence contrast is large and consistent"))
    return _mark_layers(fig, path, pl["marked"])


def plot_tasks(res: dict, path: Path):
    tk = res["tasks"]
    m = np.array([[np.nan if x is None else x for x in row] for row in tk["item_cosine"]])
    names = tk["tasks"]
    return heatmap(m, path, "Mean pairwise cosine of per-item directions d(x) (diagonal: within a task)", "cosine",
                   center=True, xlabel="task", ylabel="task", xticklabels=names, yticklabels=names, annotate=True)
