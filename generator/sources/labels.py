"""Patch labels: from a per-pixel class mask to one label per patch of the token grid.

The mask is first resized to the model's input size (``resize_mask``), then reduced to the
patch grid by one of two rules, because the literature disagrees with itself:

- ``nearest``: one sampled pixel per patch, exactly ``torch.nn.functional.interpolate(...,
  mode="nearest-exact")`` on the mask. This is what the local-representations authors' code does.
- ``majority``: the most frequent labelled class among a patch's pixels. This is what their
  paper says.

All functions are pure numpy. Patch labels are returned as ``int16`` (the dtype of the label
column in the token tables); ``resize_mask`` keeps the mask's own dtype.
"""

from __future__ import annotations

import numpy as np

from generator.errors import PatchAtlasError

LABEL_RULES = ("nearest", "majority")

LABEL_DTYPE = np.int16


def _check_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PatchAtlasError(f"{what} of shape {mask.shape}: expected a 2-D array [H, W] of class ids")
    if not np.issubdtype(mask.dtype, np.integer):
        raise PatchAtlasError(f"{what} of dtype {mask.dtype}: expected integer class ids (convert with astype)")
    if mask.size == 0:
        raise PatchAtlasError(f"{what} of shape {mask.shape}: it is empty")
    return mask


def _check_size(size_hw, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size_hw)
        ok = all(int(v) == v for v in size_hw)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise PatchAtlasError(f"{what} {size_hw!r}: expected two positive integers (height, width)")
    return h, w


def nearest_exact_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` output samples taken from ``n_in`` inputs (pixel centres).

    ``min(floor((i + 0.5) * n_in / n_out), n_in - 1)`` evaluated the way torch's CPU kernel for
    ``nearest-exact`` evaluates it: float32 scale, product rounded to float32. Exact rational
    arithmetic picks the other pixel at exact ties (e.g. 2 -> 41 at i = 20), so the float32
    rounding is reproduced on purpose to match torch bit for bit.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    position = (np.arange(n_out, dtype=np.float64) + 0.5) * np.float64(scale)
    return np.minimum(np.floor(position.astype(np.float32)).astype(np.int64), n_in - 1)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class mask to ``size_hw`` = (height, width).

    Samples the pixel whose centre is nearest each output pixel centre, identical to torch
    ``interpolate(mode="nearest-exact")`` (see ``nearest_exact_indices``); no new class ids are
    ever invented. The dtype is kept.
    """
    mask = _check_mask(mask)
    out_h, out_w = _check_size(size_hw, "mask size")
    if mask.shape == (out_h, out_w):
        return mask.copy()
    rows = nearest_exact_indices(mask.shape[0], out_h)
    cols = nearest_exact_indices(mask.shape[1], out_w)
    return mask[np.ix_(rows, cols)]


def _check_fits_labels(mask: np.ndarray, ignore_index: int | None = None) -> None:
    lo, hi = int(mask.min()), int(mask.max())
    limits = np.iinfo(LABEL_DTYPE)
    if lo < limits.min or hi > limits.max:
        raise PatchAtlasError(
            f"mask values span {lo}..{hi}: patch labels are {np.dtype(LABEL_DTYPE).name}, so class ids must lie "
            f"in {limits.min}..{limits.max}; remap the ids first")
    if ignore_index is not None and not limits.min <= ignore_index <= limits.max:
        raise PatchAtlasError(f"ignore index {ignore_index}: must lie in {limits.min}..{limits.max}")


def patch_labels_nearest(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """One label per patch: the mask pixel nearest each patch centre ([gh, gw], int16).

    Equal to ``interpolate(mask[None, None].float(), size=grid_hw, mode="nearest-exact")``.
    A sampled ignore pixel stays the ignore label.
    """
    mask = _check_mask(mask)
    grid_hw = _check_size(grid_hw, "patch grid")
    _check_fits_labels(mask)
    return resize_mask(mask, grid_hw).astype(LABEL_DTYPE)


def pixel_cells(n_pixels: int, n_cells: int) -> np.ndarray:
    """The cell each pixel belongs to along one axis: the cell holding the pixel's centre.

    ``floor((y + 0.5) * n_cells / n_pixels)`` in integer arithmetic. When ``n_pixels`` is a
    multiple of ``n_cells`` this is the equal split ``y // (n_pixels / n_cells)``; otherwise
    cell sizes differ by at most one pixel, placed symmetrically.
    """
    y = np.arange(n_pixels, dtype=np.int64)
    return ((2 * y + 1) * n_cells) // (2 * n_pixels)


def patch_labels_majority(mask: np.ndarray, grid_hw: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
    """One label per patch: the most frequent labelled class among its pixels ([gh, gw], int16).

    Pixels equal to ``ignore_index`` do not vote; a patch with no labelled pixel (all ignore,
    or no pixel at all when the grid is finer than the mask) gets ``ignore_index``. Ties go to
    the smallest class id.
    """
    mask = _check_mask(mask)
    gh, gw = _check_size(grid_hw, "patch grid")
    _check_fits_labels(mask, ignore_index)
    height, width = mask.shape
    cell = pixel_cells(height, gh)[:, None] * gw + pixel_cells(width, gw)[None, :]
    labelled = mask != ignore_index
    # Count over the classes present only (sorted, so argmax's first-maximum rule = smallest id).
    classes, code = np.unique(mask[labelled], return_inverse=True)
    n_cells = gh * gw
    out = np.full(n_cells, ignore_index, dtype=LABEL_DTYPE)
    if classes.size == 0:
        return out.reshape(gh, gw)
    counts = np.bincount(cell[labelled] * classes.size + code.ravel(), minlength=n_cells * classes.size)
    counts = counts.reshape(n_cells, classes.size)
    voted = counts.any(axis=1)
    out[voted] = classes[counts[voted].argmax(axis=1)]
    return out.reshape(gh, gw)


def patch_labels(mask: np.ndarray, grid_hw: tuple[int, int], rule: str, ignore_index: int = 255) -> np.ndarray:
    """Patch labels ([gh, gw], int16) by ``rule``, one of ``LABEL_RULES``."""
    if rule == "nearest":
        return patch_labels_nearest(mask, grid_hw)
    if rule == "majority":
        return patch_labels_majority(mask, grid_hw, ignore_index)
    raise PatchAtlasError(f"label rule {rule!r}: expected one of {', '.join(LABEL_RULES)}")
