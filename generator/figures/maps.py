"""Label maps and RGB arrays to PNG files: the picture edge of the generator.

Arrays come in, PNG bytes or files come out. PNGs are written without timestamps or other
metadata, so the same array always gives the same bytes and an unchanged figure never shows up
as a change in the published site.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.figures.palette import colorize
from generator.png import png_bytes
from generator.store.atomic import atomic_write_bytes

__all__ = ["label_map_png", "save_png", "thumbnail", "to_png_bytes", "upsample_nearest"]


def _check_rgb(rgb: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise PatchAtlasError(f"{what}: expected an RGB array [h, w, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise PatchAtlasError(f"{what}: expected dtype uint8, got {arr.dtype}; scale to 0-255 first")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PatchAtlasError(f"{what}: empty image of shape {arr.shape}")
    return arr


def _check_size(size_hw: tuple[int, int], what: str) -> tuple[int, int]:
    if len(size_hw) != 2 or any(int(s) != s or s < 1 for s in size_hw):
        raise PatchAtlasError(f"{what}: size_hw must be two positive integers, got {size_hw!r}")
    return int(size_hw[0]), int(size_hw[1])


def upsample_nearest(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an [h, w, ...] array to ``size_hw``: output pixel (i, j)
    takes input pixel (floor((i + 0.5) h / H), floor((j + 0.5) w / W)), so each patch becomes a
    block of whole pixels with no blended colours between clusters."""
    arr = np.asarray(rgb)
    if arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PatchAtlasError(f"upsample_nearest: expected an array [h, w, ...], got shape {arr.shape}")
    out_h, out_w = _check_size(size_hw, "upsample_nearest")
    rows = ((np.arange(out_h) + 0.5) * arr.shape[0] / out_h).astype(np.int64)
    cols = ((np.arange(out_w) + 0.5) * arr.shape[1] / out_w).astype(np.int64)
    return arr[rows[:, None], cols[None, :]]


def to_png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB uint8 array [h, w, 3] as PNG (no metadata, no slow optimisation pass)."""
    return png_bytes(_check_rgb(rgb, "to_png_bytes"))


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``rgb`` as a PNG file atomically; returns the path."""
    return atomic_write_bytes(path, to_png_bytes(rgb))


def label_map_png(
    label_map: np.ndarray,
    path: str | os.PathLike,
    size_hw: tuple[int, int] = (224, 224),
    ignore_index: int = 255,
) -> Path:
    """Colour a label map [h, w] with the palette, enlarge it to ``size_hw`` and save it."""
    return save_png(upsample_nearest(colorize(label_map, ignore_index), size_hw), path)


def thumbnail(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink ``rgb`` so its longer side is at most ``max_side``, keeping the aspect ratio,
    with area averaging (PIL's box filter) so fine detail is averaged rather than aliased.
    Images already small enough come back unchanged (as a copy)."""
    arr = _check_rgb(rgb, "thumbnail")
    if isinstance(max_side, bool) or int(max_side) != max_side or max_side < 1:
        raise PatchAtlasError(f"thumbnail: max_side must be a positive integer, got {max_side!r}")
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr.copy()
    scale = max_side / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    image = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BOX))
