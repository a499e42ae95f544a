"""Charts a reader can read: the metric's own scale, words on the axes, nothing clipped,
references drawn apart from models, intervals as bands."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from generator.figures.plots import REFERENCE_STYLE, histogram, line_chart, stacked_bars

LONG = "vit_giant_patch14_reg4_dinov2.lvd142m layer 40"


def _series(label, family="CL", reference=False, **extra):
    return {"label": label, "family": family, "reference": reference, "x": [1, 2, 3], "y": [0.2, 0.4, 0.3], **extra}


def _drawn_texts(fig) -> list:
    """Titles, axis labels, legend entries and the tick labels inside the view limits (matplotlib
    keeps, but does not draw, labels of ticks beyond them)."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts += [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        texts += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _outside_figure(fig) -> list[str]:
    """Every drawn text whose extent crosses the figure's edge (what a saved PNG would cut)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    clipped = []
    for text in _drawn_texts(fig):
        ext = text.get_window_extent(renderer)
        if ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1:
            clipped.append(text.get_text())
    return clipped


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_miou_chart_keeps_the_zero_to_one_scale_and_labels_in_words():
    fig = line_chart([_series("a")], xlabel="Layer", ylabel="k-NN mIoU", title="k-NN mIoU by layer", ylim=(0, 1))
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)  # data span 0.2–0.4: without the scale it would zoom in
    assert ax.get_xlabel() == "Layer" and ax.get_ylabel() == "k-NN mIoU"
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())  # layers are whole numbers


def test_long_labels_and_legend_stay_inside_the_figure():
    many = [_series(f"{LONG} {i}") for i in range(6)]
    fig = line_chart(many, xlabel="Top-variance dimensions removed", ylabel="k-NN mIoU",
                     title="A long title that names the dataset and the protocol", ylim=(0, 1),
                     baseline=0.1, baseline_label="chance")
    assert _outside_figure(fig) == []
    bars = stacked_bars([f"{LONG} rotation {i}" for i in range(5)], {"same patch": [0.5] * 5, "wrong": [0.5] * 5},
                        xlabel="Share of query patches", value_lim=(0, 1))
    assert bars.axes[0].get_xlim() == (0.0, 1.0)
    assert _outside_figure(bars) == []
    hist = histogram({LONG: {"counts": [3, 1], "edges": [0, 1, 2]}}, xlabel="L2 norm of pre-norm patch tokens")
    assert _outside_figure(hist) == []


def test_reference_series_are_grey_dashed_and_named_as_references():
    fig = line_chart([_series("dino"), _series("random", family="random", reference=True)],
                     xlabel="Layer", ylabel="k-NN mIoU", ylim=(0, 1))
    ax = fig.axes[0]
    model, reference = ax.get_lines()[:2]
    assert reference.get_color() == REFERENCE_STYLE["color"] and reference.get_linestyle() == "--"
    assert model.get_color() != reference.get_color()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["dino", "random (reference)"]
    # The untrained family alone does not make a series a reference: the caller says so.
    plain = line_chart([_series("random", family="random")], xlabel="Layer", ylabel="k-NN mIoU")
    assert plain.axes[0].get_lines()[0].get_color() != REFERENCE_STYLE["color"]


def test_baseline_is_drawn_and_labelled():
    fig = line_chart([_series("a")], xlabel="Layer", ylabel="mIoU", baseline=0.15, baseline_label="chance")
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() == "chance"]
    assert len(lines) == 1 and np.allclose(lines[0].get_ydata(), 0.15)


def test_intervals_are_drawn_as_bands_and_only_where_given():
    banded = line_chart([_series("a", y_lo=[0.1, 0.3, 0.2], y_hi=[0.3, 0.5, 0.4])], xlabel="Layer", ylabel="mIoU")
    bands = [c for c in banded.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    lo, hi = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    assert (lo, hi) == pytest.approx((0.1, 0.5))
    plain = line_chart([_series("a")], xlabel="Layer", ylabel="mIoU")
    assert not [c for c in plain.axes[0].collections if isinstance(c, PolyCollection)]
