"""Parquet writers and readers for the tables of a dataset repository.

Writers stream batches into a temporary file and rename it into place on a clean close, so a
reader never sees half a table and a crash leaves the previous file (or none) untouched.
Embeddings are stored as fixed-size lists of float32 built zero-copy from the token buffer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from generator.errors import PatchAtlasError
from generator.store.atomic import atomic_path
from generator.store.schema import (
    arrow_schema,
    attention_features,
    image_features,
    patch_features,
    prefix_features,
)

# zstd compresses float tokens a little and decodes fast; the page index lets readers skip pages.
PARQUET_OPTIONS = dict(compression="zstd", write_page_index=True, use_dictionary=["image_id", "norm", "kind"])
ROW_GROUP_ROWS = 64 * 1024


class TableWriter:
    """A Parquet file written batch by batch and renamed into place on a clean exit."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self.path = Path(path)
        self.schema = schema
        self._atomic = atomic_path(self.path)
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self.num_rows = 0

    def __enter__(self) -> "TableWriter":
        self._tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, **PARQUET_OPTIONS)
        return self

    def write_columns(self, columns: dict[str, pa.Array]) -> None:
        table = pa.Table.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.num_rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._writer.close()
        # atomic_path renames on a clean exit and deletes the temporary file on an error.
        return bool(self._atomic.__exit__(exc_type, exc, tb))


def _embedding_array(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)


class PatchTableWriter(TableWriter):
    """Rows of (image_id, row, col, label, embedding), row-major within each image."""

    def __init__(self, path: str | os.PathLike, dim: int):
        super().__init__(path, arrow_schema(patch_features(dim)))
        self.dim = dim

    def write_batch(self, image_ids: Sequence[str], tokens: np.ndarray, labels: np.ndarray) -> None:
        batch, gh, gw, dim = tokens.shape
        if dim != self.dim or labels.shape != (batch, gh, gw) or len(image_ids) != batch:
            raise PatchAtlasError(
                f"{self.path}: batch of shape {tokens.shape} with labels {labels.shape} and "
                f"{len(image_ids)} ids does not fit a table of dimension {self.dim}")
        rows, cols = np.meshgrid(np.arange(gh, dtype=np.int16), np.arange(gw, dtype=np.int16), indexing="ij")
        per_image = gh * gw
        self.write_columns({
            "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=object), per_image), type=pa.string()),
            "row": pa.array(np.tile(rows.reshape(-1), batch)),
            "col": pa.array(np.tile(cols.reshape(-1), batch)),
            "label": pa.array(labels.astype(np.int16).reshape(-1)),
            "embedding": _embedding_array(tokens, dim),
        })


class PrefixTableWriter(TableWriter):
    """Rows of (image_id, layer, norm, token_index, kind, embedding) for CLS and register tokens."""

    def __init__(self, path: str | os.PathLike, dim: int):
        super().__init__(path, arrow_schema(prefix_features(dim)))
        self.dim = dim

    def write_batch(self, image_ids: Sequence[str], layer: int, norm: str, tokens: np.ndarray,
                    kinds: Sequence[str]) -> None:
        batch, count, dim = tokens.shape
        if len(kinds) != count or dim != self.dim:
            raise PatchAtlasError(f"{self.path}: {count} prefix tokens but {len(kinds)} kinds, or dimension {dim} ≠ {self.dim}")
        n = batch * count
        self.write_columns({
            "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=object), count), type=pa.string()),
            "layer": pa.array(np.full(n, layer, dtype=np.int16)),
            "norm": pa.array([norm] * n, type=pa.string()),
            "token_index": pa.array(np.tile(np.arange(count, dtype=np.int16), batch)),
            "kind": pa.array(list(kinds) * batch, type=pa.string()),
            "embedding": _embedding_array(tokens, dim),
        })


class AttentionTableWriter(TableWriter):
    """Rows of (image_id, head, row, col, weight): CLS → patch attention of the last block."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, arrow_schema(attention_features()))

    def write_batch(self, image_ids: Sequence[str], maps: np.ndarray) -> None:
        batch, heads, gh, gw = maps.shape
        per_image = heads * gh * gw
        head, row, col = np.meshgrid(np.arange(heads, dtype=np.int16), np.arange(gh, dtype=np.int16),
                                     np.arange(gw, dtype=np.int16), indexing="ij")
        self.write_columns({
            "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=object), per_image), type=pa.string()),
            "head": pa.array(np.tile(head.reshape(-1), batch)),
            "row": pa.array(np.tile(row.reshape(-1), batch)),
            "col": pa.array(np.tile(col.reshape(-1), batch)),
            "weight": pa.array(np.ascontiguousarray(maps, dtype=np.float32).reshape(-1)),
        })


def write_images_table(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Images and masks as encoded PNG bytes (``datasets.Image`` cells)."""
    schema = arrow_schema(image_features())
    with TableWriter(path, schema) as writer:
        chunk: list[dict] = []

        def flush():
            writer.write_columns({
                "image_id": pa.array([r["image_id"] for r in chunk], type=pa.string()),
                "image": pa.array([{"bytes": r["image_png"], "path": None} for r in chunk], type=schema.field("image").type),
                "mask": pa.array([{"bytes": r["mask_png"], "path": None} for r in chunk], type=schema.field("mask").type),
                "width": pa.array([r["width"] for r in chunk], type=pa.int32()),
                "height": pa.array([r["height"] for r in chunk], type=pa.int32()),
            })
            chunk.clear()

        for row in rows:
            chunk.append(row)
            if len(chunk) == 64:
                flush()
        if chunk:
            flush()
    return Path(path)


def read_images_table(path: str | os.PathLike) -> list[dict]:
    """Rows of (image_id, image_png, mask_png, width, height) in stored order."""
    table = _read(path)
    return [{"image_id": r["image_id"], "image_png": r["image"]["bytes"], "mask_png": r["mask"]["bytes"],
             "width": r["width"], "height": r["height"]} for r in table.to_pylist()]


@dataclass
class PatchTable:
    image_ids: np.ndarray  # [N] str
    rows: np.ndarray  # [N] int16
    cols: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray  # [N, D] float32
    path: Path


def _read(path: str | os.PathLike) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise PatchAtlasError(f"{path}: table not found; rerun `patchatlas extract` for this output folder")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise PatchAtlasError(f"{path}: unreadable Parquet ({err}); delete it and rerun extract") from err


def read_patch_table(path: str | os.PathLike) -> PatchTable:
    table = _read(path)
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    values = embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return PatchTable(
        image_ids=np.asarray(table.column("image_id").to_pylist(), dtype=object),
        rows=table.column("row").to_numpy(), cols=table.column("col").to_numpy(),
        labels=table.column("label").to_numpy(), embeddings=values, path=Path(path),
    )


def patch_grid(table: PatchTable) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Back to grids: (image ids in first-seen order, tokens [n, gh, gw, D], labels [n, gh, gw])."""
    ids, first, index = np.unique(table.image_ids.astype(str), return_index=True, return_inverse=True)
    first_seen = np.argsort(first)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[first_seen] = np.arange(len(ids))
    image_index = rank[index]
    gh, gw = int(table.rows.max()) + 1, int(table.cols.max()) + 1
    n, dim = len(ids), table.embeddings.shape[1]
    if len(table.rows) != n * gh * gw:
        raise PatchAtlasError(f"{table.path}: {len(table.rows)} rows do not fill {n} grids of {gh}×{gw}; "
                              f"the table is incomplete, rerun extract")
    tokens = np.zeros((n, gh, gw, dim), dtype=np.float32)
    labels = np.zeros((n, gh, gw), dtype=np.int16)
    filled = np.zeros((n, gh, gw), dtype=bool)
    tokens[image_index, table.rows, table.cols] = table.embeddings
    labels[image_index, table.rows, table.cols] = table.labels
    filled[image_index, table.rows, table.cols] = True
    if not filled.all():
        raise PatchAtlasError(f"{table.path}: some patches are missing or duplicated; rerun extract")
    return [str(v) for v in ids[first_seen]], tokens, labels


def read_attention_table(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(image ids, CLS attention maps [n, heads, gh, gw])."""
    table = _read(path)
    ids_col = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    ids = list(dict.fromkeys(ids_col.tolist()))
    heads, rows, cols = (table.column(c).to_numpy() for c in ("head", "row", "col"))
    maps = np.zeros((len(ids), heads.max() + 1, rows.max() + 1, cols.max() + 1), dtype=np.float32)
    position = {image_id: i for i, image_id in enumerate(ids)}
    image_index = np.array([position[v] for v in ids_col])
    maps[image_index, heads, rows, cols] = table.column("weight").to_numpy()
    return ids, maps
