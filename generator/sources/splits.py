"""The few-shot split every probe uses: one rule, so extraction and analysis agree."""

from __future__ import annotations

import math
from collections.abc import Sequence

from generator.errors import PatchAtlasError

PROBE_TRAIN_FRACTION = 0.5


def few_shot_split(image_ids: Sequence[str], train_fraction: float = PROBE_TRAIN_FRACTION,
                   train_count: int | None = None) -> tuple[list[str], list[str]]:
    """The first ``train_count`` images, or the first ``train_fraction`` of them (in dataset
    order), train the probes; the rest evaluate them. Sources order their images deterministically, so the split is reproducible;
    presets with their own protocol (e.g. the Cityscapes 72/30 split) build the dataset so that
    this rule selects it."""
    if not 0 < train_fraction < 1:
        raise PatchAtlasError(f"train fraction {train_fraction}: must be between 0 and 1")
    ids = list(image_ids)
    if len(ids) < 2:
        raise PatchAtlasError(f"a few-shot split needs at least 2 images, got {len(ids)}")
    if train_count is not None:
        if not 1 <= train_count < len(ids):
            raise PatchAtlasError(f"train count {train_count}: must leave at least one of {len(ids)} images to evaluate")
        return ids[:train_count], ids[train_count:]
    n_train = min(len(ids) - 1, max(1, math.ceil(train_fraction * len(ids))))
    return ids[:n_train], ids[n_train:]
