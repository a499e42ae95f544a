"""Parquet writers and readers for the tables of a dataset repository.

Writers stream batches into a temporary sibling of the final file and rename it into place on
a clean close (``generator.store.atomic``), so a reader never sees half a table and an error
leaves the previous file (or none) untouched and no temporary file behind.

Rows are gathered into a preallocated buffer of one row group and written when it is full, so
row groups have a useful size whatever the batch size, memory per writer stays bounded, and the
caller's arrays are free again as soon as ``write_batch`` returns. The buffer is handed to Arrow
without copying: embeddings become a fixed-size list over the flat float16/float32 buffer.

A config's tokens may span several shard files (``train-00000-of-00003.parquet`` ...); the
readers take one path or the list of a config's shards, in order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from generator.errors import PatchAtlasError
from generator.store.atomic import atomic_path
from generator.store.schema import (
    DEFAULT_EMBEDDING_DTYPE,
    PREFIX_KINDS,
    attention_schema,
    check_embedding_dtype,
    image_schema,
    patch_schema,
    prefix_schema,
)

# A row group of about this many bytes of embeddings: large enough to compress well and to
# amortise the page index, small enough that a few dozen open writers fit in memory, and far
# below the 100 MB the Hub's dataset viewer reads at once.
ROW_GROUP_BYTES = 32 * 1024 * 1024
MIN_ROW_GROUP_ROWS = 1024
MAX_ROW_GROUP_ROWS = 128 * 1024
IMAGES_PER_ROW_GROUP = 64
_INT16 = np.iinfo(np.int16)
FLOAT16_MAX = float(np.finfo(np.float16).max)
PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def default_row_group_rows(dim: int, dtype: str = DEFAULT_EMBEDDING_DTYPE) -> int:
    """Rows per row group for embeddings of width ``dim`` (about ``ROW_GROUP_BYTES`` each)."""
    itemsize = np.dtype(check_embedding_dtype(dtype)).itemsize
    return int(np.clip(ROW_GROUP_BYTES // (itemsize * max(dim, 1)), MIN_ROW_GROUP_ROWS, MAX_ROW_GROUP_ROWS))


# Columns whose min/max statistics are never written: nobody filters on a token's values, and
# computing them is most of the cost of writing float16 (stored as 2-byte fixed-length values).
UNFILTERED_COLUMNS = ("embedding",)


def _parquet_options(dictionary_columns: Sequence[str], columns: Sequence[str] = ()) -> dict:
    # zstd shrinks float tokens a little and decodes fast; the page index lets readers skip
    # pages; dictionaries pay off only for the few repeated strings, never for embeddings.
    options = dict(compression="zstd", write_page_index=True, use_dictionary=list(dictionary_columns))
    if any(c in UNFILTERED_COLUMNS for c in columns):
        options["write_statistics"] = [c for c in columns if c not in UNFILTERED_COLUMNS]
    return options


class _RowGroupBuffer:
    """Numpy columns for one row group, filled batch by batch and viewed as Arrow arrays."""

    def __init__(self, schema: pa.Schema, capacity: int):
        self.schema = schema
        self.capacity = capacity
        self.filled = 0
        self.columns: dict[str, np.ndarray] = {}
        for field in schema:
            if pa.types.is_fixed_size_list(field.type):
                dtype = field.type.value_type.to_pandas_dtype()
                self.columns[field.name] = np.empty((capacity, field.type.list_size), dtype=dtype)
            elif pa.types.is_string(field.type):
                self.columns[field.name] = np.empty(capacity, dtype=object)
            else:
                self.columns[field.name] = np.empty(capacity, dtype=field.type.to_pandas_dtype())

    def put(self, values: Mapping[str, np.ndarray], start: int, stop: int) -> None:
        """Copy rows ``start:stop`` of ``values`` (arrays of equal length) after the filled rows."""
        end = self.filled + stop - start
        for name, column in self.columns.items():
            column[self.filled:end] = values[name][start:stop]
        self.filled = end

    @property
    def room(self) -> int:
        return self.capacity - self.filled

    def to_table(self) -> pa.Table:
        n = self.filled
        arrays = []
        for field in self.schema:
            column = self.columns[field.name][:n]
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(column.reshape(-1), type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
            else:
                arrays.append(pa.array(column, type=field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)


class TableWriter:
    """A Parquet file written in row groups and renamed into place on a clean close.

    Use it as a context manager: leaving the block normally publishes the file, leaving it by
    an exception discards everything written. ``close()`` and ``abort()`` do the same by hand.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, *, row_group_rows: int,
                 dictionary_columns: Sequence[str] = ("image_id",)):
        if isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int) or row_group_rows < 1:
            raise PatchAtlasError(f"{path}: row_group_rows={row_group_rows!r} must be a positive integer")
        self.path = Path(path)
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.num_rows = 0
        self._buffer: _RowGroupBuffer | None = None
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._writer = pq.ParquetWriter(self._tmp, schema,
                                            **_parquet_options(dictionary_columns, schema.names))
        except BaseException as err:
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._open = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)
        return False

    def _check_open(self) -> None:
        if not self._open:
            raise PatchAtlasError(f"{self.path}: the table is already closed; open a new writer to write again")

    def append_rows(self, values: Mapping[str, np.ndarray]) -> None:
        """Append rows given as one equal-length array (or array-like) per schema column."""
        self._check_open()
        if self._buffer is None:
            self._buffer = _RowGroupBuffer(self.schema, self.row_group_rows)
        n = len(next(iter(values.values())))
        start = 0
        while start < n:
            take = min(self._buffer.room, n - start)
            self._buffer.put(values, start, start + take)
            start += take
            if self._buffer.room == 0:
                self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Write an Arrow table as it is (one or more row groups), after any buffered rows."""
        self._check_open()
        self._flush()
        self._writer.write_table(table.cast(self.schema), row_group_size=self.row_group_rows)
        self.num_rows += table.num_rows

    def _flush(self) -> None:
        if self._buffer is None or self._buffer.filled == 0:
            return
        table = self._buffer.to_table()
        # The Arrow arrays view the buffer; the row group is encoded before write_table
        # returns, so the buffer can be refilled afterwards.
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.num_rows += table.num_rows
        self._buffer.filled = 0

    def close(self) -> Path:
        """Write what is buffered, finish the file and move it onto its final name."""
        if not self._open:
            return self.path
        try:
            self._flush()
            self._writer.close()
        except BaseException as err:
            self.abort(err)
            raise
        self._open = False
        self._buffer = None
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self, reason: BaseException | None = None) -> None:
        """Discard the temporary file; the final path keeps whatever it held before."""
        if not self._open:
            return
        self._open = False
        self._buffer = None
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away anyway
            pass
        reason = reason if reason is not None else PatchAtlasError(f"{self.path}: writing aborted")
        self._atomic.__exit__(type(reason), reason, reason.__traceback__)


def _check_ids(path: Path, image_ids: Sequence[str], batch: int) -> np.ndarray:
    ids = np.asarray(list(image_ids), dtype=object)
    if ids.shape != (batch,) or not all(isinstance(v, str) and v for v in ids):
        raise PatchAtlasError(f"{path}: expected {batch} non-empty string image ids, got {list(image_ids)[:5]!r}...")
    return ids


def _check_tokens(path: Path, tokens: np.ndarray, ndim: int, dim: int, what: str, dtype: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != ndim or tokens.shape[-1] != dim or not np.issubdtype(tokens.dtype, np.floating):
        raise PatchAtlasError(
            f"{path}: {what} of shape {tokens.shape} and dtype {tokens.dtype} does not fit a table of "
            f"{dtype} embeddings of dimension {dim}")
    if dtype == "float16" and tokens.dtype != np.float16 and tokens.size:
        # A value beyond float16's range would be stored as inf: refuse instead of corrupting it.
        check_float16_range(float(np.abs(tokens).max()), f"{path}: {what}")
    return tokens


def check_float16_range(peak: float, where: str) -> None:
    """Refuse tokens whose largest magnitude ``peak`` a float16 column would store as inf."""
    if peak > FLOAT16_MAX:
        raise PatchAtlasError(
            f"{where} reach |{peak:.4g}|, beyond float16's range (±{FLOAT16_MAX:.0f}); "
            f"write this model's embeddings as float32 (--embedding-dtype float32)")


def _check_int16(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.size and (not np.issubdtype(values.dtype, np.integer)
                        or values.min() < _INT16.min or values.max() > _INT16.max):
        raise PatchAtlasError(f"{path}: {name} must be integers within int16 "
                              f"[{_INT16.min}, {_INT16.max}], got dtype {values.dtype}")
    return values


class PatchTableWriter(TableWriter):
    """Rows of (image_id, row, col, label, embedding), row-major within each image."""

    def __init__(self, path: str | os.PathLike, dim: int, *, dtype: str = DEFAULT_EMBEDDING_DTYPE,
                 row_group_rows: int | None = None, label_names: Sequence[str] | None = None,
                 geometry: Mapping | None = None):
        # label_names declare ``label`` a ClassLabel; geometry is recorded in the schema metadata.
        super().__init__(path, patch_schema(dim, dtype, list(label_names or []) or None,
                                            dict(geometry) if geometry else None),
                         row_group_rows=row_group_rows or default_row_group_rows(dim, dtype),
                         dictionary_columns=("image_id",))
        self.dim, self.dtype = dim, dtype

    def write_batch(self, image_ids: Sequence[str], tokens: np.ndarray, labels: np.ndarray) -> None:
        """``tokens`` [B, gh, gw, D] floating, ``labels`` [B, gh, gw] integer: one row per patch."""
        tokens = _check_tokens(self.path, tokens, 4, self.dim, "tokens", self.dtype)
        batch, gh, gw, dim = tokens.shape
        labels = np.asarray(labels)
        if labels.shape != (batch, gh, gw):
            raise PatchAtlasError(f"{self.path}: labels of shape {labels.shape} do not fit tokens of shape "
                                  f"{tokens.shape}; expected {(batch, gh, gw)}")
        labels = _check_int16(self.path, "labels", labels)
        if max(gh, gw) > _INT16.max:
            raise PatchAtlasError(f"{self.path}: a {gh}×{gw} patch grid does not fit int16 positions")
        ids = _check_ids(self.path, image_ids, batch)
        per_image = gh * gw
        rows, cols = np.divmod(np.arange(per_image, dtype=np.int32), gw)
        self.append_rows({
            "image_id": np.repeat(ids, per_image),
            "row": np.tile(rows, batch),
            "col": np.tile(cols, batch),
            "label": labels.reshape(-1),
            "embedding": tokens.reshape(-1, dim),
        })


class PrefixTableWriter(TableWriter):
    """Rows of (image_id, layer, norm, token_index, kind, embedding) for CLS and register tokens."""

    def __init__(self, path: str | os.PathLike, dim: int, *, dtype: str = DEFAULT_EMBEDDING_DTYPE,
                 row_group_rows: int | None = None, geometry: Mapping | None = None):
        # norm and kind repeat a handful of values, so they get dictionaries too.
        super().__init__(path, prefix_schema(dim, dtype, dict(geometry) if geometry else None),
                         row_group_rows=row_group_rows or default_row_group_rows(dim, dtype),
                         dictionary_columns=("image_id", "norm", "kind"))
        self.dim, self.dtype = dim, dtype

    def write_batch(self, image_ids: Sequence[str], layer: int, norm: str, tokens: np.ndarray,
                    kinds: Sequence[str]) -> None:
        """``tokens`` [B, P, D]: the P prefix tokens of each image, ``kinds[p]`` naming token p."""
        tokens = _check_tokens(self.path, tokens, 3, self.dim, "prefix tokens", self.dtype)
        batch, count, dim = tokens.shape
        kinds = list(kinds)
        if len(kinds) != count or any(k not in PREFIX_KINDS for k in kinds):
            raise PatchAtlasError(f"{self.path}: {count} prefix tokens need {count} kinds from "
                                  f"{PREFIX_KINDS}, got {kinds!r}")
        if not isinstance(norm, str) or not norm:
            raise PatchAtlasError(f"{self.path}: norm {norm!r} must be a non-empty string")
        _check_int16(self.path, "layer", np.asarray([layer]))
        ids = _check_ids(self.path, image_ids, batch)
        n = batch * count
        self.append_rows({
            "image_id": np.repeat(ids, count),
            "layer": np.full(n, layer, dtype=np.int16),
            "norm": np.full(n, norm, dtype=object),
            "token_index": np.tile(np.arange(count, dtype=np.int16), batch),
            "kind": np.tile(np.asarray(kinds, dtype=object), batch),
            "embedding": tokens.reshape(-1, dim),
        })


class AttentionTableWriter(TableWriter):
    """Rows of (image_id, head, row, col, weight): CLS → patch attention of the last block."""

    def __init__(self, path: str | os.PathLike, *, row_group_rows: int = MAX_ROW_GROUP_ROWS):
        super().__init__(path, attention_schema(), row_group_rows=row_group_rows, dictionary_columns=("image_id",))

    def write_batch(self, image_ids: Sequence[str], maps: np.ndarray) -> None:
        """``maps`` [B, heads, gh, gw]: one row per (image, head, row, col)."""
        maps = np.asarray(maps)
        if maps.ndim != 4 or not np.issubdtype(maps.dtype, np.floating):
            raise PatchAtlasError(f"{self.path}: attention maps of shape {maps.shape} and dtype {maps.dtype}; "
                                  f"expected floating [batch, heads, rows, cols]")
        batch, heads, gh, gw = maps.shape
        ids = _check_ids(self.path, image_ids, batch)
        head, row, col = (a.reshape(-1) for a in np.meshgrid(
            np.arange(heads, dtype=np.int16), np.arange(gh, dtype=np.int16), np.arange(gw, dtype=np.int16),
            indexing="ij"))
        self.append_rows({
            "image_id": np.repeat(ids, heads * gh * gw),
            "head": np.tile(head, batch),
            "row": np.tile(row, batch),
            "col": np.tile(col, batch),
            "weight": maps.reshape(-1),
        })


_IMAGE_ROW_KEYS = ("image_id", "image_png", "mask_png", "width", "height")


def _image_rows_table(path: Path, rows: list[dict], schema: pa.Schema) -> pa.Table:
    for row in rows:
        missing = [k for k in _IMAGE_ROW_KEYS if k not in row]
        if missing or not isinstance(row["image_png"], bytes) or not isinstance(row["mask_png"], bytes):
            raise PatchAtlasError(f"{path}: image row {row.get('image_id')!r} needs {_IMAGE_ROW_KEYS} with PNG "
                                  f"bytes; missing {missing}")
    return pa.Table.from_arrays([
        pa.array([r["image_id"] for r in rows], type=pa.string()),
        pa.array([{"bytes": r["image_png"], "path": None} for r in rows], type=schema.field("image").type),
        pa.array([{"bytes": r["mask_png"], "path": None} for r in rows], type=schema.field("mask").type),
        pa.array([int(r["width"]) for r in rows], type=pa.int32()),
        pa.array([int(r["height"]) for r in rows], type=pa.int32()),
    ], schema=schema)


def write_images_shards(folder: str | os.PathLike, rows: Iterable[dict], shard_bytes: int) -> list[Path]:
    """Images and masks in shards of at most about ``shard_bytes`` of PNG, in the given order.

    Encoded sizes are known only as rows arrive, so shards are filled one after another under
    provisional names and given their final ``train-0000k-of-0000N`` names once N is known.
    Any other Parquet file in ``folder`` (shards of an earlier, larger run) is removed last.
    """
    from generator.store.repo import shard_name

    folder = Path(folder)
    for leftover in folder.glob(".part-*.parquet"):  # of a run killed before its renames
        leftover.unlink()
    parts: list[Path] = []
    schema = image_schema()
    chunk: list[dict] = []
    writer: TableWriter | None = None
    filled = 0

    def flush() -> None:
        nonlocal chunk
        if chunk:
            writer.write_table(_image_rows_table(folder, chunk, schema))
            chunk = []

    try:
        for row in rows:
            size = len(row.get("image_png") or b"") + len(row.get("mask_png") or b"")
            if writer is not None and filled and filled + size > shard_bytes:
                flush()
                writer.close()
                writer = None
            if writer is None:
                parts.append(folder / f".part-{len(parts):05d}.parquet")
                writer = TableWriter(parts[-1], schema, row_group_rows=IMAGES_PER_ROW_GROUP)
                filled = 0
            chunk.append(row)
            filled += size
            if len(chunk) == IMAGES_PER_ROW_GROUP:
                flush()
        if writer is None:
            raise PatchAtlasError(f"{folder}: no images to write")
        flush()
        writer.close()
    except BaseException as err:
        try:
            if writer is not None:
                writer.abort(err)
        finally:
            for part in parts:
                part.unlink(missing_ok=True)
        raise
    final = [folder / shard_name(i, len(parts)) for i in range(len(parts))]
    for part, path in zip(parts, final):
        os.replace(part, path)
    for stale in set(folder.glob("*.parquet")) - set(final):
        stale.unlink()
    return final


def _as_paths(paths: PathOrPaths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    paths = [Path(p) for p in paths]
    if not paths:
        raise PatchAtlasError("no table files given; rerun `patchatlas extract` for this output folder")
    return paths


def _read_one(path: Path, required: Mapping[str, pa.DataType], what: str) -> pa.Table:
    if not path.is_file():
        raise PatchAtlasError(f"{path}: {what} not found; rerun `patchatlas extract` for this output folder")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise PatchAtlasError(f"{path}: unreadable Parquet ({err}); delete it and rerun `patchatlas extract`") from err
    for name, expected in required.items():
        if name not in table.column_names or not table.schema.field(name).type.equals(expected):
            found = table.schema.field(name).type if name in table.column_names else "missing"
            raise PatchAtlasError(f"{path}: not a {what}: column {name!r} should be {expected}, found {found}")
    return table


def _read(paths: PathOrPaths, required: Mapping[str, pa.DataType], what: str) -> tuple[pa.Table, Path]:
    """The shards of one table, concatenated in order, and the path errors should name."""
    paths = _as_paths(paths)
    tables = [_read_one(p, required, what) for p in paths]
    first = tables[0].schema.remove_metadata()
    for path, table in zip(paths[1:], tables[1:]):
        if not table.schema.remove_metadata().equals(first):
            raise PatchAtlasError(f"{path}: its schema differs from {paths[0]}'s; the shards come from different "
                                  f"runs. Delete the folder and rerun `patchatlas extract`")
    name = paths[0] if len(paths) == 1 else paths[0].parent
    return (tables[0] if len(tables) == 1 else pa.concat_tables(tables)), name


def read_images_table(path: PathOrPaths) -> list[dict]:
    """Rows of (image_id, image_png, mask_png, width, height) in stored order."""
    schema = image_schema()
    table, _ = _read(path, {f.name: f.type for f in schema}, "images table")
    return [{"image_id": r["image_id"], "image_png": r["image"]["bytes"], "mask_png": r["mask"]["bytes"],
             "width": r["width"], "height": r["height"]} for r in table.to_pylist()]


def read_first_images(folder: str | os.PathLike, count: int) -> list[dict]:
    """The first ``count`` rows of a folder of images shards, reading no more shards than needed."""
    shards = sorted(Path(folder).glob("train-*.parquet"))
    if not shards:
        raise PatchAtlasError(f"{folder}: no images table found; rerun `patchatlas extract` for this output folder")
    rows: list[dict] = []
    for shard in shards:
        if len(rows) >= count:
            break
        rows += read_images_table(shard)
    return rows[:count]


@dataclass
class PatchTable:
    """A patch table in memory: one entry per row, in stored order."""

    image_ids: np.ndarray  # [N] object (str)
    rows: np.ndarray  # [N] int16
    cols: np.ndarray  # [N] int16
    labels: np.ndarray  # [N] int16
    embeddings: np.ndarray  # [N, D] float32; a read-only view of Arrow memory for one float32 row group
    path: Path  # the file, or the folder of a config's shards


def _fixed_size_values(path: Path, column: pa.ChunkedArray) -> np.ndarray:
    """[N, D] float32 values of a fixed-size-list column of float16 or float32.

    One float32 chunk is viewed in place (read-only Arrow memory); several chunks (one per row
    group) or float16 values are converted once into one writable float32 array.
    """
    if column.null_count:
        raise PatchAtlasError(f"{path}: {column.null_count} null embeddings; delete the file and rerun extract")
    dim = column.type.list_size
    chunks = [chunk.flatten() for chunk in column.chunks]  # flatten honours slice offsets
    if len(chunks) == 1 and column.type.value_type == pa.float32():
        return chunks[0].to_numpy(zero_copy_only=True).reshape(-1, dim)
    values = np.empty((len(column), dim), dtype=np.float32)
    start = 0
    for chunk in chunks:
        part = chunk.to_numpy(zero_copy_only=True).reshape(-1, dim)
        values[start:start + len(part)] = part
        start += len(part)
    return values


def read_patch_table(path: PathOrPaths) -> PatchTable:
    """One patch table, or a config's shards in order, with embeddings as float32."""
    expected = patch_schema(1)
    required = {f.name: f.type for f in expected if f.name not in ("embedding", "label")}
    table, path = _read(path, required, "patch table")
    label = table.schema.field("label").type if "label" in table.column_names else None
    # int64 where the label is a ClassLabel (see generator.store.schema), int16 otherwise.
    if label not in (pa.int16(), pa.int64()):
        raise PatchAtlasError(f"{path}: not a patch table: column 'label' should be int16 or int64, "
                              f"found {label or 'missing'}")
    embedding = table.schema.field("embedding").type if "embedding" in table.column_names else None
    if embedding is None or not pa.types.is_fixed_size_list(embedding) \
            or embedding.value_type not in (pa.float16(), pa.float32()):
        raise PatchAtlasError(f"{path}: not a patch table: column 'embedding' should be "
                              f"fixed_size_list<float16 or float32>, found {embedding or 'missing'}")
    return PatchTable(
        image_ids=table.column("image_id").to_numpy(zero_copy_only=False),
        rows=table.column("row").to_numpy(), cols=table.column("col").to_numpy(),
        labels=table.column("label").to_numpy().astype(np.int16, copy=False),
        embeddings=_fixed_size_values(path, table.column("embedding")),
        path=path,
    )


def _first_seen_codes(image_ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(distinct ids in order of first appearance, per-row index into them)."""
    encoded = pa.array(image_ids, type=pa.string()).dictionary_encode()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def patch_grid(table: PatchTable) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Back to grids: (image ids in stored order, tokens [n, gh, gw, D], labels [n, gh, gw]).

    The tokens are writable and may share memory with ``table.embeddings``.

    Every image must have every patch of the grid exactly once; otherwise the table is
    incomplete and the error names the file and the first image that is.
    """
    n_rows = len(table.rows)
    if n_rows == 0:
        raise PatchAtlasError(f"{table.path}: the patch table has no rows; rerun extract")
    if table.rows.min() < 0 or table.cols.min() < 0:
        raise PatchAtlasError(f"{table.path}: negative patch positions; the table is corrupt, rerun extract")
    ids, image_index = _first_seen_codes(table.image_ids)
    gh, gw = int(table.rows.max()) + 1, int(table.cols.max()) + 1
    n, dim = len(ids), table.embeddings.shape[1]
    cell = (image_index * gh + table.rows.astype(np.int64)) * gw + table.cols.astype(np.int64)
    counts = np.bincount(cell, minlength=n * gh * gw)
    if n_rows != n * gh * gw or (counts != 1).any():
        bad = int(np.flatnonzero(counts != 1)[0])
        image, rest = divmod(bad, gh * gw)
        row, col = divmod(rest, gw)
        state = "missing" if counts[bad] == 0 else f"present {counts[bad]} times"
        raise PatchAtlasError(
            f"{table.path}: {n_rows} rows do not fill {n} grids of {gh}×{gw} exactly once; patch "
            f"(row {row}, col {col}) of image {ids[image]!r} is {state}. Delete the file and rerun extract")
    if (np.diff(cell) == 1).all():  # stored row-major, image by image, as the writers do
        # A writable table array is reshaped in place rather than copied: tables can be GBs.
        tokens = table.embeddings if table.embeddings.flags.writeable else table.embeddings.copy()
        tokens = np.ascontiguousarray(tokens, dtype=np.float32).reshape(n, gh, gw, dim)
        labels = np.array(table.labels, copy=True).reshape(n, gh, gw)
    else:
        order = np.argsort(cell, kind="stable")
        tokens = np.ascontiguousarray(table.embeddings[order], dtype=np.float32).reshape(n, gh, gw, dim)
        labels = np.asarray(table.labels[order]).reshape(n, gh, gw)
    return ids, tokens, labels


def read_attention_table(path: PathOrPaths) -> tuple[list[str], np.ndarray]:
    """(image ids in stored order, CLS attention maps [n, heads, gh, gw]) of one table or its shards."""
    table, path = _read(path, {f.name: f.type for f in attention_schema()}, "attention table")
    if table.num_rows == 0:
        raise PatchAtlasError(f"{path}: the attention table has no rows; rerun extract")
    ids, image_index = _first_seen_codes(table.column("image_id").to_numpy(zero_copy_only=False))
    heads, rows, cols = (table.column(c).to_numpy() for c in ("head", "row", "col"))
    maps = np.zeros((len(ids), heads.max() + 1, rows.max() + 1, cols.max() + 1), dtype=np.float32)
    maps[image_index, heads, rows, cols] = table.column("weight").to_numpy()
    return ids, maps
