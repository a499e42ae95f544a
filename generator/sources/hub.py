"""Segmentation datasets on the Hugging Face Hub as sources.

``hub_source`` loads one split with ``datasets.load_dataset`` and reshapes it to the source
contract: an ``image_id`` column, the image as ``image``, and the mask as ``mask`` holding the
atlas's class ids (raw label values are remapped through a lookup table where a dataset stores
something else, e.g. Cityscapes label ids or ADE20K's 0 = "other").

``HUB_DATASETS`` holds the layouts of the datasets the atlas knows, with their class lists
typed out from the official definitions:

- ``ade20k``: the 150 classes of the ADE20K scene-parsing benchmark (``objectInfo150``), stored
  as 1..150 with 0 for "other"; the atlas uses ids 0..149 and ignores "other".
- ``cityscapes``: the 19 evaluation classes of cityscapesScripts' ``labels.py``; masks store
  label ids (0..33, -1 for the licence plate), mapped to train ids, everything else to 255.
- ``pascal-voc``: the 21 classes of PASCAL VOC 2012 segmentation (background + 20), 255 on
  object borders and "difficult" regions.

Without a network (or with ``HF_HUB_OFFLINE=1`` and no cached copy) loading fails at once with
a message that points to the local-folder source, instead of retrying for half a minute.

Every row's image is decoded once when the source is loaded (``generator.sources.images``: any
mode to 8-bit RGB, a decompression-bomb limit, a smallest side). A row that cannot be used (an
image that does not decode or breaks a limit, a mask of another size, mask values outside the
class list) is skipped and recorded in ``source.skipped``, as in the local-folder source.
"""

from __future__ import annotations

import io
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.png import mask_png_bytes, png_bytes
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

HUB_SOURCE_NAME = "hub"
_PROBE_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------------
# Class tables

# ADE20K SceneParsing objectInfo150, in index order 1..150 (first name of each entry). The
# benchmark defines no super classes, so each class is its own.
ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)
ADE20K_CLASSES: tuple[ClassInfo, ...] = tuple(ClassInfo(i, name, name) for i, name in enumerate(ADE20K_CLASS_NAMES))


@dataclass(frozen=True)
class CityscapesLabel:
    """One row of cityscapesScripts ``labels.py`` (the fields the atlas uses)."""

    name: str
    id: int
    train_id: int
    category: str
    has_instances: bool


# cityscapesScripts/cityscapesscripts/helpers/labels.py: name, id, trainId, category, hasInstances.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, "void", False),
    CityscapesLabel("ego vehicle", 1, 255, "void", False),
    CityscapesLabel("rectification border", 2, 255, "void", False),
    CityscapesLabel("out of roi", 3, 255, "void", False),
    CityscapesLabel("static", 4, 255, "void", False),
    CityscapesLabel("dynamic", 5, 255, "void", False),
    CityscapesLabel("ground", 6, 255, "void", False),
    CityscapesLabel("road", 7, 0, "flat", False),
    CityscapesLabel("sidewalk", 8, 1, "flat", False),
    CityscapesLabel("parking", 9, 255, "flat", False),
    CityscapesLabel("rail track", 10, 255, "flat", False),
    CityscapesLabel("building", 11, 2, "construction", False),
    CityscapesLabel("wall", 12, 3, "construction", False),
    CityscapesLabel("fence", 13, 4, "construction", False),
    CityscapesLabel("guard rail", 14, 255, "construction", False),
    CityscapesLabel("bridge", 15, 255, "construction", False),
    CityscapesLabel("tunnel", 16, 255, "construction", False),
    CityscapesLabel("pole", 17, 5, "object", False),
    CityscapesLabel("polegroup", 18, 255, "object", False),
    CityscapesLabel("traffic light", 19, 6, "object", False),
    CityscapesLabel("traffic sign", 20, 7, "object", False),
    CityscapesLabel("vegetation", 21, 8, "nature", False),
    CityscapesLabel("terrain", 22, 9, "nature", False),
    CityscapesLabel("sky", 23, 10, "sky", False),
    CityscapesLabel("person", 24, 11, "human", True),
    CityscapesLabel("rider", 25, 12, "human", True),
    CityscapesLabel("car", 26, 13, "vehicle", True),
    CityscapesLabel("truck", 27, 14, "vehicle", True),
    CityscapesLabel("bus", 28, 15, "vehicle", True),
    CityscapesLabel("caravan", 29, 255, "vehicle", True),
    CityscapesLabel("trailer", 30, 255, "vehicle", True),
    CityscapesLabel("train", 31, 16, "vehicle", True),
    CityscapesLabel("motorcycle", 32, 17, "vehicle", True),
    CityscapesLabel("bicycle", 33, 18, "vehicle", True),
    CityscapesLabel("license plate", -1, -1, "vehicle", False),
)
# The 19 evaluation classes in train-id order; the category is the super class, and classes
# without instances (road, building, sky, ...) are the background "stuff".
CITYSCAPES_CLASSES: tuple[ClassInfo, ...] = tuple(
    ClassInfo(label.train_id, label.name, label.category, is_background=not label.has_instances)
    for label in sorted(CITYSCAPES_LABELS, key=lambda label: label.train_id)
    if 0 <= label.train_id < 255
)

# PASCAL VOC 2012, class indices 0..20; the devkit groups the 20 object classes into person,
# animal, vehicle and indoor.
VOC_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(0, "background", "background", is_background=True),
    ClassInfo(1, "aeroplane", "vehicle"),
    ClassInfo(2, "bicycle", "vehicle"),
    ClassInfo(3, "bird", "animal"),
    ClassInfo(4, "boat", "vehicle"),
    ClassInfo(5, "bottle", "indoor"),
    ClassInfo(6, "bus", "vehicle"),
    ClassInfo(7, "car", "vehicle"),
    ClassInfo(8, "cat", "animal"),
    ClassInfo(9, "chair", "indoor"),
    ClassInfo(10, "cow", "animal"),
    ClassInfo(11, "diningtable", "indoor"),
    ClassInfo(12, "dog", "animal"),
    ClassInfo(13, "horse", "animal"),
    ClassInfo(14, "motorbike", "vehicle"),
    ClassInfo(15, "person", "person"),
    ClassInfo(16, "pottedplant", "indoor"),
    ClassInfo(17, "sheep", "animal"),
    ClassInfo(18, "sofa", "indoor"),
    ClassInfo(19, "train", "vehicle"),
    ClassInfo(20, "tvmonitor", "indoor"),
)


# ---------------------------------------------------------------------------------------------
# Layouts

@dataclass(frozen=True)
class HubLayout:
    """How one dataset stores its segmentation: columns, classes and the raw-value -> class-id map.

    ``label_map`` lists (raw mask value, class id) pairs; raw values not listed become
    ``ignore_index``. ``None`` means the raw values already are class ids.
    """

    name: str
    classes: tuple[ClassInfo, ...]
    mask_column: str
    image_column: str = "image"
    label_map: tuple[tuple[int, int], ...] | None = None
    ignore_index: int = 255
    default_split: str = "validation"
    repo_ids: tuple[str, ...] = ()
    license: str = "unknown"
    description: str = ""


HUB_DATASETS: dict[str, HubLayout] = {
    layout.name: layout
    for layout in (
        HubLayout(
            "ade20k", ADE20K_CLASSES, mask_column="annotation",
            label_map=tuple((raw, raw - 1) for raw in range(1, 151)),
            repo_ids=("scene_parse_150", "zhoubolei/scene_parse_150"),
            license="BSD-3-Clause (annotations); images under their own terms",
            description="ADE20K scene parsing, 150 classes (MIT Scene Parsing Benchmark); 'other' is ignored.",
        ),
        HubLayout(
            "cityscapes", CITYSCAPES_CLASSES, mask_column="semantic_segmentation",
            label_map=tuple((label.id, label.train_id) for label in CITYSCAPES_LABELS
                            if label.id >= 0 and 0 <= label.train_id < 255),
            license="Cityscapes terms of use (non-commercial research)",
            description="Cityscapes fine annotations, 19 evaluation classes (label ids mapped to train ids).",
        ),
        HubLayout(
            "pascal-voc", VOC_CLASSES, mask_column="mask",
            label_map=None, default_split="validation",
            license="PASCAL VOC: Flickr terms of use (images)",
            description="PASCAL VOC 2012 segmentation, background + 20 classes, 255 on object borders.",
        ),
    )
}


def layout_for_repo(repo_id: str) -> HubLayout | None:
    for layout in HUB_DATASETS.values():
        if repo_id in layout.repo_ids:
            return layout
    return None


def label_lut(label_map: Sequence[tuple[int, int]] | None, ignore_index: int, size: int = 65536) -> np.ndarray | None:
    """A lookup table raw value -> class id (unlisted values -> ``ignore_index``); ``None`` if no map."""
    if label_map is None:
        return None
    lut = np.full(size, ignore_index, dtype=np.int32)
    for raw, cid in label_map:
        if not 0 <= raw < size:
            raise PatchAtlasError(f"label map entry {raw} -> {cid}: raw values must lie in 0..{size - 1}")
        lut[raw] = cid
    return lut


def remap_mask(raw: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """Class ids of a raw mask through ``lut`` (pure); identity when ``lut`` is None."""
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise PatchAtlasError(f"mask of shape {raw.shape}: expected a single-channel [H, W] mask of label values")
    if lut is None:
        return raw
    if raw.min(initial=0) < 0 or raw.max(initial=0) >= len(lut):
        raise PatchAtlasError(f"mask values span {raw.min()}..{raw.max()}: outside the label map's 0..{len(lut) - 1}")
    return lut[raw.astype(np.int64)]


# ---------------------------------------------------------------------------------------------
# Reaching the Hub

def _offline_flag() -> bool:
    """Whether the Hub is switched off, by environment or by the libraries' own constants."""
    flags = [os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"),
             os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")]
    try:
        import huggingface_hub.constants as hub_constants
        flags.append(bool(hub_constants.HF_HUB_OFFLINE))
    except ImportError:
        pass
    try:
        import datasets.config as datasets_config
        flags.append(bool(getattr(datasets_config, "HF_HUB_OFFLINE", False)))
    except ImportError:
        pass
    return any(flags)


def _hub_endpoint() -> str:
    try:
        import huggingface_hub.constants as hub_constants
        return hub_constants.ENDPOINT
    except (ImportError, AttributeError):
        return "https://huggingface.co"


@dataclass(frozen=True)
class HubProbe:
    """What one connection attempt to the Hub endpoint found."""

    endpoint: str
    reachable: bool
    latency_s: float  # time to connect, or to fail
    error: str = ""  # why it failed; "" when reachable

    def describe(self) -> str:
        if self.reachable:
            return f"reachable at {self.endpoint} ({self.latency_s * 1000:.0f} ms)"
        return f"unreachable at {self.endpoint} ({self.error}, after {self.latency_s:.1f} s)"


# One probe per endpoint and process: every model and dataset of a run shares the answer.
_PROBES: dict[tuple[str, float], HubProbe] = {}


def probe_hub(endpoint: str | None = None, timeout_s: float = _PROBE_TIMEOUT_S, *, fresh: bool = False) -> HubProbe:
    """One TCP connection to the Hub endpoint, cached for the process.

    Without a network the Hub clients retry every file for ~25 s (~55 s per timm model); one
    short connection says the same at once.
    """
    endpoint = endpoint or _hub_endpoint()
    key = (endpoint, timeout_s)
    if fresh or key not in _PROBES:
        url = urlparse(endpoint)
        host = url.hostname or "huggingface.co"
        port = url.port or (443 if url.scheme != "http" else 80)
        start = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                error = ""
        except OSError as err:
            error = f"{type(err).__name__}: {err.strerror or err}" if not isinstance(err, TimeoutError) else \
                f"no answer within {timeout_s:g} s"
        _PROBES[key] = HubProbe(endpoint, not error, time.perf_counter() - start, error)
    return _PROBES[key]


def hub_reachable(endpoint: str | None = None, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    return probe_hub(endpoint, timeout_s).reachable


def _unavailable(repo_id: str, reason: str) -> PatchAtlasError:
    return PatchAtlasError(
        f"Hub dataset {repo_id!r} cannot be loaded: {reason}. Download it where there is a network (it is then "
        f"read from the Hugging Face cache with HF_HUB_OFFLINE=1), or export its images and class masks to a "
        f"folder and use the local-folder source: `--source local-folder --source-option path=/path/to/folder`")


def _load_split(repo_id: str, split: str, revision: str | None, config: str | None):
    import datasets

    offline = _offline_flag()
    if not offline and not hub_reachable():
        raise _unavailable(repo_id, f"the Hub ({_hub_endpoint()}) is unreachable (no network?); to use a cached "
                                    "copy, set HF_HUB_OFFLINE=1")
    try:
        return datasets.load_dataset(repo_id, config, split=split, revision=revision)
    except PatchAtlasError:
        raise
    except (ConnectionError, OSError, FileNotFoundError) as err:
        reason = "offline mode is on and no copy is cached" if offline else f"{type(err).__name__}: {err}"
        raise _unavailable(repo_id, reason) from None
    except ValueError as err:
        # datasets raises ValueError for an unknown split or config.
        raise PatchAtlasError(f"Hub dataset {repo_id!r}: {err}; check --source-option split=... / config=...") from None
    except Exception as err:  # the Hub client's own errors (gated, not found, ...) share no base class
        raise _unavailable(repo_id, f"{type(err).__name__}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Reshaping to the source contract

def _mask_ids(mask: Any, repo_id: str, index: int) -> np.ndarray:
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "P", "I", "I;16", "1"):
            raise PatchAtlasError(f"Hub dataset {repo_id!r}, row {index}: mask has mode {mask.mode}; expected a "
                                  "single-channel mask of label values (is --source-option mask_column right?)")
        return np.asarray(mask)
    return np.asarray(mask)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-.") or HUB_SOURCE_NAME


def _image_cell(image: Any, where: str, max_pixels: int, min_side: int) -> tuple[Any, tuple[int, int]]:
    """The stored image cell of one row and its size (width, height); ``UnusableImage`` if unusable.

    An encoded 8-bit RGB image passes through untouched (re-encoding would recompress a JPEG);
    any other mode is converted and stored as PNG.
    """
    if isinstance(image, Image.Image):
        img, encoded = image, None
    elif isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        encoded = image
        img = open_image(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"], where,
                         max_pixels=max_pixels)
    else:
        raise UnusableImage(where, f"no image in this row (got {type(image).__name__})")
    check_min_side(img, where, min_side)
    if img.mode == "RGB" and encoded is not None:
        return {"bytes": encoded.get("bytes"), "path": encoded.get("path")}, img.size
    return {"bytes": png_bytes(to_rgb8(img, where)), "path": None}, img.size


def shape_hub_dataset(raw, repo_id: str, split: str, image_column: str, mask_column: str,
                      lut: np.ndarray | None, id_column: str | None = None, *, class_ids: set[int] | None = None,
                      ignore_index: int = 255, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_IMAGE_SIDE):
    """``raw`` (a loaded split) as the contract's three columns, masks remapped to class ids.

    Returns the dataset of the usable rows and the skipped ones (``{"path", "reason"}`` each).
    """
    import datasets

    missing = [c for c in (image_column, mask_column, id_column) if c and c not in raw.column_names]
    if missing:
        raise PatchAtlasError(f"Hub dataset {repo_id!r} split {split!r} has no column {', '.join(map(repr, missing))}; "
                              f"its columns are {', '.join(raw.column_names)}: set --source-option "
                              "image_column=... / mask_column=...")
    features = datasets.Features({**SOURCE_FEATURES, "skip_reason": datasets.Value("string")})

    if isinstance(raw.features.get(image_column), datasets.Image):
        # Pass the encoded image through untouched: decoding and re-encoding would recompress JPEGs.
        raw = raw.cast_column(image_column, datasets.Image(decode=False))

    def convert(row, index):
        image_id = str(row[id_column]) if id_column else f"{split}-{index:06d}"
        where = f"{repo_id} split {split} row {index} ({image_id})"
        raw_ids = _mask_ids(row[mask_column], repo_id, index)  # a wrong mask column is an error, not a skip
        try:
            image, (width, height) = _image_cell(row[image_column], where, max_pixels, min_side)
            try:
                ids = remap_mask(raw_ids, lut)
            except PatchAtlasError as err:
                raise UnusableImage(where, str(err)) from None
            if ids.shape != (height, width):
                raise UnusableImage(where, f"mask is {ids.shape[1]}x{ids.shape[0]} but the image is {width}x{height} "
                                           "(width x height); masks must match their images pixel for pixel")
            stray = stray_labels(ids, class_ids, ignore_index) if class_ids is not None else []
            if stray:
                raise UnusableImage(where, f"mask values {shown(stray)} are neither class ids of the layout nor the "
                                           f"ignore index {ignore_index}; check --source-option classes=...")
        except UnusableImage as err:
            return {"image_id": image_id, "image": None, "mask": None, "skip_reason": err.reason}
        return {"image_id": image_id, "image": image, "mask": {"bytes": mask_png_bytes(ids), "path": None},
                "skip_reason": ""}

    shaped = raw.map(convert, with_indices=True, remove_columns=raw.column_names, features=features,
                     desc=f"{repo_id} masks -> class ids")
    reasons = shaped["skip_reason"]
    skipped = [{"path": f"{repo_id} split {split} row {i} ({image_id})", "reason": reason}
               for i, (image_id, reason) in enumerate(zip(shaped["image_id"], reasons)) if reason]
    if skipped:
        shaped = shaped.filter(lambda reason: not reason, input_columns="skip_reason")
    return shaped.remove_columns("skip_reason"), skipped


def hub_source(
    repo_id: str,
    split: str = "validation",
    image_column: str | None = None,
    mask_column: str | None = None,
    classes: str | Sequence[ClassInfo] | None = None,
    revision: str | None = None,
    config: str | None = None,
    id_column: str | None = None,
    ignore_index: int | None = None,
    limit: int | None = None,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> SegmentationSource:
    """Split ``split`` of Hub dataset ``repo_id`` as a segmentation source.

    ``classes`` names a layout of ``HUB_DATASETS`` (``"ade20k"``, ``"cityscapes"``,
    ``"pascal-voc"``) or gives the class list itself (raw mask values are then the class ids).
    Known repositories (e.g. ``scene_parse_150``) find their layout without it. Columns default
    to the layout's; ``limit`` keeps the first ``limit`` rows. Unusable rows are skipped and
    listed in ``source.skipped``; ``max_pixels`` is the decompression-bomb limit and ``min_side``
    the smallest image side accepted.
    """
    # Command-line options arrive as strings or ints; "" means "not given".
    revision, config, id_column = (str(v) if v not in (None, "") else None for v in (revision, config, id_column))
    image_column, mask_column = (str(v) if v not in (None, "") else None for v in (image_column, mask_column))
    if classes == "":
        classes = None
    if not repo_id:
        raise PatchAtlasError("hub source needs a dataset id: `--source hub --source-option repo_id=owner/name`")
    if isinstance(classes, str):
        if classes not in HUB_DATASETS:
            raise PatchAtlasError(f"classes={classes!r}: not a known layout; known: {', '.join(sorted(HUB_DATASETS))}")
        layout = HUB_DATASETS[classes]
    elif classes is None:
        layout = layout_for_repo(repo_id)
        if layout is None:
            raise PatchAtlasError(
                f"Hub dataset {repo_id!r} has no known layout: pass classes= one of {', '.join(sorted(HUB_DATASETS))} "
                "(and mask_column=... if the mask column differs), or export it to a folder for the local-folder source")
    else:
        class_list = tuple(classes)
        if not class_list or not all(isinstance(c, ClassInfo) for c in class_list):
            raise PatchAtlasError("classes: expected a layout name or a non-empty list of ClassInfo")
        layout = HubLayout("custom", class_list, mask_column=mask_column or "mask")
    ignore = layout.ignore_index if ignore_index is None else int(ignore_index)
    image_column = image_column or layout.image_column
    mask_column = mask_column or layout.mask_column
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise PatchAtlasError(f"limit={limit!r}: must be a positive integer")
    max_pixels, min_side = check_image_limits(max_pixels, min_side)

    raw = _load_split(repo_id, split, revision, config)
    if limit is not None:
        raw = raw.select(range(min(int(limit), len(raw))))
    lut = label_lut(layout.label_map, ignore)
    dataset, skipped = shape_hub_dataset(raw, repo_id, split, image_column, mask_column, lut, id_column,
                                         class_ids={c.id for c in layout.classes}, ignore_index=ignore,
                                         max_pixels=max_pixels, min_side=min_side)
    source_name = _slug(name or f"{repo_id}-{split}")
    if len(dataset) == 0 and skipped:
        raise no_usable_images(source_name, skipped, f"Hub dataset {repo_id!r} split {split!r}")
    # The cache fingerprint follows the repository revision that was downloaded and any ``limit``.
    fingerprint = getattr(raw, "_fingerprint", "") or ""
    return SegmentationSource(
        name=source_name,
        dataset=dataset,
        classes=list(layout.classes),
        ignore_index=ignore,
        revision=revision_with_skips(f"{revision or 'default'}:{fingerprint[:12]}", skipped),
        license=layout.license,
        description=layout.description or f"Hub dataset {repo_id}, split {split}.",
        params={"repo_id": repo_id, "split": split, "image_column": image_column, "mask_column": mask_column,
                "layout": layout.name, "revision": revision, "config": config, "limit": limit,
                "max_pixels": max_pixels, "min_side": min_side},
        skipped=skipped,
    )
