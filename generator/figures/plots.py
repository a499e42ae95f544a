"""Arrays → heatmaps and line/bar charts as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from generator.store.atomic import atomic_write_bytes  # noqa: E402

# Families drawn the same way on every chart, so CL and MIM read apart at a glance.
FAMILY_STYLES = {
    "CL": {"color": "#1f77b4", "linestyle": "-"},
    "MIM": {"color": "#d62728", "linestyle": "--"},
    "CL+MIM": {"color": "#9467bd", "linestyle": "-."},
    "supervised": {"color": "#2ca02c", "linestyle": ":"},
    "language": {"color": "#ff7f0e", "linestyle": ":"},
}
# Reference series (an untrained network, a calibration control) are a scale, not a result:
# thin, grey, dashed, drawn under the models and named as references in the legend. The grey
# and the family colours are mid-tones, legible on the charts' white card in both site themes.
REFERENCE_STYLE = {"color": "#8c8c8c", "linestyle": "--", "linewidth": 1.0, "zorder": 1}
REFERENCE_SUFFIX = " (reference)"


def heatmap_rgb(values: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                cmap: str = "viridis") -> np.ndarray:
    """[h, w] floats → [h, w, 3] uint8 with a perceptual colour map; shared vmin/vmax make maps comparable."""
    values = np.asarray(values, dtype=np.float64)
    lo = np.nanmin(values) if vmin is None else vmin
    hi = np.nanmax(values) if vmax is None else vmax
    scaled = np.zeros_like(values) if hi <= lo else np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(scaled))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    # Fixed metadata keeps the bytes identical from one render to the next.
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _figure(width: float, height: float = 3.6):
    # Constrained layout makes room for tick labels, titles and a legend outside the axes, so
    # nothing is cut off at the figure's edge whatever the label lengths.
    return plt.subplots(figsize=(width, height), layout="constrained")


def _style(s: dict) -> tuple[dict, str]:
    """Line style and legend label of one series: references grey and named as such."""
    if s.get("reference"):
        label = s["label"] if s["label"].endswith(REFERENCE_SUFFIX) else s["label"] + REFERENCE_SUFFIX
        return dict(REFERENCE_STYLE), label
    return dict(FAMILY_STYLES.get(s.get("family", ""), {})), s["label"]


def _legend_outside(ax) -> None:
    # Beside the axes rather than over the curves: with many models "best" still hides data.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def line_chart(series: Sequence[dict], *, xlabel: str, ylabel: str, title: str = "",
               baseline: float | None = None, baseline_label: str = "random pairs", log_y: bool = False,
               ylim: tuple[float | None, float | None] | None = None):
    """One line per series: dicts with ``label``, ``x``, ``y`` and optionally ``family``,
    ``reference`` (drawn as a reference line) and ``y_lo``/``y_hi`` (an interval, drawn as a band).

    ``ylim`` fixes the metric's scale (mIoU: ``(0, 1)``), so a chart never zooms into a small
    difference; ``baseline`` draws a labelled horizontal line (chance, random pairs).
    """
    fig, ax = _figure(7.2)
    for s in series:
        style, label = _style(s)
        marker = {} if s.get("reference") else {"marker": "o", "markersize": 3}
        (line,) = ax.plot(s["x"], s["y"], label=label, **marker, **style)
        if s.get("y_lo") is not None and s.get("y_hi") is not None:
            ax.fill_between(s["x"], s["y_lo"], s["y_hi"], color=line.get_color(), alpha=0.2, linewidth=0,
                            zorder=style.get("zorder", 2))
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8, linestyle=":", label=baseline_label)
    if series and all(float(x).is_integer() for s in series for x in s["x"]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers, levels: no "1.5"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series or baseline is not None:
        _legend_outside(ax)
    return fig


def line_chart_png(series: Sequence[dict], path: str | os.PathLike, **kwargs) -> Path:
    """:func:`line_chart` written as a PNG."""
    return _save(line_chart(series, **kwargs), path)


def histogram(histograms: Mapping[str, dict], *, xlabel: str, title: str = ""):
    """Step histograms from precomputed ``counts``/``edges``, one per label, log-scaled counts;
    an entry with ``reference`` set is drawn as a reference."""
    fig, ax = _figure(7.2)
    for label, h in histograms.items():
        style, label = _style({**h, "label": label})
        style.setdefault("linestyle", "-")
        ax.stairs(h["counts"], h["edges"], label=label, **style)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Patches")
    if title:
        ax.set_title(title)
    if histograms:
        _legend_outside(ax)
    return fig


def histogram_png(histograms: Mapping[str, dict], path: str | os.PathLike, **kwargs) -> Path:
    """:func:`histogram` written as a PNG."""
    return _save(histogram(histograms, **kwargs), path)


def stacked_bars(categories: Sequence[str], stacks: Mapping[str, Sequence[float]], *, xlabel: str,
                 title: str = "", value_lim: tuple[float | None, float | None] | None = None):
    """One horizontal bar per category, split into the named stacks (e.g. retrieval outcomes per
    model). Horizontal, so long category names read unrotated and never push the chart off the
    figure; ``value_lim`` fixes the value axis (shares: ``(0, 1)``)."""
    fig, ax = _figure(7.2, max(2.4, 0.32 * len(categories) + 1.4))
    left = np.zeros(len(categories))
    colours = plt.get_cmap("tab10")
    positions = np.arange(len(categories))
    for i, (label, values) in enumerate(stacks.items()):
        values = np.asarray(values, dtype=float)
        ax.barh(positions, values, left=left, label=label, color=colours(i))
        left += values
    ax.set_yticks(positions, list(categories), fontsize=7)
    ax.invert_yaxis()  # first category on top, as in the table below the chart
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if value_lim is not None:
        ax.set_xlim(*value_lim)
    _legend_outside(ax)
    return fig


def stacked_bars_png(categories: Sequence[str], stacks: Mapping[str, Sequence[float]], path: str | os.PathLike,
                     **kwargs) -> Path:
    """:func:`stacked_bars` written as a PNG."""
    return _save(stacked_bars(categories, stacks, **kwargs), path)
