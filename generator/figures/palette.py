"""The fixed colour palette for label maps: one colour per id, the same on every page.

The first 20 colours are Tableau's tab20 with the ten saturated colours before the ten light
ones, so small id sets (few classes or clusters) get the most distinct hues. The remaining 44
are chosen deterministically by farthest-point selection on an RGB grid, away from every colour
already taken and from black, which marks ignored pixels.
"""

from __future__ import annotations

import numpy as np

from generator.errors import PatchAtlasError

__all__ = ["IGNORE_COLOR", "PALETTE", "PALETTE_SIZE", "colorize"]

PALETTE_SIZE = 64
IGNORE_COLOR = np.array([0, 0, 0], dtype=np.uint8)

_TAB20_SATURATED = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
_TAB20_LIGHT = [
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]


def _extend_farthest_point(base: np.ndarray, avoid: np.ndarray, total: int) -> np.ndarray:
    """Append grid colours one at a time, each the farthest from all colours taken so far."""
    levels = np.linspace(0, 255, 9).round()
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    taken = np.concatenate([base, avoid]).astype(np.float64)
    nearest = np.min(((grid[:, None, :] - taken[None, :, :]) ** 2).sum(-1), axis=1)
    chosen = [tuple(c) for c in base]
    while len(chosen) < total:
        # argmax picks the first grid point on ties, so the palette never changes between runs.
        pick = int(np.argmax(nearest))
        chosen.append(tuple(grid[pick]))
        nearest = np.minimum(nearest, ((grid - grid[pick]) ** 2).sum(-1))
    return np.asarray(chosen, dtype=np.uint8)


PALETTE: np.ndarray = _extend_farthest_point(
    np.asarray(_TAB20_SATURATED + _TAB20_LIGHT, dtype=np.float64),
    IGNORE_COLOR[None, :].astype(np.float64),
    PALETTE_SIZE,
)
PALETTE.setflags(write=False)


def colorize(label_map: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """RGB image [h, w, 3] uint8 of an integer label map [h, w]: id i gets PALETTE[i % 64],
    pixels equal to ``ignore_index`` get IGNORE_COLOR."""
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise PatchAtlasError(f"colorize: label_map must be 2-D [h, w], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PatchAtlasError(f"colorize: label_map must hold integer ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    ignored = labels == ignore_index
    if bool((labels[~ignored] < 0).any()):
        raise PatchAtlasError(
            f"colorize: label_map holds negative ids other than ignore_index={ignore_index}"
        )
    rgb = PALETTE[np.where(ignored, 0, labels) % PALETTE_SIZE]
    rgb[ignored] = IGNORE_COLOR
    return rgb
