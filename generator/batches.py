"""Images in batches, with their patch labels, as every pass over a source reads them.

Extraction, the layer-wise streaming pass and the degraded variants all read a source the same
way: in dataset order, RGB uint8 images and their masks, each mask reduced to one label per
patch of the model's grid by the label rule.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import datasets
import numpy as np

from generator.concurrency import prefetched
from generator.errors import WeightsUnavailable
from generator.models.encoder import Encoder, load_encoder
from generator.models.registry import ModelEntry
from generator.sources.labels import patch_labels, resize_mask

Batch = tuple[list[str], list[np.ndarray], list[np.ndarray]]


def iter_batches(dataset: datasets.Dataset, batch_size: int) -> Iterator[Batch]:
    """(image ids, RGB uint8 arrays, mask arrays) in order, ``batch_size`` at a time."""
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        images = [np.asarray(img.convert("RGB")) for img in rows["image"]]
        masks = [np.asarray(m) for m in rows["mask"]]
        yield list(rows["image_id"]), images, masks


def grid_labels(masks: Sequence[np.ndarray], encoder: Encoder, rule: str, ignore_index: int) -> np.ndarray:
    """Per-patch labels [B, gh, gw]: the mask is resized to the model input, then reduced per patch."""
    side = encoder.entry.input_size
    return np.stack([
        patch_labels(resize_mask(mask, (side, side)), encoder.grid, rule, ignore_index)
        for mask in masks
    ]).astype(np.int16)


def labelled_batches(dataset: datasets.Dataset, batch_size: int, encoder: Encoder, rule: str,
                     ignore_index: int) -> Iterator[tuple[list[str], list[np.ndarray], np.ndarray]]:
    """(image ids, RGB uint8 arrays, patch labels) in order, decoded and labelled on a prefetch
    thread, so that reading the next batch overlaps the model's work on this one."""
    def labelled():
        for image_ids, images, masks in iter_batches(dataset, batch_size):
            yield image_ids, images, grid_labels(masks, encoder, rule, ignore_index)

    return prefetched(labelled(), depth=2)


def encoder_if_available(entry: ModelEntry, options) -> Encoder | None:
    """The model's encoder (with ``options``' checkpoint, device and cache) for a pass that
    follows extraction, or None when its weights cannot be had: the extract unit has already
    recorded why."""
    try:
        return load_encoder(entry, checkpoint=options.weights.get(entry.name), device=options.device,
                            cache_dir=options.cache_dir)
    except WeightsUnavailable:
        return None
