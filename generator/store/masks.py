"""Masks as palette PNGs: class ids that open as ids and display as colours.

A mask stored as a greyscale PNG of class ids shows as a nearly black image in the Hub's
viewer and in any image tool. Stored in mode ``P`` instead, its pixel values are the same class
ids (``np.array(Image.open(png))`` returns them unchanged) and the PNG's palette gives each id
its colour, so it displays as the segmentation it is.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.png import png_bytes


def palette_mask_png(mask_png: bytes, colours: np.ndarray, ignore_index: int | None = None,
                     ignore_colour=(0, 0, 0)) -> bytes:
    """``mask_png`` re-encoded as a mode-``P`` PNG with the same pixel values.

    ``colours`` [n, 3] uint8: id ``i`` gets ``colours[i % n]``; ``ignore_index`` gets
    ``ignore_colour``. A mask whose ids do not fit 8 bits (mode ``I;16`` / ``I`` with values
    above 255) cannot be a palette image and is returned unchanged.
    """
    colours = np.asarray(colours, dtype=np.uint8)
    if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) == 0:
        raise PatchAtlasError(f"mask palette of shape {colours.shape}: expected [n, 3] RGB colours")
    try:
        image = Image.open(io.BytesIO(mask_png))
        image.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad mask
        raise PatchAtlasError(f"mask PNG does not decode ({err}); rerun extract from the source masks") from err
    ids = np.asarray(image)
    if image.mode not in ("L", "P", "I;16", "I") or ids.ndim != 2:
        raise PatchAtlasError(f"mask of mode {image.mode} and shape {ids.shape}: expected one class id per pixel")
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        return mask_png
    table = colours[np.arange(256) % len(colours)].copy()
    if ignore_index is not None and 0 <= ignore_index <= 255:
        table[ignore_index] = ignore_colour
    # Built from the raw bytes: converting L to P would quantise values to palette entries.
    paletted = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids, dtype=np.uint8).tobytes())
    paletted.putpalette(table.reshape(-1).tolist())
    return png_bytes(paletted)
