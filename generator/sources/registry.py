"""The dataset sources PatchAtlas can read: a table of entries, one row per source.

Adding a source means adding a row: its name, the function that loads it, a one-line
description and its default parameters. ``load_source`` is the one way in; it checks the name
and the parameters before anything is loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from generator.errors import PatchAtlasError, UnknownName
from generator.sources.ade20k import PAPER_ADE20K_NAME, paper_ade20k_source
from generator.sources.base import SegmentationSource
from generator.sources.cityscapes import PAPER_CITYSCAPES_NAME, paper_cityscapes_source
from generator.sources.content_free import CONTENT_FREE_NAME, content_free_source
from generator.sources.hub import hub_source
from generator.sources.images import DEFAULT_MAX_PIXELS, MIN_IMAGE_SIDE
from generator.sources.local_folder import LOCAL_FOLDER_NAME, local_folder_source
from generator.sources.synthetic import SYNTHETIC_NAME, synthetic_scenes


@dataclass(frozen=True)
class SourceEntry:
    name: str
    loader: Callable[..., SegmentationSource]
    description: str
    default_params: dict[str, Any] = field(default_factory=dict)


SOURCES: dict[str, SourceEntry] = {
    entry.name: entry
    for entry in (
        SourceEntry(
            SYNTHETIC_NAME, synthetic_scenes,
            "deterministic synthetic scenes with exact masks (4 stuff + 4 object classes); offline default",
            {"n_images": 16, "size": 224, "seed": 0},
        ),
        SourceEntry(
            CONTENT_FREE_NAME, content_free_source,
            "inputs without content (constant colours, noise) that expose positional biases; offline",
            {"size": 224, "noise_images": 3, "seed": 0},
        ),
        SourceEntry(
            LOCAL_FOLDER_NAME, local_folder_source,
            "a local folder: images/<id>.jpg|png, masks/<id>.png (class ids), classes.json; needs path=",
            {"path": "", "images": "images", "masks": "masks", "classes": "classes.json", "ignore_index": 255,
             "name": "", "max_pixels": DEFAULT_MAX_PIXELS, "min_side": MIN_IMAGE_SIDE},
        ),
        SourceEntry(
            "hub", hub_source,
            "a Hugging Face Hub segmentation dataset (repo_id=, classes=ade20k|cityscapes|pascal-voc); "
            "needs a network or a cached copy",
            {"repo_id": "", "split": "validation", "classes": "", "image_column": "", "mask_column": "",
             "revision": "", "config": "", "id_column": "", "ignore_index": None, "limit": None, "name": "",
             "max_pixels": DEFAULT_MAX_PIXELS, "min_side": MIN_IMAGE_SIDE},
        ),
        SourceEntry(
            PAPER_CITYSCAPES_NAME, paper_cityscapes_source,
            "Cityscapes as in the local-representations paper: 72/30 few-shot split, 256-px tiles at 224; "
            "needs path= (official leftImg8bit/ + gtFine/ layout)",
            {"path": "", "seed": 0},
        ),
        SourceEntry(
            PAPER_ADE20K_NAME, paper_ade20k_source,
            "ADE20K few-shot protocol: n_train images from the training split, n_val from the validation "
            "split (72/30 by default), 150 classes; needs path= (official ADEChallengeData2016 layout)",
            {"path": "", "n_train": 72, "n_val": 30, "seed": 0},
        ),
    )
}


def source_names() -> list[str]:
    return sorted(SOURCES)


def get_source_entry(name: str) -> SourceEntry:
    """The registry row for ``name``; an unknown name suggests the closest known ones."""
    if name in SOURCES:
        return SOURCES[name]
    known = source_names()
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownName(f"unknown dataset source {name!r}.{hint} Known sources: {', '.join(known)} "
                      "(list them with `patchatlas datasets`).")


def load_source(name: str, /, **params: Any) -> SegmentationSource:
    """Load source ``name``; ``params`` override the entry's defaults and must be among them.

    ``name`` is positional-only: several sources have a ``name`` parameter of their own.
    """
    entry = get_source_entry(name)
    unknown = sorted(set(params) - set(entry.default_params))
    if unknown:
        valid = ", ".join(sorted(entry.default_params)) or "(none)"
        raise PatchAtlasError(f"source {name!r} has no parameter {', '.join(repr(k) for k in unknown)}; "
                              f"valid parameters: {valid}")
    return entry.loader(**{**entry.default_params, **params})
