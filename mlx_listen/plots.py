"""PNG plots (matplotlib, headless): head heatmaps, listening-score groups, accuracy curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(values: np.ndarray, path: Path, title: str, label: str, marked: Sequence[tuple[int, int]] = (),
            cmap: str = "viridis", center: bool = False):
    """A layers x heads matrix (layer 0 at the bottom); `marked` heads get a white box."""
    plt = _plt()
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.22 * H + 2), max(3, 0.18 * L + 1.5)))
    lim = np.abs(values).max() or 1.0
    im = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap,
                   vmin=-lim if center else None, vmax=lim if center else None)
    for l, h in marked:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_heatmap(scores: np.ndarray, heads, path: Path):
    heatmap(scores, path, f"Head score: Pearson r(audio mass, correct); top {len(heads)} boxed", "r",
            marked=heads, cmap="RdBu_r", center=True)


def listening_plot(groups: dict[str, tuple[np.ndarray, np.ndarray]], labels: tuple[str, str], path: Path):
    """Side-by-side distributions of the listening score for two item groups, per head set."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (name, (a, b)) in zip(axes[0], groups.items()):
        parts = [np.asarray(a, float), np.asarray(b, float)]
        ax.boxplot([p if p.size else [np.nan] for p in parts], showmeans=True)
        for i, p in enumerate(parts, 1):
            ax.scatter(np.full(p.size, i) + np.random.default_rng(i).uniform(-0.12, 0.12, p.size), p, s=8, alpha=0.5)
        ax.set_xticks([1, 2], [f"{labels[0]} (n={parts[0].size})", f"{labels[1]} (n={parts[1].size})"])
        ax.set_title(name)
        ax.set_ylabel("listening score L(x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_plot(x: Sequence[float], series: dict[str, Sequence[float]], path: Path, xlabel: str, ylabel: str,
               title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
