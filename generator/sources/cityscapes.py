"""Cityscapes as the local-representations paper evaluates it (the `paper-cityscapes` preset).

From the official folder layout (``leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png``): 4 images from each of the 18 train
cities and 10 from each of the 3 val cities (72/30, seeded per city), each 1024×2048 image cut
into 4×8 tiles of 256 px, label ids mapped to the 19 evaluation classes. Tiles stay at 256 px:
each encoder resizes them to its input (224 in the paper; bicubic), and patch labels are read
from the 256-px mask (generator/sources/labels.py), as the authors' code reads them. The 72·32
train tiles come first, so the few-shot split trains on exactly them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.png import png_cell
from generator.sources.base import SOURCE_FEATURES, SegmentationSource
from generator.sources.hub import HUB_DATASETS, label_lut, remap_mask
from generator.sources.presets import cityscapes_72_30_split, tile_256

PAPER_CITYSCAPES_NAME = "paper-cityscapes"
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"


def find_cityscapes_frames(root: Path) -> dict[str, tuple[Path, Path, str]]:
    """image id ("<city>/<stem>") → (image path, label-id mask path, city) for train and val."""
    frames = {}
    for split in ("train", "val"):
        for image in sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")):
            city, stem = image.parent.name, image.name[: -len(IMAGE_SUFFIX)]
            mask = root / "gtFine" / split / city / f"{stem}{MASK_SUFFIX}"
            if not mask.is_file():
                raise PatchAtlasError(f"{image}: no fine annotation at {mask}; the folder must follow the official "
                                      f"Cityscapes layout (leftImg8bit/ and gtFine/)")
            frames[f"{city}/{stem}"] = (image, mask, city)
    if not frames:
        raise PatchAtlasError(f"{root}: no Cityscapes frames found under leftImg8bit/train or leftImg8bit/val; "
                              f"pass --source-option path=/path/to/cityscapes")
    return frames


def paper_cityscapes_source(path: str = "", seed: int = 0) -> SegmentationSource:
    if not path:
        raise PatchAtlasError("paper-cityscapes needs the Cityscapes folder: --source-option path=/path/to/cityscapes")
    root = Path(path).expanduser()
    frames = find_cityscapes_frames(root)
    train_ids, val_ids = cityscapes_72_30_split([(image_id, city) for image_id, (_, _, city) in frames.items()],
                                                seed=seed)
    layout = HUB_DATASETS["cityscapes"]
    lut = label_lut(layout.label_map, 255)
    rows = {"image_id": [], "image": [], "mask": []}
    digest = hashlib.sha256(f"{seed}".encode())
    for image_id in train_ids + val_ids:
        image_path, mask_path, _ = frames[image_id]
        digest.update(image_id.encode())
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = remap_mask(np.asarray(Image.open(mask_path)), lut)
        tiles = tile_256(image, mask, ignore_index=255)
        for index, (tile_image, tile_mask) in enumerate(zip(tiles.images, tiles.masks)):
            row, col = divmod(index, tiles.grid[1])
            rows["image_id"].append(f"{image_id}-r{row}c{col}")
            rows["image"].append(png_cell(tile_image))
            rows["mask"].append(png_cell(tile_mask.astype(np.uint8)))
    tiles_per_image = len(rows["image_id"]) // max(1, len(train_ids) + len(val_ids))
    return SegmentationSource(
        name=PAPER_CITYSCAPES_NAME, dataset=datasets.Dataset.from_dict(rows, features=SOURCE_FEATURES),
        classes=list(layout.classes), ignore_index=255, revision=digest.hexdigest()[:12], license=layout.license,
        description="Cityscapes few-shot protocol of the local-representations paper: 72 train images "
                    "(4 per train city) and 30 val images (10 per val city), tiled 4×8 at 256 px (each model "
                    "resizes the tiles to its input).",
        params={"path": str(root), "seed": seed}, probe_train_count=len(train_ids) * tiles_per_image,
    )
