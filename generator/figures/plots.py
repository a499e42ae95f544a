"""Arrays → heatmaps and line/bar charts as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from generator.store.atomic import atomic_write_bytes  # noqa: E402

# Families drawn the same way on every chart, so CL and MIM read apart at a glance.
FAMILY_STYLES = {
    "CL": {"color": "#1f77b4", "linestyle": "-"},
    "MIM": {"color": "#d62728", "linestyle": "--"},
    "CL+MIM": {"color": "#9467bd", "linestyle": "-."},
    "supervised": {"color": "#2ca02c", "linestyle": ":"},
    "language": {"color": "#ff7f0e", "linestyle": ":"},
    "random": {"color": "#7f7f7f", "linestyle": (0, (1, 1))},
}


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


def line_chart_png(series: Sequence[dict], path: str | os.PathLike, *, xlabel: str, ylabel: str,
                   title: str = "", baseline: float | None = None, log_y: bool = False) -> Path:
    """One line per series: dicts with ``label``, ``x``, ``y`` and optionally ``family``."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for s in series:
        style = FAMILY_STYLES.get(s.get("family", ""), {})
        ax.plot(s["x"], s["y"], marker="o", markersize=3, label=s["label"], **style)
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8, linestyle=":", label="random pairs")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def histogram_png(histograms: Mapping[str, dict], path: str | os.PathLike, *, xlabel: str, title: str = "") -> Path:
    """Step histograms from precomputed ``counts``/``edges``, one per label, log-scaled counts."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, h in histograms.items():
        style = FAMILY_STYLES.get(h.get("family", ""), {})
        ax.stairs(h["counts"], h["edges"], label=label, color=style.get("color"), linestyle=style.get("linestyle", "-"))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("patches")
    if title:
        ax.set_title(title)
    if histograms:
        ax.legend(fontsize=7)
    return _save(fig, path)


def stacked_bars_png(categories: Sequence[str], stacks: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                     ylabel: str, title: str = "") -> Path:
    """One bar per category, split into the named stacks (e.g. retrieval outcomes per model)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(categories) + 2), 3.6))
    bottom = np.zeros(len(categories))
    colours = plt.get_cmap("tab10")
    for i, (label, values) in enumerate(stacks.items()):
        values = np.asarray(values, dtype=float)
        ax.bar(list(categories), values, bottom=bottom, label=label, color=colours(i))
        bottom += values
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
