"""Last-layer tokens of the degraded and transformed evaluation images: a manifest unit of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from generator.batches import (
    encoder_if_available,
    grid_labels,
    rgb8_array,
)
from generator.extract.engine import to_host
from generator.extract.plan import EXTRACTOR_VERSION, ExtractOptions
from generator.models.encoder import Encoder
from generator.models.registry import ModelEntry
from generator.sources.base import SegmentationSource
from generator.sources.degradations import (
    DEGRADATIONS,
    TRANSFORMS,
    apply_degradation,
    apply_transform,
    patch_correspondence,
)
from generator.sources.geometry import input_geometry
from generator.sources.splits import PROBE_TRAIN_FRACTION, few_shot_split
from generator.store.atomic import atomic_path
from generator.store.layout import (
    variant_name,
    variant_path,
    variants_dir,
    variants_key,
)
from generator.store.manifest import Manifest, params_hash
from generator.store.records import (
    VariantsRecord,
)


def variants_unit(source: SegmentationSource, entry: ModelEntry, options: ExtractOptions, out: Path,
                   manifest: Manifest, tokens_hash: str, encoder: Encoder | None) -> None:
    """Last-layer post-norm tokens of the evaluation images, degraded and transformed.

    They feed the robustness curves (probes trained on clean images, evaluated on degraded ones)
    and retrieval under transformations. They are analysis inputs, not published data, so they
    live under ``<out>/variants`` with a manifest unit of their own.
    """
    if not source.probes or len(source) < 2 or "postnorm" not in options.norms:
        return
    key = variants_key(source.name, entry.name)
    # The dtype is in tokens_hash too; it is named here because it decides these files' bytes.
    params = {"extract": tokens_hash, "embedding_dtype": options.embedding_dtype, "degradations": DEGRADATIONS,
              "transforms": {k: v for k, v in TRANSFORMS.items() if k not in DEGRADATIONS},
              "train_fraction": PROBE_TRAIN_FRACTION, "train_count": source.probe_train_count,
              "version": EXTRACTOR_VERSION}
    if manifest.is_done(key, params, out):
        return
    encoder = encoder or encoder_if_available(entry, options)
    if encoder is None:
        return
    _, val_ids = few_shot_split(source.dataset["image_id"], train_count=source.probe_train_count)
    val = source.dataset.select(range(len(source) - len(val_ids), len(source)))
    images = [rgb8_array(img) for img in val["image"]]
    masks = [np.asarray(m) for m in val["mask"]]
    variants = [("degraded", name, level) for name, levels in DEGRADATIONS.items() for level in levels] + [
        ("transformed", name, level) for name, levels in TRANSFORMS.items() if name not in DEGRADATIONS
        for level in levels]
    folder = variants_dir(out, source.name, entry.name)
    files = {}
    for kind, name, level in tqdm(variants, disable=not options.progress, desc=f"{entry.name} variants",
                                  unit="variant"):
        if kind == "degraded":
            changed = [apply_degradation(img, name, level, seed=i) for i, img in enumerate(images)]
            new_masks = masks
            correspondence = None
        else:
            results = [apply_transform(img, m, name, level, ignore_index=source.ignore_index)
                       for img, m in zip(images, masks)]
            changed, new_masks = [r.image for r in results], [r.mask for r in results]
            correspondence = np.stack([
                patch_correspondence(r.to_source, r.image.shape[:2], encoder.grid,
                                     input_geometry(r.image.shape[:2], encoder.entry.input_size, encoder.resize))
                for r in results])
        labels = grid_labels(new_masks, encoder, options.label_rule, source.ignore_index)
        tokens = []
        for start in range(0, len(changed), options.batch_size):
            batch = encoder.tokens(encoder.preprocess(changed[start:start + options.batch_size]),
                                   [encoder.depth], ["postnorm"])
            # The published tables' dtype and range check: a degraded image can push a token
            # past float16's range, which a plain cast would store as inf.
            tokens.append(to_host(batch.layers[(encoder.depth, "postnorm")].patch, options.embedding_dtype,
                                  f"{entry.name} on {source.name}, variants table "
                                  f"{variant_name(kind, name, level)}, layer {encoder.depth} (postnorm)"))
        arrays = {"tokens": np.concatenate(tokens), "labels": labels,
                  "image_ids": np.asarray(val_ids)}
        if correspondence is not None:
            arrays["correspondence"] = correspondence
        path = variant_path(folder, kind, name, level)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        files[str(path.relative_to(out))] = manifest.sha256(path)
    manifest.set(key, VariantsRecord(status="done", params=params, params_hash=params_hash(params), files=files,
                                     layer=encoder.depth, model=entry.name, source=source.name,
                                     val_ids=list(val_ids)).to_entry())
    manifest.save()
