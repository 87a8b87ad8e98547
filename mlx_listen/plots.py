"""PNG plots (matplotlib, headless): head heatmaps, listening-score groups, curves, histograms, ROC, rank and
per-token plots.

Every function writes one PNG and returns its `matplotlib.figure.Figure` (already saved; keep it only to inspect
it). They use matplotlib's object API (`Figure`, no pyplot): no global figure state, no backend switch in the
caller's process, nothing to close. Layout rules, the same for all: titles are wrapped to the figure's width,
constrained layout keeps every label inside the figure and `savefig(bbox_inches="tight")` trims the margin, layer /
head / rank / token axes get integer ticks, and panels meant to be compared share their y axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

DPI = 120  # default resolution of every PNG; each function also takes dpi=


def _figure(width: float, height: float, **kw):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", **kw)


def _text_width_pt(text: str, size: float) -> float:
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    return TextToPath().get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0]


def wrap(text: str, width_pt: float, size: float = 10.0) -> str:
    """Greedy word wrap of `text` so no line is wider than `width_pt` points at font size `size`."""
    lines = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if line and _text_width_pt(cand, size) > width_pt:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return "\n".join(lines)


def _title(fig, title: str | None, size: float = 11.0):
    if title:
        fig.suptitle(wrap(title, 0.94 * fig.get_figwidth() * 72, size), fontsize=size)


def _plain(s) -> str:
    """A user string shown as-is: no mathtext (`$`), visible edge spaces and control characters."""
    s = str(s).replace("\\", "\\\\").replace("$", r"\$").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")
    if not s:
        return "∅"
    stripped = s.strip(" ")
    if stripped != s:
        lead, trail = len(s) - len(s.lstrip(" ")), len(s) - len(s.rstrip(" "))
        s = "␣" * lead + stripped + "␣" * trail
    return s


def _integer_ticks(axis, max_ticks: int = 10):
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=max_ticks, integer=True, min_n_ticks=1))


def _label_ticks(axis, labels: Sequence, max_labels: int):
    """Tick every position with its label, or every k-th one when there are more than `max_labels`."""
    n = len(labels)
    step = max(1, math.ceil(n / max_labels))
    pos = list(range(0, n, step))
    axis.set_ticks(pos, [_plain(labels[i]) for i in pos])
    return step


def _save(fig, path, dpi: int | None):
    fig.savefig(Path(path), dpi=dpi or DPI, bbox_inches="tight", pad_inches=0.06)
    return fig


def heatmap(values: np.ndarray, path: Path, title: str, label: str, marked: Sequence[tuple[int, int]] = (),
            cmap: str | None = None, center: bool = False, *, xlabel: str = "head", ylabel: str = "layer",
            xticklabels: Sequence | None = None, yticklabels: Sequence | None = None, annotate: bool = False,
            fmt: str = "{:.2f}", dpi: int | None = None):
    """Any (rows x columns) matrix as a colour grid, row 0 at the bottom: layer x head by default.

    values: 2-D array; NaN cells are drawn light grey.
    title, label: figure title (wrapped to fit) and colour-bar label.
    marked: (row, column) cells to outline (e.g. the selected heads), black with a white halo (visible on any colour).
    cmap: matplotlib colormap name; default "RdBu_r" when `center`, else "viridis".
    center: diverging scale centred at 0 (limits +-max|value|), for signed values (correlations, patching effects).
    xlabel, ylabel: axis titles ("head", "layer").
    xticklabels, yticklabels: one label per column / row (e.g. position groups "audio", "question", "last");
        shown all, or thinned to at most 40. Without them both axes get integer ticks.
    annotate: write each value in its cell (with `fmt`), for small matrices such as layer x position-group.
    """
    from matplotlib import colormaps, patheffects
    from matplotlib.patches import Rectangle

    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {values.shape}")
    R, C = values.shape
    col_chars = max((len(str(t)) for t in xticklabels), default=0) if xticklabels is not None else 0
    width = min(max(4.8, (0.26 + 0.02 * max(col_chars - 3, 0)) * C + 2.8), 14.0)
    height = min(max(3.4, 0.2 * R + 2.0), 11.0)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    cm = colormaps[cmap or ("RdBu_r" if center else "viridis")].with_extremes(bad="0.85")
    if center:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        lim = lim or 1.0
        vmin, vmax = -lim, lim
    else:
        vmin = vmax = None
    im = ax.imshow(values, origin="lower", aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    halo = [patheffects.withStroke(linewidth=3.2, foreground="white")]
    for r, c in marked:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.4, path_effects=halo))
    if annotate:
        norm = im.norm
        for r in range(R):
            for c in range(C):
                v = values[r, c]
                if np.isfinite(v):
                    dark = cm(norm(v))[:3]
                    lum = 0.299 * dark[0] + 0.587 * dark[1] + 0.114 * dark[2]
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="black" if lum > 0.5 else "white")
    if xticklabels is not None:
        if len(xticklabels) != C:
            raise ValueError(f"{len(xticklabels)} x tick labels for {C} columns")
        _label_ticks(ax.xaxis, xticklabels, 40)
        if col_chars > 3:
            ax.tick_params(axis="x", labelrotation=30)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")
                t.set_rotation_mode("anchor")
    else:
        _integer_ticks(ax.xaxis)
    if yticklabels is not None:
        if len(yticklabels) != R:
            raise ValueError(f"{len(yticklabels)} y tick labels for {R} rows")
        _label_ticks(ax.yaxis, yticklabels, 40)
    else:
        _integer_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(fig, title)
    fig.colorbar(im, ax=ax, label=label, shrink=0.95)
    return _save(fig, path, dpi)


def score_heatmap(scores: np.ndarray, heads, path: Path, dpi: int | None = None,
                  score: str = "Pearson r(audio mass, correct)"):
    """The layers x heads head-score matrix (diverging at 0) with the selected heads outlined; `score`
    names what the cells are (the head set's own description of its score)."""
    return heatmap(scores, path, f"Head score: {score}; top {len(heads)} boxed", "r",
                   marked=heads, cmap="RdBu_r", center=True, dpi=dpi)


def listening_plot(groups: dict[str, tuple[np.ndarray, np.ndarray]], labels: tuple[str, str], path: Path,
                   title: str | None = None, ylabel: str = "listening score L(x)", dpi: int | None = None):
    """Side-by-side distributions (box + points) of a score for two item groups, one panel per head set.

    groups: {panel name: (scores of group 1, scores of group 2)}, e.g. {"selected heads": ..., "random heads
        (control)": ...}. The panels share one y axis, so a control's spread reads against the heads' directly.
    labels: the two groups' names (wrapped under the boxes, with their n).
    """
    n_panels = max(len(groups), 1)
    panel_w = 3.0 + 0.1 * max(len(labels[0]), len(labels[1]), 12)
    fig = _figure(panel_w * n_panels + 0.6, 3.8)
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)[0]
    label_w = 0.42 * panel_w * 72  # each box gets about half a panel
    for i, (ax, (name, (a, b))) in enumerate(zip(axes, groups.items())):
        parts = [np.asarray(a, float).ravel(), np.asarray(b, float).ravel()]
        ax.boxplot([p[np.isfinite(p)] if np.isfinite(p).any() else [np.nan] for p in parts], showmeans=True,
                   widths=0.5)
        for j, p in enumerate(parts, 1):
            jitter = np.random.default_rng(j).uniform(-0.12, 0.12, p.size)
            ax.scatter(np.full(p.size, j) + jitter, p, s=8, alpha=0.5)
        ax.set_xticks([1, 2], [f"{wrap(_plain(lab), label_w, 9)}\n(n={p.size})" for lab, p in zip(labels, parts)],
                      fontsize=9)
        ax.set_title(wrap(name, 0.95 * panel_w * 72, 10), fontsize=10)
        if i == 0:
            ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    _title(fig, title)
    return _save(fig, path, dpi)


def _legend(fig, ax, n: int):
    if n > 4:  # many series: under the axes, never over the data (nor beside it, where it would meet the title)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(n, 3), fontsize=8)
    elif n:
        ax.legend(fontsize=8)


def curve_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: Path, xlabel: str, ylabel: str,
               title: str, bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
               dpi: int | None = None):
    """Lines of y against a shared x, one per series, with optional shaded bands (e.g. 95% CIs).

    x: the x values (integers, e.g. layers, get integer ticks).
    series: {name: y values, one per x}.
    bands: {name: (low, high)}, for any of the series' names: shaded between low and high in the series' colour.
    More than four series put the legend under the axes.
    """
    x = np.asarray(list(x), dtype=float)
    fig = _figure(6.4 if len(series) > 4 else 5.6, 3.8 + 0.18 * math.ceil(len(series) / 3) * (len(series) > 4))
    ax = fig.add_subplot()
    bands = dict(bands or {})
    unknown = set(bands) - set(series)
    if unknown:
        raise ValueError(f"bands for unknown series: {sorted(unknown)}")
    for name, ys in series.items():
        ys = np.asarray(list(ys), dtype=float)
        if ys.shape != x.shape:
            raise ValueError(f"series {name!r} has {ys.size} values for {x.size} x values")
        (line,) = ax.plot(x, ys, marker="o" if x.size <= 30 else None, ms=4, label=_plain(name))
        if name in bands:
            lo, hi = (np.asarray(list(v), dtype=float) for v in bands[name])
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    if x.size and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
        _integer_ticks(ax.xaxis)
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5)  # no tick for a layer past the last one
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(series))
    _title(fig, title)
    return _save(fig, path, dpi)


def hist_plot(values: Sequence[float], path: Path, xlabel: str, title: str, marker: float | None = None,
              marker_label: str | None = None, bins="auto", dpi: int | None = None):
    """A histogram of `values` (e.g. the gains of random head sets) with one value marked by a vertical line.

    marker: the value to mark (e.g. the specialist heads' gain); the x range always includes it.
    marker_label: its legend entry (default: the value itself).
    """
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    fig = _figure(5.6, 3.8)
    ax = fig.add_subplot()
    ax.hist(v if v.size else [np.nan], bins=bins if v.size > 1 else 1, color="0.6", edgecolor="white",
            label=f"{v.size} values")
    if marker is not None:
        ax.axvline(marker, color="tab:red", lw=2, label=_plain(marker_label or f"{marker:.3g}"))
        lo, hi = ax.get_xlim()
        pad = 0.08 * max(hi - lo, abs(marker) * 0.1, 1e-12)
        ax.set_xlim(min(lo, marker - pad), max(hi, marker + pad))
    _integer_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, title)
    return _save(fig, path, dpi)


def roc_points(pos: Sequence[float], neg: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve (false- and true-positive rates, from (0, 0) to (1, 1)) of `pos` vs `neg` scores, and its AUC.

    Tied scores move the curve diagonally, so the AUC equals the Mann-Whitney U / (n_pos n_neg) with ties
    counted half (heads.auc). Empty groups give NaN.
    """
    pos, neg = np.asarray(pos, float).ravel(), np.asarray(neg, float).ravel()
    if not pos.size or not neg.size:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = np.concatenate([[0.0], [(pos >= t).mean() for t in thresholds]])
    fpr = np.concatenate([[0.0], [(neg >= t).mean() for t in thresholds]])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc


def roc_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str,
             dpi: int | None = None):
    """ROC curves, one per score: {name: (scores of the positive items, scores of the negative items)}.

    The legend gives each curve's AUC and group sizes; the diagonal is chance.
    """
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance (AUC 0.5)")
    for name, (pos, neg) in curves.items():
        fpr, tpr, auc = roc_points(pos, neg)
        ax.plot(fpr, tpr, lw=1.8, drawstyle="default",
                label=f"{_plain(name)} (AUC {auc:.3f}; n={np.size(pos)}/{np.size(neg)})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _title(fig, title)
    return _save(fig, path, dpi)


def rank_plot(observed_sorted: Sequence[float], null_quantiles: Mapping[str, Sequence[float]], path: Path,
              title: str, ylabel: str = "head score", dpi: int | None = None):
    """The top-K observed scores by rank (1 = best) against a permutation null's quantiles at each rank.

    observed_sorted: the K largest observed head scores, in descending order.
    null_quantiles: {label: K values}, e.g. {"null median": ..., "null 95%": ...}: at rank k, that quantile of the
        k-th largest score over the permutations. An observed point above the 95% line at rank k means k heads
        beat the null at that level.
    """
    obs = np.asarray(list(observed_sorted), dtype=float)
    ranks = np.arange(1, obs.size + 1)
    fig = _figure(5.8, 3.8)
    ax = fig.add_subplot()
    greys = np.linspace(0.25, 0.65, max(len(null_quantiles), 1))
    styles = ["--", "-.", ":", (0, (5, 1, 1, 1))]
    for i, (label, q) in enumerate(null_quantiles.items()):
        q = np.asarray(list(q), dtype=float)
        if q.shape != obs.shape:
            raise ValueError(f"null quantile {label!r} has {q.size} values for {obs.size} ranks")
        ax.plot(ranks, q, ls=styles[i % len(styles)], color=str(greys[i]), lw=1.4, label=_plain(label))
    ax.plot(ranks, obs, color="tab:red", marker="o" if obs.size <= 40 else None, ms=4, lw=1.8,
            label=f"observed (top {obs.size})")
    if obs.size <= 20:
        ax.set_xticks(ranks)
    else:
        _integer_ticks(ax.xaxis)
    ax.set_xlim(0.5, obs.size + 0.5)
    ax.set_xlabel("rank")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, title)
    return _save(fig, path, dpi)


def token_plot(values: Sequence[float], tokens: Sequence[str], path: Path, title: str, ylabel: str,
               max_labels: int = 60, dpi: int | None = None):
    """A value per generated token (e.g. the listening score over an answer), tokens as x tick labels.

    tokens: the decoded token strings, one per value; shown as-is (`$` literal, spaces at the edges as "␣",
        newlines as "⏎"). With more than `max_labels` tokens only every k-th is labelled.
    """
    v = np.asarray(list(values), dtype=float)
    if len(tokens) != v.size:
        raise ValueError(f"{len(tokens)} tokens for {v.size} values")
    shown = min(v.size, max_labels)
    fig = _figure(min(max(6.0, 0.17 * shown + 2.2), 18.0), 4.0)
    ax = fig.add_subplot()
    x = np.arange(v.size)
    ax.plot(x, v, marker="o" if v.size <= 120 else None, ms=3, lw=1.4, color="tab:blue")
    if v.size:
        _label_ticks(ax.xaxis, list(tokens), max_labels)
        ax.tick_params(axis="x", labelrotation=90, labelsize=8)
        ax.set_xlim(-0.5, v.size - 0.5)
    ax.set_xlabel("generated token" + (f" (1 in {math.ceil(v.size / max_labels)} labelled)"
                                       if v.size > max_labels else ""))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _title(fig, title)
    return _save(fig, path, dpi)
