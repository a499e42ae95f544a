"""One place for the schema of every table PatchAtlas writes.

Each table is declared once as ``datasets.Features``; the Arrow schema is derived from it and
carries the Features in its metadata (as ``datasets`` itself writes them), so
``load_dataset`` restores Image columns and fixed-size embeddings exactly.
"""

from __future__ import annotations

import json

import datasets
import pyarrow as pa


def _embedding(dim: int) -> datasets.List:
    return datasets.List(datasets.Value("float32"), length=dim)


def patch_features(dim: int) -> datasets.Features:
    """One row per patch: where it is, its ground-truth label, its token."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "row": datasets.Value("int16"),
        "col": datasets.Value("int16"),
        "label": datasets.Value("int16"),
        "embedding": _embedding(dim),
    })


def prefix_features(dim: int) -> datasets.Features:
    """One row per prefix token (CLS, registers) per layer and view."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "layer": datasets.Value("int16"),
        "norm": datasets.Value("string"),
        "token_index": datasets.Value("int16"),
        "kind": datasets.Value("string"),
        "embedding": _embedding(dim),
    })


def attention_features() -> datasets.Features:
    """One row per (patch, head): the last block's CLS → patch attention weight."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "head": datasets.Value("int16"),
        "row": datasets.Value("int16"),
        "col": datasets.Value("int16"),
        "weight": datasets.Value("float32"),
    })


def image_features() -> datasets.Features:
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
    })


def arrow_schema(features: datasets.Features) -> pa.Schema:
    """The Arrow schema of a Features, with the Features embedded for ``datasets``."""
    schema = features.arrow_schema
    metadata = {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
    return schema.with_metadata(metadata)
