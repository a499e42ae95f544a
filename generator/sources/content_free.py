"""Inputs without content: constant colours and noise.

Whatever structure a model's cluster maps show on these images — stripes, border rings, corner
blobs, artifact tokens — comes from the model (its position embeddings and what it learned),
not from the image. The source labels each image with its own kind, so the k-means score says
whether clusters follow the input (as they should) or the position (positional bias).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import datasets
import numpy as np

from generator.errors import PatchAtlasError
from generator.png import png_cell
from generator.sources.base import SOURCE_FEATURES, ClassInfo, SegmentationSource

CONTENT_FREE_NAME = "content-free"
CONTENT_FREE_VERSION = "1"
CONSTANT_COLOURS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
}
CONTENT_FREE_KINDS = (*CONSTANT_COLOURS, "noise")


def content_free_images(side: int, kinds: Sequence[str] = CONTENT_FREE_KINDS, seed: int = 0) -> dict[str, np.ndarray]:
    """[side, side, 3] uint8 images: constant colours, and ``noise`` (i.i.d. uniform per pixel
    and channel, from ``seed``)."""
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
        raise PatchAtlasError(f"side must be a positive integer number of pixels, got {side!r}")
    images: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    for kind in kinds:
        if kind in CONSTANT_COLOURS:
            images[kind] = np.broadcast_to(np.asarray(CONSTANT_COLOURS[kind], dtype=np.uint8), (side, side, 3)).copy()
        elif kind == "noise":
            images[kind] = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        else:
            raise PatchAtlasError(f"content-free image kind {kind!r} is unknown; choose from {', '.join(CONTENT_FREE_KINDS)}")
    return images


def content_free_source(size: int = 224, noise_images: int = 3, seed: int = 0) -> SegmentationSource:
    """One image per constant colour plus ``noise_images`` noise images, each labelled by kind."""
    if size < 16 or noise_images < 0:
        raise PatchAtlasError(f"content-free source: size {size} must be ≥ 16 and noise_images {noise_images} ≥ 0")
    classes = [ClassInfo(i, kind, "noise" if kind == "noise" else "constant") for i, kind in enumerate(CONTENT_FREE_KINDS)]
    constants = content_free_images(size, tuple(CONSTANT_COLOURS))
    rows = {"image_id": [], "image": [], "mask": []}
    items = list(constants.items()) + [
        ("noise", content_free_images(size, ("noise",), seed=seed + i)["noise"]) for i in range(noise_images)]
    noise_count = 0
    for kind, image in items:
        class_id = CONTENT_FREE_KINDS.index(kind)
        suffix = f"-{noise_count}" if kind == "noise" else ""
        noise_count += kind == "noise"
        rows["image_id"].append(f"{kind}{suffix}")
        rows["image"].append(png_cell(image))
        rows["mask"].append(png_cell(np.full((size, size), class_id, dtype=np.uint8)))
    revision = hashlib.sha256(f"{CONTENT_FREE_VERSION}:{size}:{noise_images}:{seed}".encode()).hexdigest()[:12]
    return SegmentationSource(
        name=CONTENT_FREE_NAME, dataset=datasets.Dataset.from_dict(rows, features=SOURCE_FEATURES), classes=classes,
        ignore_index=255, revision=revision, license="CC0-1.0",
        description="Inputs without content (six constant colours and uniform noise): any structure in their "
                    "cluster maps comes from the model's positional biases, not from the image.",
        params={"size": size, "noise_images": noise_images, "seed": seed}, probes=False,
    )
