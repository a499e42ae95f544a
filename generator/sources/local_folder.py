"""A local folder of images and class masks as a segmentation source.

Layout (names of the three parts are parameters)::

    <path>/
      classes.json          [{"id": 0, "name": "road", "super_name": "flat", "is_background": true}, ...]
      images/<stem>.jpg     (.jpg, .jpeg or .png; sub-folders allowed, e.g. images/<city>/<stem>.png)
      masks/<stem>.png      one single-channel PNG per image, same relative path and stem

A mask's pixel values are class ids from ``classes.json``, or the ignore index where a pixel is
unlabelled. Palette PNGs are read by their indices (never their colours), so a VOC-style
palette mask whose indices are class ids works as is; colour-coded RGB masks are rejected,
because a colour is not a class id until someone says which.

Everything is checked when the source is loaded, so a bad file is named up front rather than
failing deep inside an extraction. Two kinds of problem are told apart:

- the folder's layout (a missing images/ or masks/ folder, an image without a mask or the
  reverse, a file that is not .jpg/.jpeg/.png, a colour-coded mask, a bad classes.json) is an
  error: the folder as a whole is not what the source reads, and guessing would be worse;
- one unusable pair (an image or mask that does not decode or is truncated, an image beyond the
  decompression-bomb limit or smaller than ``min_side`` pixels, a mask of another size than its
  image, a mask holding values that are neither a class id nor the ignore index) is skipped: the
  source keeps the other images and records each skipped file with its reason in
  ``source.skipped``, which the build summary and the dataset page show. Mask values outside the
  class list are skipped rather than mapped to the ignore index because they usually mean the
  class list or the mask is wrong, and silently ignoring such pixels would bias every score.
  A folder all of whose pairs are skipped is an error listing the first reasons.

Image modes are converted to 8-bit RGB by ``generator.sources.images`` (shared with the Hub
source). The revision is a hash of every file the source reads, so it changes whenever any
image, mask or the class list changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.hashing import file_sha256
from generator.png import mask_png_bytes, png_cell
from generator.sources.base import SOURCE_FEATURES, ClassInfo, SegmentationSource
from generator.sources.images import (
    DEFAULT_MAX_PIXELS,
    MIN_IMAGE_SIDE,
    UnusableImage,
    check_image_limits,
    check_min_side,
    no_usable_images,
    open_image,
    revision_with_skips,
    shown,
    stray_labels,
    to_rgb8,
)

LOCAL_FOLDER_NAME = "local-folder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".png"
# Single-channel modes whose pixel values can be class ids as stored.
_INDEX_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")

CLASSES_EXAMPLE = ('[{"id": 0, "name": "road", "super_name": "flat", "is_background": true}, '
                   '{"id": 1, "name": "car", "super_name": "vehicle", "is_background": false}]')


# ---------------------------------------------------------------------------------------------
# Hashing

def folder_revision(root: Path, files: list[Path]) -> str:
    """sha256 over (relative path, size, content sha256) of ``files``, in path order; 12 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        record = json.dumps([path.relative_to(root).as_posix(), path.stat().st_size, file_sha256(path)])
        digest.update(record.encode("utf-8") + b"\n")
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Class list

def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise PatchAtlasError(f"{what}={value!r}: expected an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PatchAtlasError(f"{what}={value!r}: expected an integer") from None
    if str(value).strip() != str(number) and number != value:
        raise PatchAtlasError(f"{what}={value!r}: expected an integer")
    return number


def parse_classes(entries, ignore_index: int, where: str) -> list[ClassInfo]:
    """Check a classes.json list and turn it into ``ClassInfo`` rows sorted by id."""
    hint = f"; it must be a JSON list like {CLASSES_EXAMPLE}"
    if not isinstance(entries, list) or not entries:
        raise PatchAtlasError(f"{where}: expected a non-empty list of classes{hint}")
    classes, ids, names = [], set(), set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            raise PatchAtlasError(f"{where}: entry {i} ({entry!r}) needs at least \"id\" and \"name\"{hint}")
        unknown = sorted(set(entry) - {"id", "name", "super_name", "is_background"})
        if unknown:
            raise PatchAtlasError(f"{where}: entry {i} has unknown keys {unknown}; "
                                  "allowed: id, name, super_name, is_background")
        cid = _as_int(entry["id"], f"{where}: entry {i} id")
        name = entry["name"]
        super_name = entry.get("super_name", name)
        is_background = entry.get("is_background", False)
        if not isinstance(name, str) or not name or not isinstance(super_name, str) or not super_name:
            raise PatchAtlasError(f"{where}: entry {i}: name and super_name must be non-empty strings")
        if not isinstance(is_background, bool):
            raise PatchAtlasError(f"{where}: entry {i}: is_background must be true or false")
        if cid < 0 or cid == ignore_index:
            raise PatchAtlasError(f"{where}: class {name!r} has id {cid}; ids must be >= 0 and differ from the "
                                  f"ignore index {ignore_index}")
        if cid in ids or name in names:
            raise PatchAtlasError(f"{where}: class id {cid} or name {name!r} appears twice; ids and names must be unique")
        ids.add(cid)
        names.add(name)
        classes.append(ClassInfo(cid, name, super_name, is_background))
    return sorted(classes, key=lambda c: c.id)


def _read_classes(path: Path, ignore_index: int) -> list[ClassInfo]:
    if not path.is_file():
        raise PatchAtlasError(f"{path}: class list not found; write it as a JSON list like {CLASSES_EXAMPLE}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PatchAtlasError(f"{path}: not valid JSON ({err}); it must be a list like {CLASSES_EXAMPLE}") from None
    return parse_classes(entries, ignore_index, str(path))


# ---------------------------------------------------------------------------------------------
# Pixels (pure: PIL image in, array / PIL image out)

def image_to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """An 8-bit RGB copy of ``img``: grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit inputs."""
    return to_rgb8(img, where)


def mask_to_ids(mask: Image.Image, where: str = "mask") -> np.ndarray:
    """The class ids of a single-channel mask ([H, W] integers); palette masks give their indices."""
    if mask.mode not in _INDEX_MODES:
        raise PatchAtlasError(
            f"{where}: mask has mode {mask.mode} ({len(mask.getbands())} channels); a mask must be a single-channel "
            "PNG whose pixel values are class ids (mode L, a palette PNG, or 16-bit). Colour-coded masks must be "
            "converted to class ids first")
    ids = np.asarray(mask)
    if ids.dtype == bool:
        ids = ids.astype(np.uint8)
    return ids


def check_mask_values(ids: np.ndarray, class_ids: set[int], ignore_index: int, where: str) -> None:
    stray = stray_labels(ids, class_ids, ignore_index)
    if stray:
        raise UnusableImage(where, f"mask values {shown(stray)} are neither class ids in classes.json nor the "
                                   f"ignore index {ignore_index}; add them to classes.json or set them to "
                                   f"{ignore_index}")


def _open_decoded(path: Path, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    return open_image(path, str(path), max_pixels=max_pixels, what=what)


def _pair_cells(image_path: Path, mask_path: Path, class_ids: set[int], ignore_index: int, max_pixels: int,
                min_side: int) -> tuple[dict, dict]:
    """The stored image and mask cells of one pair; ``UnusableImage`` when the pair cannot be used."""
    img = _open_decoded(image_path, "image", max_pixels)
    check_min_side(img, str(image_path), min_side)
    mask = _open_decoded(mask_path, "mask", max_pixels)
    if img.size != mask.size:
        raise UnusableImage(str(mask_path), f"mask is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                                            f"{img.size[0]}x{img.size[1]} (width x height); masks must match their "
                                            "images pixel for pixel")
    mask_ids = mask_to_ids(mask, str(mask_path))
    check_mask_values(mask_ids, class_ids, ignore_index, str(mask_path))
    rgb = to_rgb8(img, str(image_path))
    # An 8-bit RGB file is kept by path (decoded on use); anything converted is stored as PNG.
    image_cell = {"path": str(image_path), "bytes": None} if img.mode == "RGB" else png_cell(rgb)
    return image_cell, {"path": None, "bytes": mask_png_bytes(mask_ids)}


# ---------------------------------------------------------------------------------------------
# Folder scan

def _stem_key(root: Path, path: Path) -> str:
    """The image id: the path below ``root`` without its suffix (``city/frame`` for nested folders)."""
    return path.relative_to(root).with_suffix("").as_posix()


def _scan(root: Path, suffixes: tuple[str, ...], what: str, hint: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # hidden files (.DS_Store, editor swap files) are not data
        if path.suffix.lower() not in suffixes:
            raise PatchAtlasError(f"{path}: not a {what} file ({hint}); move it out of {root}")
        key = _stem_key(root, path)
        if key in found:
            raise PatchAtlasError(f"{path} and {found[key]}: two {what} files with the same name; keep one")
        found[key] = path
    return found


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or LOCAL_FOLDER_NAME


def local_folder_source(
    path: str,
    images: str = "images",
    masks: str = "masks",
    classes: str = "classes.json",
    ignore_index: int = 255,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> SegmentationSource:
    """The folder ``path`` (images/, masks/, classes.json) as a segmentation source, fully checked.

    Unusable pairs are skipped and listed in ``source.skipped``; ``max_pixels`` is the
    decompression-bomb limit and ``min_side`` the smallest image side accepted.
    """
    import datasets

    if not path:
        raise PatchAtlasError(f"source {LOCAL_FOLDER_NAME!r} needs a folder: pass "
                              "`--source local-folder --source-option path=/path/to/folder`")
    ignore_index = _as_int(ignore_index, "ignore_index")
    max_pixels, min_side = check_image_limits(max_pixels, min_side)
    if not 0 <= ignore_index <= 65535:
        raise PatchAtlasError(f"ignore_index={ignore_index}: must lie in 0..65535 (a mask pixel value)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PatchAtlasError(f"{root}: folder not found; pass an existing folder holding {images}/, {masks}/ "
                              f"and {classes}")
    image_dir, mask_dir, classes_path = root / images, root / masks, root / classes
    for folder, what in ((image_dir, "images"), (mask_dir, "masks")):
        if not folder.is_dir():
            raise PatchAtlasError(f"{folder}: {what} folder not found; put the {what} in {folder} "
                                  f"(or name another folder with --source-option {what}=...)")
    class_list = _read_classes(classes_path, ignore_index)
    class_ids = {c.id for c in class_list}

    image_files = _scan(image_dir, IMAGE_SUFFIXES, "image", "images must be .jpg, .jpeg or .png")
    mask_files = _scan(mask_dir, (MASK_SUFFIX,), "mask", "masks must be lossless .png files")
    if not image_files:
        raise PatchAtlasError(f"{image_dir}: no images found; add .jpg/.jpeg/.png images with a mask of the same "
                              f"name in {mask_dir}")
    for key, file in image_files.items():
        if key not in mask_files:
            raise PatchAtlasError(f"{file}: image without a mask; add {mask_dir / (key + MASK_SUFFIX)} or remove "
                                  "the image")
    for key, file in mask_files.items():
        if key not in image_files:
            raise PatchAtlasError(f"{file}: mask without an image; add {image_dir / key}.jpg (or .png) or remove "
                                  "the mask")

    source_name = _slug(name) if name else _slug(f"local-{root.resolve().name}")
    ids, image_cells, mask_cells, skipped = [], [], [], []
    for key in sorted(image_files):
        try:
            image_cell, mask_cell = _pair_cells(image_files[key], mask_files[key], class_ids, ignore_index,
                                                max_pixels, min_side)
        except UnusableImage as err:
            skipped.append(err.record())
            continue
        image_cells.append(image_cell)
        mask_cells.append(mask_cell)
        ids.append(key)
    if not ids:
        raise no_usable_images(source_name, skipped, str(root))

    revision = revision_with_skips(
        folder_revision(root, [classes_path, *image_files.values(), *mask_files.values()]), skipped)
    dataset = datasets.Dataset.from_dict({"image_id": ids, "image": image_cells, "mask": mask_cells},
                                         features=SOURCE_FEATURES)
    return SegmentationSource(
        name=source_name,
        dataset=dataset,
        classes=class_list,
        ignore_index=ignore_index,
        revision=revision,
        license="unknown",
        # The folder's own name only: the description is published, its absolute path is not.
        description=f"Images and class masks from the local folder {root.name} ({len(ids)} images"
                    + (f", {len(skipped)} skipped" if skipped else "") + ").",
        params={"path": str(root), "images": images, "masks": masks, "classes": classes,
                "ignore_index": ignore_index, "max_pixels": max_pixels, "min_side": min_side},
        skipped=skipped,
    )
