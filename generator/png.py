"""PNG encoding: the one encoder of every PNG the project stores (source images and masks,
palette masks, figures). PIL writes no timestamp, so the same pixels always give the same bytes.

It sits at the base of the package so that sources, store and figures share it without importing
one another.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """``image`` (a PIL image or an array PIL reads) encoded as PNG: the one encoder of the data a
    source stores. PIL writes no timestamp, so the same pixels always give the same bytes."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_cell(image: Image.Image | np.ndarray) -> dict:
    """A ``datasets.Image`` cell holding ``image`` as PNG bytes."""
    return {"path": None, "bytes": png_bytes(image)}


def mask_png_bytes(ids: np.ndarray) -> bytes:
    """Class ids as a PNG without a palette (8-bit when they fit, else 16-bit), so any reader sees
    the ids themselves, never colours."""
    if ids.max(initial=0) <= 255 and ids.min(initial=0) >= 0:
        return png_bytes(ids.astype(np.uint8))
    return png_bytes(ids.astype(np.uint16))
