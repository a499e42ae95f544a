"""One place for the schema of every table PatchAtlas writes.

Each table is declared once as ``datasets.Features``; its Arrow schema is derived from that
declaration and carries it in the schema metadata under ``b"huggingface"`` (the key and layout
``datasets`` itself writes), so ``load_dataset`` restores Image columns and fixed-size
embeddings exactly instead of guessing them from the Arrow types.

Tables:

- patches: ``image_id`` string, ``row`` / ``col`` / ``label`` int16,
  ``embedding`` fixed_size_list<float16 | float32>[D]
- prefix (CLS and register tokens): ``image_id``, ``layer`` int16, ``norm`` string,
  ``token_index`` int16, ``kind`` string (``cls`` | ``register``), ``embedding`` float16/32[D]

Embeddings are float16 by default: half the bytes to write, push and download, read back
exactly by ``datasets``, DuckDB and polars (tests/test_store.py checks all three), and within
the bf16 precision the encoders run at on GPUs. float32 stays available for exact CPU tokens.
- attention (last block, CLS → patch): ``image_id``, ``head`` / ``row`` / ``col`` int16,
  ``weight`` float32
- images: ``image_id``, ``image`` and ``mask`` (``datasets.Image``: struct {bytes, path}),
  ``width`` / ``height`` int32
"""

from __future__ import annotations

import json

import datasets
import pyarrow as pa

from generator.errors import PatchAtlasError

HF_METADATA_KEY = b"huggingface"
PREFIX_KINDS = ("cls", "register")
EMBEDDING_DTYPES = ("float16", "float32")
DEFAULT_EMBEDDING_DTYPE = "float16"


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise PatchAtlasError(f"embedding dimension {dim!r}: expected a positive integer")
    return dim


def check_embedding_dtype(dtype: str) -> str:
    if dtype not in EMBEDDING_DTYPES:
        raise PatchAtlasError(f"embedding dtype {dtype!r}: expected one of {', '.join(EMBEDDING_DTYPES)}")
    return dtype


def _embedding(dim: int, dtype: str) -> datasets.List:
    # A List with a length is what datasets maps to Arrow's fixed_size_list.
    return datasets.List(datasets.Value(check_embedding_dtype(dtype)), length=_check_dim(dim))


def patch_features(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE) -> datasets.Features:
    """One row per patch: where it is, its ground-truth label, its token."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "row": datasets.Value("int16"),
        "col": datasets.Value("int16"),
        "label": datasets.Value("int16"),
        "embedding": _embedding(dim, dtype),
    })


def prefix_features(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE) -> datasets.Features:
    """One row per prefix token (CLS, registers) per image, layer and view."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "layer": datasets.Value("int16"),
        "norm": datasets.Value("string"),
        "token_index": datasets.Value("int16"),
        "kind": datasets.Value("string"),
        "embedding": _embedding(dim, dtype),
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
    """One row per image: the image and its class-id mask as encoded PNG, and its size."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
    })


def arrow_schema(features: datasets.Features) -> pa.Schema:
    """The Arrow schema of ``features``, with the features embedded for ``datasets``."""
    # Column order matters to datasets, so the keys keep the declaration order.
    payload = json.dumps({"info": {"features": features.to_dict()}})
    return features.arrow_schema.with_metadata({HF_METADATA_KEY: payload.encode("utf-8")})


def patch_schema(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE) -> pa.Schema:
    return arrow_schema(patch_features(dim, dtype))


def prefix_schema(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE) -> pa.Schema:
    return arrow_schema(prefix_features(dim, dtype))


def attention_schema() -> pa.Schema:
    return arrow_schema(attention_features())


def image_schema() -> pa.Schema:
    return arrow_schema(image_features())


def features_from_schema(schema: pa.Schema) -> datasets.Features | None:
    """The Features embedded in a Parquet/Arrow schema, or None when there are none."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if raw is None:
        return None
    return datasets.Features.from_dict(json.loads(raw)["info"]["features"])
