"""Decoding one image file into 8-bit RGB, the same way for every source that reads files.

An image that cannot be used is an ``UnusableImage``: the source skips it, records the reason
(``SegmentationSource.skipped``) and keeps the others, so one bad file among thousands costs
one image, not the build. What counts as unusable:

- a file that does not decode (corrupt, truncated, not an image);
- more pixels than the decompression-bomb limit (``max_pixels``, default 100 million, a source
  option). A few hundred bytes of PNG can claim 20 000 x 20 000 pixels and ask for gigabytes
  when decoded, so the size in the header is checked before any pixel is decoded;
- fewer than ``min_side`` pixels on a side (default 8, the smallest patch of common ViTs): such an
  image holds less than one patch of content, so every token of it would be interpolation;
- a floating-point image: its value range is unknown, so there is no honest way to 8 bits.

Every other mode becomes RGB deterministically: grey, 1-bit and palette images through PIL's
conversion (a palette gives its colours), CMYK through PIL's fixed formula (no colour
profile is applied, so the result does not depend on the machine), 16-bit grey scaled to 8 bits
(65535 -> 255, rounded; PIL's own conversion would clip everything above 255 to white). An
alpha channel (RGBA, LA, PA) is dropped, not composited: the colour channels are what the
camera recorded and what the mask labels; compositing would make the pixels depend on an
arbitrary backdrop colour and darken half-transparent regions.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from generator.errors import PatchAtlasError

DEFAULT_MAX_PIXELS = 100_000_000
MIN_IMAGE_SIDE = 8
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


class UnusableImage(PatchAtlasError):
    """One input file that cannot be used; its source skips it and records ``where`` and ``reason``."""

    def __init__(self, where: str, reason: str):
        self.where = str(where)
        # One line, whatever the decoder said: the reason is shown in tables and summaries.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.where}: {self.reason}")

    def record(self) -> dict:
        return {"path": self.where, "reason": self.reason}


def check_image_limits(max_pixels, min_side) -> tuple[int, int]:
    """The two limits as integers, refusing values that are not positive integers."""
    limits = []
    for name, value in (("max_pixels", max_pixels), ("min_side", min_side)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PatchAtlasError(f"{name}={value!r}: must be a positive integer, e.g. "
                                  f"--source-option {name}={DEFAULT_MAX_PIXELS if name == 'max_pixels' else 8}")
        limits.append(value)
    return limits[0], limits[1]


def _allow_pixels(max_pixels: int) -> None:
    # PIL checks every decode in the process against one global limit (a warning above it, an
    # error above twice it). The limit here is checked explicitly; PIL's is raised to it (never
    # lowered), so an image accepted here also decodes when `datasets` reads it again later.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb(where: str, what: str, detail: str, max_pixels: int) -> UnusableImage:
    return UnusableImage(where, f"{what} {detail} exceeds the decompression-bomb limit of {max_pixels:,} pixels; "
                                f"if it is a genuine image, raise the limit with --source-option max_pixels=N, "
                                f"else remove it (and its pair)")


def open_image(file, where: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Image.Image:
    """The fully decoded image in ``file`` (a path or a binary file object), or ``UnusableImage``."""
    _allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(file)
            width, height = img.size
            if width * height > max_pixels:
                raise _bomb(where, what, f"of {width}x{height} = {width * height:,} pixels", max_pixels)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses before the size is known here; its message carries the pixel count.
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        detail = f"of {int(claimed.group(1)):,} pixels" if claimed else f"({err})"
        raise _bomb(where, what, detail, max_pixels) from None
    except _DECODE_ERRORS as err:
        # PIL names the file (or a buffer's memory address) in this one; the reason must not vary.
        detail = "no known image format" if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}"
        raise UnusableImage(where, f"cannot read this {what} ({detail}); the file is corrupt, truncated or not an "
                                   "image: replace it or remove it (and its pair)") from None
    return img


def check_min_side(img: Image.Image, where: str, min_side: int = MIN_IMAGE_SIDE) -> None:
    width, height = img.size
    if min(width, height) < min_side:
        raise UnusableImage(where, f"image is {width}x{height} pixels, smaller than min_side={min_side} on a side "
                                   "(less than one patch of content); use a larger image or remove it (and its "
                                   "pair), or lower --source-option min_side=N")


def to_rgb8(img: Image.Image, where: str = "image") -> Image.Image:
    """An 8-bit RGB copy of ``img`` (``img`` itself when it already is), by the rules above."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)
        grey = np.round(np.clip(grey, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        raise UnusableImage(where, "floating-point image (mode F) has no defined 8-bit range; save it as an 8-bit "
                                   "JPEG or PNG")
    try:
        # PIL drops an alpha channel (RGBA, LA, PA) here rather than compositing it.
        return img.convert("RGB")
    except _DECODE_ERRORS as err:
        raise UnusableImage(where, f"cannot convert image mode {img.mode} to RGB ({err}); save it as an 8-bit RGB "
                                   "JPEG or PNG") from None


def stray_labels(ids: np.ndarray, class_ids: set[int], ignore_index: int) -> list[int]:
    """Mask values that are neither a class id nor the ignore label, ascending."""
    return sorted({int(v) for v in np.unique(ids)} - set(class_ids) - {ignore_index})


def shown(values: list, limit: int = 10) -> str:
    return ", ".join(str(v) for v in values[:limit]) + (" ..." if len(values) > limit else "")


def revision_with_skips(revision: str, skipped: list[dict]) -> str:
    """``revision`` changed by which inputs were skipped: other limits keep other images.

    Unchanged when nothing is skipped, so a clean dataset keeps the revision it always had.
    """
    if not skipped:
        return revision
    digest = hashlib.sha256(json.dumps(sorted(s["path"] for s in skipped)).encode("utf-8")).hexdigest()
    return f"{revision}-skip{digest[:8]}"


def no_usable_images(name: str, skipped: list[dict], where: str) -> PatchAtlasError:
    """The error for a source all of whose images were skipped, with the first reasons."""
    examples = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return PatchAtlasError(f"dataset {name!r} has no usable images: all {len(skipped)} in {where} were skipped, "
                           f"e.g. {examples}{more}; fix or replace these files")
