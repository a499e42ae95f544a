"""The render stage's figures: PNGs written once per content, each source's figure set, NPZ maps read once."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from generator.figures.maps import thumbnail, to_png_bytes, upsample_nearest
from generator.figures.palette import PALETTE, colorize
from generator.figures.plots import heatmap_rgb
from generator.site.options import RenderOptions
from generator.store.layout import (
    IMAGES_CONFIG,
    MAPS_ARRAYS_FILE,
    dataset_repo_dir,
    results_dir,
)
from generator.store.parquet import read_first_images


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@dataclass
class Grid:
    """A table of pictures: one row per image (image, ground truth, then one cell per column)."""

    title: str
    columns: list[str]
    rows: list[dict]  # {"image_id", "image", "mask", "cells": [path | None]}
    caption: str = ""


class PngWriter:
    """Encodes and writes figure PNGs on a thread pool (zlib runs without the GIL).

    Files go straight to their final names: they live in the render's staging folder, which is
    swapped in whole once complete, so a per-file temporary name and fsync would buy nothing.
    """

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        self._futures = []

    def submit(self, rgb: np.ndarray, path: Path) -> None:
        self._futures.append(self._pool.submit(self._write, np.ascontiguousarray(rgb), path))

    def submit_bytes(self, data: bytes, path: Path) -> None:
        self._futures.append(self._pool.submit(self._write_bytes, data, path))

    @staticmethod
    def _write_bytes(data: bytes, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    @staticmethod
    def _write(rgb: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_png_bytes(rgb))

    def close(self) -> None:
        try:
            for future in self._futures:
                future.result()  # re-raises the first failed write
        finally:
            self._pool.shutdown()


class SourceFigures:
    """Writes the figures of one source under ``docs/assets/<source>`` and returns their paths.

    Paths are relative to the docs root; templates prefix them for the page's depth.
    """

    def __init__(self, out: Path, docs: Path, source: dict, options: RenderOptions, writer: PngWriter):
        self.out, self.docs, self.source, self.options, self.writer = out, docs, source, options, writer
        self.name = source["name"]
        self.assets = Path("assets") / self.name
        self.ignore_index = source["ignore_index"]
        repo = dataset_repo_dir(out, self.name)
        self.images = read_first_images(repo / IMAGES_CONFIG, options.gallery_images)
        self.ids = [img["image_id"] for img in self.images]
        self.base_rows = []
        self.sizes = {}
        for img in self.images:
            rgb = _decode_png(img["image_png"])
            rgb = thumbnail(rgb.reshape(img["height"], img["width"], -1)[..., :3], options.thumb_side)
            self.sizes[img["image_id"]] = rgb.shape[:2]
            image_rel = self._save_rgb(rgb, "images", img["image_id"])
            # The stored original opens on click; galleries show the thumbnail.
            full_rel = (self.assets / "full" / f"{img['image_id']}.png").as_posix()
            self.writer.submit_bytes(img["image_png"], self.docs / full_rel)
            mask = upsample_nearest(colorize(_decode_png(img["mask_png"]), self.ignore_index), rgb.shape[:2])
            mask_rel = self._save_rgb(mask, "masks", img["image_id"])
            self.base_rows.append({"image_id": img["image_id"], "image": image_rel, "image_full": full_rel,
                                   "mask": mask_rel})

    def _save_rgb(self, rgb: np.ndarray, *parts: str) -> str:
        rel = self.assets.joinpath(*parts[:-1]) / f"{parts[-1]}.png"
        self.writer.submit(rgb, self.docs / rel)
        return rel.as_posix()

    def _per_image(self, ids: list[str], arrays: np.ndarray, to_rgb, *parts: str) -> dict[str, str]:
        """One PNG per gallery image from per-image arrays [n, gh, gw(, 3)]."""
        paths = {}
        for image_id, array in zip(ids, arrays):
            if image_id in self.sizes:
                rgb = upsample_nearest(to_rgb(array), self.sizes[image_id])
                paths[image_id] = self._save_rgb(rgb, *parts, image_id)
        return paths

    def cluster_maps(self, model: str, config: str, k: int, display: np.ndarray, ids: list[str]) -> dict[str, str]:
        return self._per_image(ids, display, lambda m: colorize(m, self.ignore_index), model, config, f"clusters-k{k}")

    def pca_maps(self, model: str, config: str, maps: dict) -> dict[str, str]:
        return self._per_image(maps["ids"], maps["pca_rgb"], lambda a: a, model, config, "pca")

    def norm_maps(self, model: str, config: str, maps: dict) -> dict[str, str]:
        norms = maps["norm_maps"]
        top = float(norms.max()) if norms.size else 1.0  # one scale per config: images compare
        return self._per_image(maps["ids"], norms, lambda a: heatmap_rgb(a, 0.0, top, "magma"), model, config, "norms")

    def position_mode_map(self, model: str, config: str, k: int, mode: np.ndarray) -> str:
        """The most frequent cluster at each position over all images (positional bias made visible)."""
        rgb = upsample_nearest(colorize(mode, self.ignore_index), (96, 96))
        return self._save_rgb(rgb, model, config, f"position-mode-k{k}")

    def border_map(self, model: str, config: str, values: np.ndarray, top: float) -> str:
        rgb = upsample_nearest(heatmap_rgb(values, 0.0, top, "viridis"), (96, 96))
        return self._save_rgb(rgb, model, config, "border")

    def attention_maps(self, model: str, maps: np.ndarray, ids: list[str], heads: int) -> dict[tuple[str, int], str]:
        paths = {}
        for image_id, per_head in zip(ids, maps):
            if image_id not in self.sizes:
                continue
            for head in range(min(heads, per_head.shape[0])):
                rgb = upsample_nearest(heatmap_rgb(per_head[head], 0.0, None, "inferno"), self.sizes[image_id])
                paths[(image_id, head)] = self._save_rgb(rgb, model, "attention", f"{image_id}-h{head}")
        return paths

    def grid(self, title: str, columns: list[str], cells: list[dict[str, str]], caption: str = "") -> Grid:
        rows = [{**row, "cells": [c.get(row["image_id"]) for c in cells]} for row in self.base_rows]
        return Grid(title, columns, rows, caption)


class NpzCache:
    """The arrays a render reads from ``.npz`` files: each file is opened (and its members
    decompressed) once, on first use, however many figures draw from it. One cache per source
    keeps only that source's arrays in memory; no file belongs to two sources."""

    def __init__(self):
        self._arrays: dict[Path, dict[str, np.ndarray]] = {}

    def arrays(self, path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """``keys`` of ``path`` (all of them when None); later calls must ask for no more."""
        path = Path(path)
        if path not in self._arrays:
            with np.load(path) as npz:
                self._arrays[path] = {key: npz[key] for key in (keys or npz.files)}
        return self._arrays[path]


def load_maps(npz: NpzCache, out: Path, source: str, model: str, config: str) -> dict:
    maps = dict(npz.arrays(results_dir(out, source, model, config) / MAPS_ARRAYS_FILE))
    maps["ids"] = [str(v) for v in maps.pop("image_ids")]
    return maps


def class_legend(docs: Path, source: str, classes: list[dict], writer: PngWriter) -> list[dict]:
    legend = []
    for c in classes:
        swatch = np.full((12, 12, 3), PALETTE[c["id"] % len(PALETTE)], dtype=np.uint8)
        rel = Path("assets") / source / "legend" / f"class-{c['id']}.png"
        writer.submit(swatch, docs / rel)
        legend.append({**c, "swatch": rel.as_posix()})
    return legend
