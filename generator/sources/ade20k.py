"""ADE20K as a few-shot protocol (the `paper-ade20k` preset).

From the official ``ADEChallengeData2016`` layout (``images/{training,validation}/<id>.jpg`` and
``annotations/{training,validation}/<id>.png``): ``n_train`` images drawn from the training
split and ``n_val`` from the validation split (72/30 by default, the size of the Cityscapes
protocol), seeded. Annotations hold 1..150 for the benchmark's classes and 0 for "other"; they
are mapped to class ids 0..149 and "other" to the ignore label. Images keep their own size: the
encoders resize every image to their input. The train images come first, so the few-shot split
trains on exactly them.
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
from generator.sources.local_folder import _open_decoded, image_to_rgb, mask_to_ids
from generator.sources.presets import ade20k_train_val_split

PAPER_ADE20K_NAME = "paper-ade20k"
ADE20K_SPLITS = ("training", "validation")
LAYOUT_HINT = ("the folder must follow the official ADEChallengeData2016 layout: images/{training,validation}/"
               "<id>.jpg with annotations/{training,validation}/<id>.png")


def find_ade20k_frames(root: Path) -> dict[str, dict[str, tuple[Path, Path]]]:
    """split ("training" | "validation") → image id (file stem) → (image path, annotation path)."""
    frames: dict[str, dict[str, tuple[Path, Path]]] = {}
    for split in ADE20K_SPLITS:
        frames[split] = {}
        for image in sorted((root / "images" / split).glob("*.jpg")):
            annotation = root / "annotations" / split / f"{image.stem}.png"
            if not annotation.is_file():
                raise PatchAtlasError(f"{image}: no annotation at {annotation}; {LAYOUT_HINT}")
            frames[split][image.stem] = (image, annotation)
    if not any(frames.values()):
        raise PatchAtlasError(f"{root}: no ADE20K images found under images/training or images/validation; "
                              f"pass --source-option path=/path/to/ADEChallengeData2016 ({LAYOUT_HINT})")
    return frames


def _check_available(frames: dict[str, dict[str, tuple[Path, Path]]], root: Path, n_train, n_val) -> None:
    for split, wanted, option in (("training", n_train, "n_train"), ("validation", n_val, "n_val")):
        have = len(frames[split])
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > have:
            raise PatchAtlasError(f"{option}={wanted}: {root / 'images' / split} holds only {have} images "
                                  f"(training {len(frames['training'])}, validation {len(frames['validation'])}); "
                                  f"lower --source-option {option}=... or add images")


def _image_cell(path: Path) -> dict:
    """An 8-bit RGB JPEG is kept by path (its bytes untouched); grey or CMYK ones become RGB PNGs."""
    img = _open_decoded(path, "image")
    if img.mode == "RGB":
        return {"path": str(path), "bytes": None}
    return png_cell(np.asarray(image_to_rgb(img, str(path))))


def _mask_cell(image_path: Path, annotation_path: Path, lut: np.ndarray) -> dict:
    annotation = _open_decoded(annotation_path, "annotation")
    with Image.open(image_path) as img:
        image_size = img.size
    if annotation.size != image_size:
        raise PatchAtlasError(f"{annotation_path}: annotation is {annotation.size[0]}x{annotation.size[1]} but its "
                              f"image {image_path} is {image_size[0]}x{image_size[1]} (width x height); "
                              "annotations must match their images pixel for pixel")
    ids = remap_mask(mask_to_ids(annotation, str(annotation_path)), lut)
    return png_cell(ids.astype(np.uint8))


def paper_ade20k_source(path: str = "", n_train: int = 72, n_val: int = 30, seed: int = 0) -> SegmentationSource:
    if not path:
        raise PatchAtlasError("paper-ade20k needs the ADE20K folder: "
                              "--source-option path=/path/to/ADEChallengeData2016")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PatchAtlasError(f"{root}: folder not found; pass --source-option path=/path/to/ADEChallengeData2016")
    frames = find_ade20k_frames(root)
    _check_available(frames, root, n_train, n_val)
    train_ids, val_ids = ade20k_train_val_split(frames["training"], frames["validation"], n_train, n_val, seed)
    layout = HUB_DATASETS["ade20k"]
    lut = label_lut(layout.label_map, 255)
    rows = {"image_id": [], "image": [], "mask": []}
    digest = hashlib.sha256(f"{seed}".encode())
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        for image_id in ids:
            image_path, annotation_path = frames[split][image_id]
            digest.update(f"{split}/{image_id}".encode())
            rows["image_id"].append(image_id)
            rows["image"].append(_image_cell(image_path))
            rows["mask"].append(_mask_cell(image_path, annotation_path, lut))
    return SegmentationSource(
        name=PAPER_ADE20K_NAME, dataset=datasets.Dataset.from_dict(rows, features=SOURCE_FEATURES),
        classes=list(layout.classes), ignore_index=255, revision=digest.hexdigest()[:12], license=layout.license,
        description=f"ADE20K few-shot protocol: {len(train_ids)} train images drawn from the training split and "
                    f"{len(val_ids)} val images from the validation split (seed {seed}), 150 classes with "
                    "'other' ignored; images kept at their own size (each encoder resizes to its input).",
        params={"path": str(root), "n_train": len(train_ids), "n_val": len(val_ids), "seed": seed},
        probe_train_count=len(train_ids),
    )
