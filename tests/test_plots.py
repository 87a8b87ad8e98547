"""Every PNG the tools write, at 2, 4 and 32 layers (8 and 32 heads): valid files, integer layer/head/rank ticks,
nothing outside the saved figure (titles included), no overlapping labels, shared y for paired panels."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from mlx_listen import plots as P

DPI = 40  # small: the layout is in inches and points, the same at any dpi
SIZES = [(2, 8), (4, 8), (32, 32)]
LONG = ("A deliberately long title that names the model, the data split, the prompt and the head set, "
        "so that it must wrap on a small figure")


def rng(seed=0):
    return np.random.default_rng(seed)


def render(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def check_png(path, fig):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    r = render(fig)
    # Nothing drawn outside the figure: bbox_inches="tight" would rescue it in the file, but the layout must
    # already fit (a label past the edge in the figure means a squeezed or clipped plot elsewhere).
    tight, box = fig.get_tightbbox(r), fig.bbox_inches
    tol = 0.02  # inches
    assert tight.x0 >= box.x0 - tol and tight.y0 >= box.y0 - tol, (tight, box)
    assert tight.x1 <= box.x1 + tol and tight.y1 <= box.y1 + tol, (tight, box)
    title = fig._suptitle
    if title is not None and title.get_text():
        t = title.get_window_extent(r)
        assert fig.bbox.x0 <= t.x0 and t.x1 <= fig.bbox.x1 and t.y1 <= fig.bbox.y1  # the title is in the image
        for ax in fig.axes:  # and clear of the axes and legends
            assert not t.overlaps(ax.get_window_extent(r)), title.get_text()
        for leg in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
            assert not t.overlaps(leg.get_window_extent(r))
    for ax in fig.axes:  # tick labels of one axis never overlap
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [t.get_window_extent(r) for t in labels if t.get_visible() and t.get_text()]
            for a, b in zip(shown, shown[1:]):
                assert not a.overlaps(b), [t.get_text() for t in labels]
    return r


def visible_ticks(axis):
    lo, hi = sorted(axis.get_view_interval())
    return [v for v in axis.get_majorticklocs() if lo - 1e-9 <= v <= hi + 1e-9]


def assert_integer_ticks(axis, n=None):
    ticks = visible_ticks(axis)
    assert ticks and all(float(v).is_integer() for v in ticks), ticks
    if n is not None:
        assert all(0 <= v < n for v in ticks), ticks
    labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
    assert all(lab.lstrip("−-").isdigit() for lab in labels), labels


@pytest.mark.parametrize("L,H", SIZES)
def test_heatmaps(tmp_path, L, H):
    scores = rng(L).uniform(-0.4, 0.4, (L, H))
    fig = P.score_heatmap(scores, [(0, 1), (L - 1, H - 1)], tmp_path / "scores.png", dpi=DPI)
    check_png(tmp_path / "scores.png", fig)
    ax = fig.axes[0]
    assert_integer_ticks(ax.yaxis, L)
    assert_integer_ticks(ax.xaxis, H)
    if L == 2:
        assert visible_ticks(ax.yaxis) == [0, 1]
    assert len(ax.patches) == 2  # the boxed heads
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi == -np.abs(scores).max()  # diverging, centred at 0

    mass = rng(1).uniform(0, 0.2, (L, H))
    fig = P.heatmap(mass, tmp_path / "mass.png", "Audio attention mass at the last prompt token (62 audio tokens)",
                    "attention mass on audio", marked=[(0, 0)], dpi=DPI)
    check_png(tmp_path / "mass.png", fig)
    assert_integer_ticks(fig.axes[0].yaxis, L)


@pytest.mark.parametrize("L", [2, 4, 32])
def test_heatmap_position_groups(tmp_path, L):
    values = rng(L).normal(0, 0.1, (L, 3))
    values[0, 0] = np.nan  # not measured: drawn grey, not an error
    groups = ["audio", "question", "last token"]
    fig = P.heatmap(values, tmp_path / "patch.png", LONG, "recovered fraction", center=True,
                    xlabel="position group", xticklabels=groups, annotate=L <= 4, dpi=DPI)
    check_png(tmp_path / "patch.png", fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == groups
    assert_integer_ticks(ax.yaxis, L)
    assert "\n" in fig._suptitle.get_text()  # wrapped, not clipped
    assert ax.images[0].get_cmap().name.startswith("RdBu_r")
    assert len(ax.texts) == (3 * L - 1 if L <= 4 else 0)
    with pytest.raises(ValueError, match="tick labels"):
        P.heatmap(values, tmp_path / "x.png", "t", "v", xticklabels=groups[:2], dpi=DPI)


@pytest.mark.parametrize("labels", [("correct", "wrong"), ("audio changed answer", "unchanged")])
def test_listening_plot_panels_share_y(tmp_path, labels):
    r = rng(2)
    groups = {"selected heads": (r.normal(0.3, 0.1, 40), r.normal(0.2, 0.1, 20)),
              "random heads (control)": (r.normal(0.05, 0.02, 40), r.normal(0.04, 0.02, 0))}  # an empty group
    fig = P.listening_plot(groups, labels, tmp_path / "validation.png", dpi=DPI)
    check_png(tmp_path / "validation.png", fig)  # includes: the x labels don't overlap
    a, b = fig.axes
    assert a.get_ylim() == b.get_ylim()
    assert "(n=0)" in b.get_xticklabels()[1].get_text()


@pytest.mark.parametrize("L", [2, 4, 32])
def test_curve_plot_layers(tmp_path, L):
    r = rng(L)
    series = {"steered": r.uniform(0.4, 0.7, L), "random heads": r.uniform(0.4, 0.7, L)}
    bands = {"steered": (series["steered"] - 0.05, series["steered"] + 0.05)}
    fig = P.curve_plot(range(L), series, tmp_path / "curve.png", "layer", "accuracy", LONG, bands=bands, dpi=DPI)
    check_png(tmp_path / "curve.png", fig)
    ax = fig.axes[0]
    assert_integer_ticks(ax.xaxis, L)
    assert len(ax.collections) == 1  # one band
    with pytest.raises(ValueError, match="unknown series"):
        P.curve_plot([0, 1], {"a": [1, 2]}, tmp_path / "x.png", "x", "y", "t", bands={"b": ([0, 0], [1, 1])})


def test_curve_plot_sweep_legend(tmp_path):
    # the sweep's plot: 7 series over fractional alphas; the legend goes under the axes, clear of the title
    r = rng(3)
    alphas = [0, 0.5, 1, 2, 4, 8]
    series = {f"heads: {t}": r.uniform(0.4, 0.7, 6) for t in ("overall", "sound", "music", "speech")}
    series.update({f"random heads #{i}: overall": r.uniform(0.4, 0.7, 6) for i in range(3)})
    fig = P.curve_plot(alphas, series, tmp_path / "sweep.png", "alpha", "accuracy (calibration split)",
                       "Accuracy vs steering strength; chosen alpha = 2", dpi=DPI)
    r_ = check_png(tmp_path / "sweep.png", fig)
    (leg,) = fig.legends
    assert leg.get_window_extent(r_).y1 <= fig.axes[0].get_window_extent(r_).y0


def test_hist_plot(tmp_path):
    values = rng(4).normal(0, 0.01, 200)
    fig = P.hist_plot(values, tmp_path / "hist.png", "accuracy gain of a random head set", LONG, marker=0.05,
                      marker_label="specialist heads: +0.050", dpi=DPI)
    check_png(tmp_path / "hist.png", fig)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo < 0.05 < hi  # the marked value is in view even far out in the tail
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["200 values", "specialist heads: +0.050"]
    check_png(tmp_path / "h1.png", P.hist_plot([1.0], tmp_path / "h1.png", "x", "one value", dpi=DPI))


def mann_whitney_auc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_roc_plot(tmp_path):
    r = rng(5)
    pos, neg = np.round(r.normal(1, 1, 60), 1), np.round(r.normal(0, 1, 40), 1)  # rounded: ties
    fpr, tpr, auc = P.roc_points(pos, neg)
    assert auc == pytest.approx(mann_whitney_auc(pos, neg), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(fpr) >= 0)
    assert np.isnan(P.roc_points([], neg)[2])
    fig = P.roc_plot({"selected heads": (pos, neg), "random heads": (r.normal(0, 1, 60), neg)},
                     tmp_path / "roc.png", "Does L(x) separate items where the audio changed the answer?", dpi=DPI)
    check_png(tmp_path / "roc.png", fig)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[1] == f"selected heads (AUC {auc:.3f}; n=60/40)"


@pytest.mark.parametrize("K", [5, 20, 64])
def test_rank_plot(tmp_path, K):
    r = rng(K)
    obs = np.sort(r.uniform(0.1, 0.5, K))[::-1]
    null = {"null median": np.linspace(0.2, 0.05, K), "null 95%": np.linspace(0.3, 0.1, K)}
    fig = P.rank_plot(obs, null, tmp_path / "rank.png", f"Top-{K} head scores vs a 1000-permutation null", dpi=DPI)
    check_png(tmp_path / "rank.png", fig)
    ticks = visible_ticks(fig.axes[0].xaxis)
    assert all(float(v).is_integer() and 1 <= v <= K for v in ticks)
    if K <= 20:
        assert ticks == list(range(1, K + 1))
    with pytest.raises(ValueError, match="ranks"):
        P.rank_plot(obs, {"bad": obs[:-1]}, tmp_path / "x.png", "t")


@pytest.mark.parametrize("n", [1, 12, 300])
def test_token_plot(tmp_path, n):
    base = ["<answer>", "The", " sound", " is", " a", " dog", " barking", ".", "</answer>", "\n", " $5 $6", ""]
    tokens = (base * (n // len(base) + 1))[:n]
    fig = P.token_plot(rng(n).uniform(0, 1, n), tokens, tmp_path / "tokens.png", LONG, "listening score L(x)",
                       dpi=DPI)
    check_png(tmp_path / "tokens.png", fig)  # includes: the token labels don't overlap
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) <= 60 and labels[0] == "<answer>"
    if n == 12:
        assert labels[2] == "␣sound" and labels[9] == "⏎" and labels[10] == r"␣\$5 \$6" and labels[11] == "∅"
    with pytest.raises(ValueError, match="tokens"):
        P.token_plot([1, 2], ["a"], tmp_path / "x.png", "t", "y")


def test_wrap():
    text = P.wrap(LONG, 200, 10)
    assert "\n" in text and text.replace("\n", " ") == LONG
    assert P.wrap("short", 200, 10) == "short"


@pytest.mark.slow
def test_no_pyplot_no_backend_switch(tmp_path):
    code = ("import sys, numpy as np, matplotlib\n"
            "matplotlib.use('svg')\n"  # the caller's backend (a notebook's, say) must stay as it is
            "from mlx_listen import plots\n"
            f"plots.heatmap(np.eye(3), {str(tmp_path / 'a.png')!r}, 't', 'v', dpi=20)\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n"
            "assert matplotlib.get_backend() == 'svg'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
