"""What an extraction does: its options, the parameters its tokens depend on, the shards and tables of a unit."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from generator.analyses.probes import ProbeProtocol
from generator.batches import (
    DECODE_MODES,
)
from generator.errors import PatchAtlasError
from generator.models.encoder import NORMS, QKV_VIEWS, Encoder
from generator.models.registry import ModelEntry, get_model_entry, with_input_size
from generator.options import check_choices, choice_field
from generator.sources.base import SegmentationSource
from generator.sources.geometry import DEFAULT_RESIZE, RESIZE_POLICIES, check_resize
from generator.sources.labels import LABEL_RULES
from generator.store.manifest import file_sha256
from generator.store.repo import (
    attention_data_dir,
    config_data_dir,
    prefix_data_dir,
    shard_name,
)
from generator.store.schema import DEFAULT_EMBEDDING_DTYPE, EMBEDDING_DTYPES

# Bumped whenever extraction would produce different tokens or rows for the same inputs.
EXTRACTOR_VERSION = "4"


# The Hub's guidance for Parquet shards: at most about 500 MB each.
SHARD_BYTES = 500 * 1000 * 1000


# Bytes of a patch row besides its embedding (row and col int16, label int64 as a ClassLabel,
# the image id's int32 dictionary index: 2 + 2 + 8 + 4), so that the shard bound holds.
ROW_OVERHEAD_BYTES = 16


# Images per forward pass: large on GPUs, where small batches leave the device idle (ViT-B/16 in
# bf16 at 256 needs about 2 GiB); moderate on CPUs, where it only bounds memory.
DEFAULT_BATCH_SIZES = {"cuda": 256, "cpu": 16}


@dataclass
class ExtractOptions:
    layers: str | Sequence[int] = "all"
    norms: Sequence[str] = choice_field(NORMS, NORMS)
    label_rule: str = choice_field("majority", LABEL_RULES)
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZES for the device
    device: str = "cpu"
    weights: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint path
    # Models whose checkpoint may be unpickled (it holds Python objects beside the tensors).
    # Not a token parameter: the tensors read are the same either way.
    trust_checkpoints: Sequence[str] = ()
    last_block_attention: bool = True  # CLS attention maps and q/k/v views of the last block
    variants: bool = True  # last-layer tokens of degraded and transformed evaluation images
    cache_dir: str | None = None
    progress: bool = True
    embedding_dtype: str = choice_field(DEFAULT_EMBEDDING_DTYPE, EMBEDDING_DTYPES)  # what the published tables store
    # The Hub repository the published files name: "ORG" (ORG/<dataset>), "ORG/NAME", or a
    # {dataset: "ORG[/NAME]"} mapping (generator.store.repo.hub_repo_id); None keeps the recorded one.
    hub_repo: str | dict[str, str] | None = None
    shard_bytes: int = SHARD_BYTES  # the most bytes of one Parquet shard
    rank: int = 0  # this worker, of world_size workers sharing the shards (torchrun's RANK)
    world_size: int = 1
    # Layer-wise curves (k-NN, variance, norms) of these layers; those not published are
    # streamed from the extraction pass (generator/stream.py), scored by the analyses' protocol.
    curve_layers: str | Sequence[int] = "all"
    probe: ProbeProtocol = field(default_factory=ProbeProtocol)
    # Where images are decoded: "host" (PIL) or "device" (JPEGs by torchvision on the model's
    # device; see generator/batches.py).
    decode: str = choice_field("host", DECODE_MODES)
    # torch.compile the model's blocks (Encoder.compile_blocks); off by default, as the compiler's
    # start-up only pays back on long GPU runs.
    compile_blocks: bool = False
    # How an image becomes the square model input: "squash" or "short-side-crop"
    # (generator/sources/geometry.py); the masks follow the same geometry.
    resize: str = choice_field(DEFAULT_RESIZE, RESIZE_POLICIES)
    # The input side: None keeps each model's registry size; one number sets every model's; a
    # dict sets the named models' (model name -> side). Each must be a multiple of the patch size.
    input_size: int | dict[str, int] | None = None

    def validate(self) -> ExtractOptions:
        """Raise a PatchAtlasError naming the first option with a bad value; changes nothing."""
        check_resize(self.resize)  # first: its message says what each policy does
        check_choices(self)
        sizes = self.input_size.values() if isinstance(self.input_size, dict) else [self.input_size]
        for size in sizes:
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise PatchAtlasError(f"input size {size!r}: expected a positive number of pixels such as 448")
        if isinstance(self.input_size, dict):
            for name in self.input_size:
                get_model_entry(name)
        self.probe.validate()
        if self.shard_bytes < 1:
            raise PatchAtlasError(f"shard size {self.shard_bytes} bytes: must be positive")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise PatchAtlasError(f"worker rank {self.rank} of world size {self.world_size}: expected "
                                  f"0 ≤ rank < world size (torchrun sets RANK and WORLD_SIZE)")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise PatchAtlasError(f"--batch-size {self.batch_size!r}: must be a whole number of at least 1")
        return self

    def resolved(self) -> ExtractOptions:
        """These options with the device's default batch size filled in where none was given."""
        if self.batch_size is not None:
            return self
        return dataclasses.replace(self, batch_size=DEFAULT_BATCH_SIZES["cuda" if str(self.device).startswith("cuda")
                                                                          else "cpu"])

    def entry_for(self, entry: ModelEntry) -> ModelEntry:
        """``entry`` at the input size these options ask for (itself when they ask for none)."""
        size = self.input_size.get(entry.name) if isinstance(self.input_size, dict) else self.input_size
        return entry if size is None else with_input_size(entry, size)


def token_params(entry: ModelEntry, source: SegmentationSource, options: ExtractOptions,
                 sha256=file_sha256) -> dict:
    """Everything that determines the bytes of any one table of a (source, model) unit.

    Which tables are asked for (layers, views) is not part of it: a table already written with
    these parameters is kept when another layer is added, and only the new layers are computed.
    ``sha256`` hashes the checkpoint (a run passes ``Manifest.sha256``, which hashes it once).
    """
    checkpoint = options.weights.get(entry.name)
    return {
        "model": dataclasses.asdict(entry),
        "checkpoint": {"path": str(checkpoint), "sha256": sha256(Path(checkpoint))}
        if checkpoint and Path(checkpoint).is_file() else None,
        "source": {"name": source.name, "revision": source.revision},
        "label_rule": options.label_rule,
        "embedding_dtype": options.embedding_dtype,
        "shard_bytes": options.shard_bytes,
        "extractor": EXTRACTOR_VERSION,
        # nvJPEG may round a few pixels differently from libjpeg; host decoding keeps the
        # parameters (and so the reuse) of tables written before the option existed.
        **({"decode": options.decode} if options.decode != "host" else {}),
        # Compiled kernels round differently from eager ones (a few ulp).
        **({"compile_blocks": True} if options.compile_blocks else {}),
        # The input size is the model row's ``input_size`` above; squash keeps the parameters of
        # tables written before the policy was an option.
        **({"resize": options.resize} if options.resize != DEFAULT_RESIZE else {}),
        # A constructed control's weights come from code: a changed construction changes tokens.
        **({"controls_version": _controls_version()} if entry.construction else {}),
    }


def _controls_version() -> str:
    from generator.models.controls import CONTROLS_VERSION

    return CONTROLS_VERSION


def model_params(entry: ModelEntry, source: SegmentationSource, layers: list[int] | str,
                 options: ExtractOptions, sha256=file_sha256) -> dict:
    """A (source, model) unit: its token parameters and the set of tables asked for."""
    return {**token_params(entry, source, options, sha256), "layers": layers, "norms": list(options.norms),
            "last_block_attention": options.last_block_attention}


@dataclass(frozen=True)
class Shard:
    """Images ``start:stop`` of a source: one file per table of a model's configs."""

    index: int
    total: int
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return shard_name(self.index, self.total)


def images_per_shard(grid: tuple[int, int], dim: int, dtype: str, shard_bytes: int) -> int:
    """How many images fill a shard of one config without passing ``shard_bytes``.

    Counted from the uncompressed row size (zstd barely shrinks float tokens), so the bound
    holds for the files as written. It depends only on the model and the options, never on the
    batch size or the number of workers, so every run cuts the same shards.
    """
    row_bytes = dim * np.dtype(dtype).itemsize + ROW_OVERHEAD_BYTES
    return max(1, shard_bytes // (grid[0] * grid[1] * row_bytes))


def plan_shards(num_images: int, per_shard: int) -> list[Shard]:
    total = max(1, -(-num_images // per_shard))
    return [Shard(i, total, i * per_shard, min(num_images, (i + 1) * per_shard)) for i in range(total)]


class JobCounter:
    """Numbers the jobs of a run in plan order; job j belongs to worker j mod world_size.

    Every worker walks the same plan, so they agree on who does what without talking.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size, self.next = rank, world_size, 0

    def take(self) -> bool:
        """Number the next job; True when it is this worker's."""
        mine = self.next % self.world_size == self.rank
        self.next += 1
        return mine


def table_geometry(encoder: Encoder, options: ExtractOptions, *, layer: int | None, view: str | None) -> dict:
    """How a token table's rows were made, recorded in its Parquet schema metadata."""
    entry = encoder.entry
    geometry = {"model": entry.name, "model_id": entry.published_id,
                "input_size": entry.input_size, "patch_size": entry.patch_size,
                "grid": list(entry.grid_size()), "resize": encoder.resize, "label_rule": options.label_rule}
    if layer is not None:
        geometry.update(layer=layer, view=view)
    return geometry


@dataclass(frozen=True)
class TableSpec:
    """One table of a model's shard: patch tokens of a (layer, view), prefix tokens of a
    (layer, norm), or the last block's CLS attention."""

    kind: str  # "patches" | "prefix" | "attention"
    layer: int
    view: str  # prenorm | postnorm | queries | keys | values; "" for attention


def shard_tables(model: str, depth: int, num_prefix_tokens: int, layers: list[int], options: ExtractOptions,
                 file_name: str) -> dict[str, TableSpec]:
    """Every table one shard of a unit holds: path relative to the repository root → what it is.

    Prefix tokens get one file per (layer, norm), like the patch configs, so that a table can
    be kept or added on its own.
    """
    tables = {}
    for layer in layers:
        for norm in options.norms:
            tables[f"{config_data_dir(model, layer, norm)}/{file_name}"] = TableSpec("patches", layer, norm)
            if num_prefix_tokens:
                tables[f"{prefix_data_dir(model)}/L{layer:02d}-{norm}-{file_name}"] = TableSpec("prefix", layer, norm)
    if options.last_block_attention:
        for view in QKV_VIEWS:
            tables[f"{config_data_dir(model, depth, view)}/{file_name}"] = TableSpec("patches", depth, view)
        if num_prefix_tokens:
            tables[f"{attention_data_dir(model)}/{file_name}"] = TableSpec("attention", depth, "")
    return tables
