"""One place for the schema of every table PatchAtlas writes.

Each table is declared once as ``datasets.Features``; its Arrow schema is derived from that
declaration and carries it in the schema metadata under ``b"huggingface"`` (the key and layout
``datasets`` itself writes), so ``load_dataset`` restores Image columns and fixed-size
embeddings exactly instead of guessing them from the Arrow types.

The features are embedded in the form every supported ``datasets`` release reads: a
fixed-length list is written as the older ``Sequence`` (``datasets`` 4 and later read it as
their ``List``; 3.x does not know ``List``). Tables of tokens also carry, under
``b"patchatlas"``, the geometry that made them (model, layer, view, input size, patch size,
resize policy), so a file explains itself without the card.

Tables:

- patches: ``image_id`` string, ``row`` / ``col`` int16, ``label`` a ``ClassLabel`` with the
  source's class names (int64, the storage ``datasets`` recognises a ClassLabel by: with any
  other integer type it ignores the declared feature), or int16 where no names are known, ``embedding``
  fixed_size_list<float16 | float32>[D]
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
GEOMETRY_METADATA_KEY = b"patchatlas"
PREFIX_KINDS = ("cls", "register")
EMBEDDING_DTYPES = ("float16", "float32")
DEFAULT_EMBEDDING_DTYPE = "float16"
_INT16_MAX = 32767


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


def label_names(classes, ignore_index: int | None) -> list[str]:
    """The ``ClassLabel`` names of a source: entry ``i`` names label id ``i``.

    ``classes`` are dicts or objects with ``id`` and ``name``. Ids the source does not use are
    named ``unused-<id>``, and the ignore index (when it is a mask value) ``unlabelled``, so
    every stored label is a valid ClassLabel index and ``int2str`` works on all of them.
    """
    names: dict[int, str] = {}
    for c in classes:
        cid, name = (c["id"], c["name"]) if isinstance(c, dict) else (c.id, c.name)
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid <= _INT16_MAX:
            raise PatchAtlasError(f"class {name!r}: id {cid!r} must be an integer in 0..{_INT16_MAX}")
        names[cid] = str(name)
    if ignore_index is not None and 0 <= ignore_index <= _INT16_MAX and ignore_index not in names:
        names[ignore_index] = "unlabelled"
    if not names:
        return []
    return [names.get(i, f"unused-{i}") for i in range(max(names) + 1)]



def _label(names: list[str] | None):
    return datasets.ClassLabel(names=list(names)) if names else datasets.Value("int16")


def patch_features(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE,
                   names: list[str] | None = None) -> datasets.Features:
    """One row per patch: where it is, its ground-truth label (a ClassLabel given ``names``), its token."""
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "row": datasets.Value("int16"),
        "col": datasets.Value("int16"),
        "label": _label(names),
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


def portable_features_dict(features: datasets.Features) -> dict:
    """``features.to_dict()`` in the form ``datasets`` 3.x reads too.

    ``datasets`` 4 renamed ``Sequence`` to ``List`` in this metadata, and 3.x fails on the new
    name (``Feature type 'List' not found``); 4.x and later still read ``Sequence`` of a
    non-dict feature as ``List``, so the old spelling serves both.
    """
    def convert(node):
        if isinstance(node, dict):
            out = {k: convert(v) for k, v in node.items()}
            if out.get("_type") == "List":
                out["_type"] = "Sequence"
                out.setdefault("length", -1)
            return out
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    return convert(features.to_dict())


def arrow_schema(features: datasets.Features, geometry: dict | None = None) -> pa.Schema:
    """The Arrow schema of ``features``, with the features embedded for ``datasets``.

    ``geometry`` (JSON-serialisable) is embedded under ``GEOMETRY_METADATA_KEY``.
    """
    # Column order matters to datasets, so the keys keep the declaration order.
    payload = json.dumps({"info": {"features": portable_features_dict(features)}})
    schema = features.arrow_schema
    metadata = {HF_METADATA_KEY: payload.encode("utf-8")}
    if geometry:
        metadata[GEOMETRY_METADATA_KEY] = json.dumps(geometry, sort_keys=True).encode("utf-8")
    return schema.with_metadata(metadata)


def patch_schema(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE, names: list[str] | None = None,
                 geometry: dict | None = None) -> pa.Schema:
    return arrow_schema(patch_features(dim, dtype, names), geometry)


def prefix_schema(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE, geometry: dict | None = None) -> pa.Schema:
    return arrow_schema(prefix_features(dim, dtype), geometry)


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


def geometry_from_schema(schema: pa.Schema) -> dict | None:
    """The geometry a token table records (see ``arrow_schema``), or None for older files."""
    raw = (schema.metadata or {}).get(GEOMETRY_METADATA_KEY)
    return None if raw is None else json.loads(raw)
