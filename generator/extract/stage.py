"""The extract stage: images in, per-layer patch tokens out, written as a Hub dataset repository.

Batches flow source → preprocess → encoder → one Parquet writer per (layer, norm). Each
(source, model) unit is recorded in the manifest only after all its files are in place, so an
interrupted run resumes by redoing only the units that are not recorded as done.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from generator import __version__
from generator.analyses.probes import ProbeProtocol
from generator.batches import (
    DECODE_MODES,
    encoder_if_available,
    grid_labels,
    labelled_batches,
    load_encoder_for,
    rgb8_array,
)
from generator.concurrency import BackgroundCalls
from generator.errors import PatchAtlasError, WeightsUnavailable
from generator.figures.palette import IGNORE_COLOR, PALETTE
from generator.models.encoder import NORMS, QKV_VIEWS, Encoder, resolve_layers
from generator.models.registry import Geometry, ModelEntry, get_model_entry, model_geometry, with_input_size
from generator.options import check_choices, choice_field
from generator.sources.base import SegmentationSource
from generator.sources.degradations import (
    DEGRADATIONS,
    TRANSFORMS,
    apply_degradation,
    apply_transform,
    patch_correspondence,
)
from generator.sources.geometry import DEFAULT_RESIZE, RESIZE_POLICIES, check_resize, input_geometry
from generator.sources.labels import LABEL_RULES
from generator.sources.splits import PROBE_TRAIN_FRACTION, few_shot_split
from generator.store.atomic import atomic_path
from generator.store.layout import (
    WORKER_MANIFEST_GLOB,
    dataset_repo_dir,
    extract_key,
    images_key,
    manifest_path,
    shard_key,
    source_key,
    variant_name,
    variant_path,
    variants_dir,
    variants_key,
    worker_manifest_path,
    worker_manifests_dir,
)
from generator.store.manifest import Manifest, file_sha256, params_hash
from generator.store.masks import palette_mask_png
from generator.store.parquet import (
    AttentionTableWriter,
    PatchTableWriter,
    PrefixTableWriter,
    check_float16_range,
    write_images_shards,
)
from generator.store.records import (
    ConfigRecord,
    ExtractRecord,
    ModelFacts,
    SourceRecord,
    VariantsRecord,
    extract_records,
    record_hub_repo,
    recorded_hub_repo,
    source_record,
    source_records,
)
from generator.store.repo import (
    IMAGES_CONFIG,
    ConfigCardInfo,
    attention_config_name,
    attention_data_dir,
    check_hub_repo_fits,
    config_data_dir,
    config_name,
    prefix_config_name,
    prefix_data_dir,
    shard_name,
    write_dataset_card,
)
from generator.store.schema import DEFAULT_EMBEDDING_DTYPE, EMBEDDING_DTYPES, label_names
from generator.stream import LayerwiseAccumulator, plan_stream, run_stream_unit

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


@dataclass
class ModelOutcome:
    model: str
    status: str  # "done" | "skipped" | "reused" | "worker" (a share of the shards, in a distributed run)
    reason: str = ""
    configs: list[str] = field(default_factory=list)


def _cell_bytes(column_value: dict) -> bytes:
    """The encoded bytes of a ``datasets.Image`` cell read with ``decode=False``."""
    if column_value.get("bytes"):
        return column_value["bytes"]
    return Path(column_value["path"]).read_bytes()


def record_source(source: SegmentationSource, manifest: Manifest) -> None:
    """What later stages need to know of a source without reloading it."""
    manifest.set(source_key(source.name), SourceRecord(
        name=source.name, revision=source.revision, license=source.license,
        description=source.description, params=source.params, ignore_index=source.ignore_index,
        classes=[dataclasses.asdict(c) for c in source.classes], num_images=len(source),
        probes=source.probes, probe_train_count=source.probe_train_count,
        skipped_images=[dict(s) for s in source.skipped],
    ).to_entry())


def write_images(source: SegmentationSource, repo: Path, manifest: Manifest, shard_bytes: int) -> None:
    key = images_key(source.name)
    params = {"source": source.name, "revision": source.revision, "shard_bytes": shard_bytes,
              "extractor": EXTRACTOR_VERSION}
    if manifest.is_done(key, params, repo):
        return
    raw = source.dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
        "mask", datasets.Image(decode=False))

    def rows():
        for row in raw:
            image_png = _cell_bytes(row["image"])
            # The site's palette, so a mask on the Hub shows the colours of the atlas' figures.
            mask_png = palette_mask_png(_cell_bytes(row["mask"]), PALETTE, source.ignore_index, IGNORE_COLOR)
            width, height = Image.open(io.BytesIO(image_png)).size
            yield {"image_id": row["image_id"], "image_png": image_png, "mask_png": mask_png,
                   "width": width, "height": height}

    paths = write_images_shards(repo / IMAGES_CONFIG, rows(), shard_bytes)
    manifest.set(key, {"status": "done", "params": params, "params_hash": params_hash(params),
                       "files": {str(p.relative_to(repo)): manifest.sha256(p) for p in paths}})
    manifest.save()


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


def extract_shard(source: SegmentationSource, encoder: Encoder, shard: Shard, tables: dict[str, TableSpec],
                  options: ExtractOptions, repo: Path, layerwise: LayerwiseAccumulator | None = None) -> dict[str, str]:
    """Run one model over one shard's images and write the given tables of that shard.

    The forward pass goes only as deep as the tables need, or as ``layerwise`` needs: its
    layers' tokens (the unpublished layers of the layer-wise curves) come from the same pass and
    are counted, not written. Returns the written files (path relative to ``repo`` → sha256).
    """
    entry, dim, dtype = encoder.entry, encoder.embed_dim, options.embedding_dtype
    kinds = ["cls"] * (encoder.num_prefix_tokens - entry.num_registers) + ["register"] * entry.num_registers
    token_tables = [t for t in tables.values() if t.view in NORMS]
    layers = sorted({t.layer for t in token_tables})
    norms = [norm for norm in options.norms if any(t.view == norm for t in token_tables)]
    if layerwise is not None:
        layers, norms = sorted(set(layers) | set(layerwise.layers)), list(NORMS)
    with_attention = any(t.kind == "attention" or t.view in QKV_VIEWS for t in tables.values())
    images = source.dataset.select(range(shard.start, shard.stop))

    # ExitStack hands an exception to every writer, so none of them renames a partial file; the
    # background writer is entered last, so it is drained (or stopped) before the files close.
    with contextlib.ExitStack() as stack:
        # q/k/v concatenate the heads: heads × head_dim, the embedding width in timm ViTs.
        names = label_names(source.classes, source.ignore_index)
        patch_writers = {(t.layer, t.view): stack.enter_context(PatchTableWriter(
            repo / rel, dim, dtype=dtype, label_names=names,
            geometry=table_geometry(encoder, options, layer=t.layer, view=t.view)))
            for rel, t in tables.items() if t.kind == "patches"}
        prefix_writers = {(t.layer, t.view): stack.enter_context(PrefixTableWriter(
            repo / rel, dim, dtype=dtype, geometry=table_geometry(encoder, options, layer=None, view=None)))
            for rel, t in tables.items() if t.kind == "prefix"}
        attention_writer = next((stack.enter_context(AttentionTableWriter(repo / rel))
                                 for rel, t in tables.items() if t.kind == "attention"), None)
        # Tables are independent files: several encode at once (Arrow releases the GIL).
        table_pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(len(tables), os.cpu_count() or 1)), thread_name_prefix="table"))
        background = stack.enter_context(BackgroundCalls(depth=2))

        def write(image_ids, labels, patches, prefixes, cls_maps):  # runs on the writer thread
            calls = [(patch_writers[key].write_batch, (image_ids, array, labels)) for key, array in patches.items()]
            calls += [(prefix_writers[key].write_batch, (image_ids, key[0], key[1], array, kinds))
                      for key, array in prefixes.items()]
            if attention_writer is not None:
                calls.append((attention_writer.write_batch, (image_ids, cls_maps)))
            list(table_pool.map(lambda call: call[0](*call[1]), calls))

        batches = labelled_batches(images, options.batch_size, encoder, options.label_rule, source.ignore_index,
                                   decode=options.decode)
        total = -(-len(images) // options.batch_size)
        desc = f"{entry.name} on {source.name}" + (f" [{shard.index + 1}/{shard.total}]" if shard.total > 1 else "")
        first_index = shard.start
        for image_ids, pixels_uint8, labels in tqdm(batches, total=total, disable=not options.progress,
                                                    desc=desc, unit="batch"):
            pixels = encoder.preprocess(pixels_uint8)
            if with_attention:
                batch, attention = encoder.tokens_and_attention(pixels, layers, norms)
            else:
                batch, attention = encoder.tokens(pixels, layers, norms), None
            tokens = {key: toks.patch for key, toks in batch.layers.items()}
            if attention is not None:
                tokens.update({(encoder.depth, view): t for view, t in attention.views.items()})
            where = f"{entry.name} on images {image_ids[0]}..{image_ids[-1]}"
            background.submit(
                write, image_ids, labels,
                {key: to_host(t, dtype, f"{where}, layer {key[0]} ({key[1]})")
                 for key, t in tokens.items() if key in patch_writers},
                {key: to_host(toks.prefix, dtype, f"{where}, layer {key[0]} ({key[1]}) prefix")
                 for key, toks in batch.layers.items() if key in prefix_writers},
                attention.cls_maps.cpu().numpy() if attention_writer is not None else None)
            # After the published tokens went to the host, so that their copies do not wait for
            # the accumulators' work on the device.
            if layerwise is not None:
                layerwise.update(first_index, labels, batch)
            first_index += len(image_ids)
    return {rel: file_sha256(repo / rel) for rel in tables}


def to_host(tokens: torch.Tensor, dtype: str, where: str) -> np.ndarray:
    """Tokens as a host array of the stored dtype, refusing values the table cannot hold.

    The cast happens on the model's device, so a GPU sends half the bytes for float16; one
    reduction checks both NaN/inf (which it propagates) and float16's range.
    """
    peak = float(tokens.abs().amax()) if tokens.numel() else 0.0
    if not math.isfinite(peak):
        raise PatchAtlasError(f"{where}: NaN/inf tokens; the weights or the inputs are broken")
    if dtype == "float16":
        check_float16_range(peak, f"{where}: tokens")
    return tokens.to(getattr(torch, dtype)).cpu().numpy()


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


def open_manifest(out: Path, options: ExtractOptions) -> Manifest:
    """The manifest this run records into.

    A single process folds in what workers of a distributed run recorded (``manifest.d/``) and
    owns ``manifest.json``. A worker starts from ``manifest.json`` (to reuse what is done) and
    writes its own file, so workers never write the same file.
    """
    main = Manifest.load(manifest_path(out))
    workers = sorted(worker_manifests_dir(out).glob(WORKER_MANIFEST_GLOB))
    if options.world_size == 1:
        for path in workers:
            main.merge(Manifest.load(path))
        if workers:
            main.save()
            for path in workers:
                path.unlink()
        return main
    worker = Manifest(worker_manifest_path(out, options.rank, options.world_size))
    worker.merge(main)
    own = worker.path
    if own.exists():
        worker.merge(Manifest.load(own))
    return worker


def run_extract(out: Path, sources: Sequence[SegmentationSource], model_names: Sequence[str],
                options: ExtractOptions) -> dict[str, list[ModelOutcome]]:
    """The stage: every (source, model) shard not already done, then each model's configs and the cards.

    With ``world_size > 1`` this process is one worker of a distributed run: it extracts only
    its share of the shards and records them in its own manifest; a later single-process run
    (``patchatlas extract`` or ``build`` with the same options) merges the workers' records,
    reuses their shards and finishes the configs and cards.
    """
    options = options.validate().resolved()
    check_hub_repo_fits(options.hub_repo, [source.name for source in sources])
    out = Path(out)
    manifest = open_manifest(out, options)
    # Unknown names and input sizes that do not fit a model fail before any work.
    entries = [options.entry_for(get_model_entry(name)) for name in model_names]
    for name in [*options.weights, *options.trust_checkpoints]:
        get_model_entry(name)
    jobs = JobCounter(options.rank, options.world_size)
    outcomes: dict[str, list[ModelOutcome]] = {}
    for source in sources:
        if len(source) == 0:
            raise PatchAtlasError(f"dataset {source.name!r} has no images; nothing to extract")
        repo = dataset_repo_dir(out, source.name)
        record_source(source, manifest)
        if jobs.take():
            write_images(source, repo, manifest, options.shard_bytes)
        outcomes[source.name] = []
        for entry in entries:
            outcomes[source.name].append(_extract_unit(source, entry, options, repo, manifest, jobs))
        if options.world_size == 1:
            record_hub_repo(manifest, source.name, options.hub_repo)
            write_card(source.name, repo, manifest)
        manifest.save()
    return outcomes


def _extract_unit(source: SegmentationSource, entry: ModelEntry, options: ExtractOptions,
                  repo: Path, manifest: Manifest, jobs: JobCounter) -> ModelOutcome:
    key = extract_key(source.name, entry.name)
    params = model_params(entry, source, options.layers if isinstance(options.layers, str)
                          else list(options.layers), options, manifest.sha256)
    tokens_hash = params_hash(token_params(entry, source, options, manifest.sha256))
    geometry = model_geometry(entry)
    shards = plan_shards(len(source), images_per_shard(entry.grid_size(), geometry.embed_dim,
                                                       options.embedding_dtype, options.shard_bytes))
    mine = [jobs.take() for _ in shards]
    variants_mine = jobs.take()
    worker = options.world_size > 1
    out = repo.parent.parent
    if not worker and manifest.is_done(key, params, repo):
        done = _extract_record(manifest, key)
        if options.variants:
            _variants_unit(source, entry, options, out, manifest, tokens_hash, None)
        run_stream_unit(source, entry, options, out, manifest, tokens_hash, None, done.layers,
                        spans=[(shard.start, shard.stop) for shard in shards])
        return ModelOutcome(entry.name, "reused", configs=[c.name for c in done.configs])
    layers = resolve_layers(options.layers, geometry.depth)
    encoder: Encoder | None = None
    layerwise: LayerwiseAccumulator | None = None
    computed = 0
    todo = []
    for shard, is_mine in zip(shards, mine):
        if not is_mine:
            continue
        wanted = shard_tables(entry.name, geometry.depth, geometry.num_prefix_tokens, layers, options,
                              shard.file_name)
        record_key = shard_key(source.name, entry.name, shard.index, shard.total)
        shard_params = _shard_params(tokens_hash, shard)
        # Tables this shard already holds with the same token parameters, every file intact.
        held = manifest.get(record_key)["files"] if manifest.is_done(record_key, shard_params, repo) else {}
        missing = {rel: spec for rel, spec in wanted.items() if rel not in held}
        if missing:
            todo.append((shard, record_key, shard_params, held, missing))
    # The layer-wise curves ride on the extraction pass when it sees every image in order.
    stream = None if worker or len(todo) != len(shards) else \
        plan_stream(source, entry, options, out, manifest, tokens_hash, layers)
    for shard, record_key, shard_params, held, missing in todo:
        if encoder is None:
            try:
                encoder = load_encoder_for(entry, options)
            except WeightsUnavailable as err:
                manifest.set(key, ExtractRecord(status="skipped", reason=str(err), params=params,
                                                params_hash=params_hash(params), files={},
                                                model_facts=ModelFacts.from_model(entry)).to_entry())
                manifest.save()
                return ModelOutcome(entry.name, "skipped", reason=str(err))
            if stream is not None:
                layerwise = LayerwiseAccumulator(source, stream.layers, encoder, options)
        files = extract_shard(source, encoder, shard, missing, options, repo, layerwise)
        for rel, digest in files.items():
            manifest.remember_sha256(repo / rel, digest)
        manifest.set(record_key, {"status": "done", "params": shard_params, "files": {**held, **files},
                                  "weights": dataclasses.asdict(encoder.weights)})
        manifest.save()
        computed += 1
    if not worker:
        _finish_unit(source, entry, geometry, layers, shards, params, tokens_hash, options, repo, manifest)
    if options.variants and variants_mine:
        _variants_unit(source, entry, options, out, manifest, tokens_hash, encoder)
    if not worker:  # one ordered pass over all images: the merging run does it after a distributed one
        run_stream_unit(source, entry, options, out, manifest, tokens_hash, encoder, layers,
                        fused=layerwise, spans=[(shard.start, shard.stop) for shard in shards])
    del encoder, layerwise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if worker:
        return ModelOutcome(entry.name, "worker", reason=f"{computed} of {len(shards)} shards extracted here")
    done = _extract_record(manifest, key)
    return ModelOutcome(entry.name, "done" if computed else "reused", configs=[c.name for c in done.configs])


def _extract_record(manifest: Manifest, key: str) -> ExtractRecord:
    return ExtractRecord.from_entry(manifest.get(key), f"{manifest.path}: entry {key!r}")


def _shard_params(tokens_hash: str, shard: Shard) -> dict:
    return {"tokens": tokens_hash, "shard": shard.index, "of": shard.total, "images": [shard.start, shard.stop]}


def _finish_unit(source: SegmentationSource, entry: ModelEntry, geometry: Geometry, layers: list[int],
                 shards: list[Shard], params: dict, tokens_hash: str, options: ExtractOptions, repo: Path,
                 manifest: Manifest) -> None:
    """Record a (source, model) unit whose shards are all done: its configs, files and weights.

    Tables the unit no longer asks for (layers or views of an earlier run, shards of another
    size) are removed, from disk and from the shard records, so the repository holds exactly
    what the card describes.
    """
    wanted = [shard_tables(entry.name, geometry.depth, geometry.num_prefix_tokens, layers, options,
                           shard.file_name) for shard in shards]
    records = []
    for shard, tables in zip(shards, wanted):
        record = manifest.get(shard_key(source.name, entry.name, shard.index, shard.total))
        if record is None or not set(tables) <= set(record["files"]):
            raise PatchAtlasError(f"{entry.name} on {source.name}: shard {shard.index + 1} of {shard.total} is "
                                  f"incomplete; rerun `patchatlas extract` with the same options")
        if set(record["files"]) != set(tables):
            record = {**record, "files": {rel: record["files"][rel] for rel in tables}}
            manifest.set(shard_key(source.name, entry.name, shard.index, shard.total), record)
        records.append(record)
    files = {rel: digest for record in records for rel, digest in record["files"].items()}
    model_dir = repo / entry.name
    for stale in set(model_dir.rglob("*.parquet")) - {repo / rel for rel in files}:
        stale.unlink()
    grid = entry.grid_size()
    paths_of = [{spec: rel for rel, spec in tables.items()} for tables in wanted]  # per shard: table → path
    configs = []
    for spec in wanted[0].values():
        if spec.kind != "patches":
            continue
        paths = [shard_paths[spec] for shard_paths in paths_of]
        configs.append(ConfigRecord(
            name=config_name(entry.name, spec.layer, spec.view), paths=paths, layer=spec.layer,
            norm=spec.view, dim=geometry.embed_dim, dtype=options.embedding_dtype,
            num_rows=len(source) * grid[0] * grid[1],
            num_bytes=sum((repo / path).stat().st_size for path in paths),
        ))
    prefix_paths = [rel for tables in wanted for rel, spec in tables.items() if spec.kind == "prefix"]
    attention_paths = [rel for tables in wanted for rel, spec in tables.items() if spec.kind == "attention"]
    manifest.set(extract_key(source.name, entry.name), ExtractRecord(
        status="done", params=params, params_hash=params_hash(params), files=files,
        configs=tuple(configs), layers=layers, grid=list(grid), dim=geometry.embed_dim,
        prefix_paths=prefix_paths or None, attention_paths=attention_paths or None,
        shards=len(shards), weights=records[0]["weights"], model=entry.name, source=source.name,
        version=__version__, model_facts=ModelFacts.from_model(entry),
    ).to_entry())
    manifest.save()


def _variants_unit(source: SegmentationSource, entry: ModelEntry, options: ExtractOptions, out: Path,
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


def apply_hub_repo(out: Path, hub_repo: str | dict[str, str] | None) -> list[str]:
    """Record ``hub_repo`` for every extracted dataset it names and rewrite their cards.

    Returns the datasets whose recorded repository changed (their cards now name it).
    """
    if hub_repo is None:
        return []
    manifest = Manifest.load(manifest_path(out))
    sources = source_records(manifest)
    check_hub_repo_fits(hub_repo, [source.name for source in sources])
    changed = []
    for source in sources:
        name = source.name
        before = recorded_hub_repo(manifest, name)
        if record_hub_repo(manifest, name, hub_repo) != before:
            changed.append(name)
        write_card(name, dataset_repo_dir(Path(out), name), manifest)
    manifest.save()
    return changed


def write_card(source_name: str, repo: Path, manifest: Manifest) -> Path:
    """Re-render the dataset card from what the manifest records for this source."""
    source = source_record(manifest, source_key(source_name))
    if source is None:
        raise PatchAtlasError(f"{repo}: no record of dataset {source_name!r}; run `patchatlas extract` first")
    cards: list[ConfigCardInfo] = []
    extra_configs: list[dict] = []
    for name, unit in extract_records(manifest, source_name):
        if not unit.done:
            continue
        facts = unit.model_facts
        weights = unit.weights or {}
        if unit.prefix_paths:
            extra_configs.append({"name": prefix_config_name(name), "model": facts.timm_id,
                                  "kind": "CLS and register tokens", "license": facts.license,
                                  "data_files": str(Path(unit.prefix_paths[0]).parent / "*.parquet")})
        if unit.attention_paths:
            extra_configs.append({"name": attention_config_name(name), "model": facts.timm_id,
                                  "kind": "last-block CLS attention", "license": facts.license,
                                  "data_files": str(Path(unit.attention_paths[0]).parent / "*.parquet")})
        for cfg in unit.configs:
            cards.append(ConfigCardInfo(
                name=cfg.name, data_files=str(Path(cfg.paths[0]).parent / "*.parquet"),
                model=name, model_id=facts.published_id,
                revision=weights.get("revision", ""), layer=cfg.layer, norm=cfg.norm,
                input_size=unit.input_size, patch_size=facts.patch_size, resize=unit.resize,
                label_rule=unit.label_rule, dim=cfg.dim, num_rows=cfg.num_rows,
                num_bytes=cfg.num_bytes, license=facts.license, dtype=cfg.dtype,
            ))
    info = {
        "name": source.name, "description": source.description, "license": source.license,
        "revision": source.revision, "repo_id": recorded_hub_repo(manifest, source_name),
        "num_images": source.num_images, "classes": source.classes, "ignore_index": source.ignore_index,
        "extra_configs": extra_configs,
    }
    return write_dataset_card(repo, info, cards)
