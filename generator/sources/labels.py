"""Patch labels: from a per-pixel class mask to one label per patch of the token grid.

Labels are read from the mask at its own resolution, through the geometry the image follows
into the model input (``generator.sources.geometry``: the resize policy, the input size, the
crop), so a patch's label comes from the pixels the patch sees and the mask is never resampled
twice. Two rules, because the literature disagrees with itself:

- ``nearest``: the mask pixel at the patch centre. The local-representations authors' code
  (AlvardBarseghyan/mae, branch ``draft``) resizes the 256-px tile's mask straight to the patch
  grid with ``cv2.resize(..., interpolation=cv2.INTER_NEAREST_EXACT)``; the centre is located in
  the 16.16 fixed point of OpenCV 4's ``resizeNN_bitexact`` (imgproc/src/resize.cpp), so the
  labels equal OpenCV's bit for bit, ties included (``patch_centre_indices``).
- ``majority``: the most frequent labelled class among the mask pixels whose centres fall in
  the patch. This is what their paper says.

``resize_mask`` (torch ``nearest-exact``) stays for resizing a mask with its image, e.g. tiles.
All functions are pure numpy. Patch labels are returned as ``int16`` (the dtype of the label
column in the token tables); ``resize_mask`` keeps the mask's own dtype.
"""

from __future__ import annotations

import numpy as np

from generator.errors import PatchAtlasError
from generator.sources.geometry import DEFAULT_RESIZE, Axis, InputGeometry, input_geometry, squash_geometry

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


def patch_centre_indices(axis: Axis, n_cells: int) -> np.ndarray:
    """The source pixel at the centre of each of ``n_cells`` patches along one axis.

    The centre of patch j is at ``offset + (j + 0.5) * length / n_cells`` in the resized image,
    i.e. at ``(offset + (j + 0.5) * length / n_cells) * source / resized`` source pixels. It is
    located as OpenCV 4's ``INTER_NEAREST_EXACT`` locates it: a step of 16.16 fixed point rounded
    to nearest, half a step in, less ``source % 2`` units; for the squash geometry this is that
    function exactly. (OpenCV 5 changed its rounding at exact ties; the authors' code ran on 4.)
    """
    src, res, off, length = axis.source, axis.resized, axis.offset, axis.length
    step = (2 * length * src * 65536 + res * n_cells) // (2 * res * n_cells)
    start = (off * src * 65536) // res
    j = np.arange(n_cells, dtype=np.int64)
    return np.clip((start + step // 2 - src % 2 + j * step) >> 16, 0, src - 1)


def _geometry_of(mask: np.ndarray, grid_hw: tuple[int, int], geometry: InputGeometry | None) -> InputGeometry:
    if geometry is None:
        return squash_geometry(mask.shape, grid_hw)
    if (geometry.rows.source, geometry.cols.source) != mask.shape:
        raise PatchAtlasError(f"mask of shape {mask.shape} with a geometry made for "
                              f"{(geometry.rows.source, geometry.cols.source)}: build the geometry from this mask's "
                              f"size (input_geometry(mask.shape, side, resize))")
    return geometry


def patch_labels_nearest(mask: np.ndarray, grid_hw: tuple[int, int],
                         geometry: InputGeometry | None = None) -> np.ndarray:
    """One label per patch: the mask pixel at each patch centre ([gh, gw], int16).

    ``geometry`` is how the image (and so the mask) becomes the model input; None maps the whole
    mask onto the grid, which is ``cv2.resize(mask, (gw, gh), interpolation=INTER_NEAREST_EXACT)``.
    A sampled ignore pixel stays the ignore label.
    """
    mask = _check_mask(mask)
    grid_hw = _check_size(grid_hw, "patch grid")
    _check_fits_labels(mask)
    geometry = _geometry_of(mask, grid_hw, geometry)
    rows = patch_centre_indices(geometry.rows, grid_hw[0])
    cols = patch_centre_indices(geometry.cols, grid_hw[1])
    return mask[np.ix_(rows, cols)].astype(LABEL_DTYPE)


def pixel_cells(n_pixels: int, n_cells: int) -> np.ndarray:
    """The cell each pixel belongs to along one axis: the cell holding the pixel's centre.

    ``floor((y + 0.5) * n_cells / n_pixels)`` in integer arithmetic. When ``n_pixels`` is a
    multiple of ``n_cells`` this is the equal split ``y // (n_pixels / n_cells)``; otherwise
    cell sizes differ by at most one pixel, placed symmetrically.
    """
    y = np.arange(n_pixels, dtype=np.int64)
    return ((2 * y + 1) * n_cells) // (2 * n_pixels)


def pixel_patches(axis: Axis, n_cells: int) -> np.ndarray:
    """The patch each source pixel's centre lands in along one axis, or -1 outside the kept window.

    Pixel y's centre ``y + 0.5`` is at ``(y + 0.5) * resized / source - offset`` input pixels, in
    patch ``floor(that * n_cells / length)``; integer arithmetic, so no pixel flips on rounding.
    Without a crop this is ``pixel_cells``.
    """
    src, res, off, length = axis.source, axis.resized, axis.offset, axis.length
    y = np.arange(src, dtype=np.int64)
    cells = ((2 * y + 1) * res * n_cells - 2 * off * src * n_cells) // (2 * src * length)
    return np.where((cells >= 0) & (cells < n_cells), cells, -1)


def patch_labels_majority(mask: np.ndarray, grid_hw: tuple[int, int], ignore_index: int = 255,
                          geometry: InputGeometry | None = None) -> np.ndarray:
    """One label per patch: the most frequent labelled class among its pixels ([gh, gw], int16).

    A patch's pixels are the mask pixels whose centres ``geometry`` (None: the whole mask onto
    the grid) puts in it; pixels cropped away belong to none. Pixels equal to ``ignore_index``
    do not vote; a patch with no labelled pixel (all ignore, or no pixel at all when the grid is
    finer than the mask) gets ``ignore_index``. Ties go to the smallest class id.
    """
    mask = _check_mask(mask)
    gh, gw = _check_size(grid_hw, "patch grid")
    _check_fits_labels(mask, ignore_index)
    geometry = _geometry_of(mask, (gh, gw), geometry)
    row_cells, col_cells = pixel_patches(geometry.rows, gh), pixel_patches(geometry.cols, gw)
    cell = row_cells[:, None] * gw + col_cells[None, :]
    labelled = (mask != ignore_index) & (row_cells[:, None] >= 0) & (col_cells[None, :] >= 0)
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


def patch_labels(mask: np.ndarray, grid_hw: tuple[int, int], rule: str, ignore_index: int = 255,
                 geometry: InputGeometry | None = None) -> np.ndarray:
    """Patch labels ([gh, gw], int16) by ``rule``, one of ``LABEL_RULES``, through ``geometry``
    (how the image becomes the model input; None: the whole mask onto the grid)."""
    if rule == "nearest":
        return patch_labels_nearest(mask, grid_hw, geometry)
    if rule == "majority":
        return patch_labels_majority(mask, grid_hw, ignore_index, geometry)
    raise PatchAtlasError(f"label rule {rule!r}: expected one of {', '.join(LABEL_RULES)}")


def input_patch_labels(mask: np.ndarray, side: int, grid_hw: tuple[int, int], rule: str, ignore_index: int = 255,
                       resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """Patch labels of a mask whose image becomes a ``side`` × ``side`` input by ``resize``."""
    mask = _check_mask(mask)
    return patch_labels(mask, grid_hw, rule, ignore_index, input_geometry(mask.shape, side, resize))
