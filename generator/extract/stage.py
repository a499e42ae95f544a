"""The extract stage's flow: the (source, model) units of a run, the manifest, images, source records, cards."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from PIL import Image

from generator import __version__
from generator.batches import (
    load_encoder_for,
)
from generator.errors import PatchAtlasError, WeightsUnavailable
from generator.extract.engine import extract_shard
from generator.extract.plan import (
    EXTRACTOR_VERSION,
    ExtractOptions,
    JobCounter,
    Shard,
    images_per_shard,
    model_params,
    plan_shards,
    shard_tables,
    token_params,
)
from generator.extract.variants import variants_unit
from generator.figures.palette import IGNORE_COLOR, PALETTE
from generator.models.encoder import Encoder, resolve_layers
from generator.models.registry import Geometry, ModelEntry, get_model_entry, model_geometry
from generator.sources.base import SegmentationSource
from generator.store.layout import (
    WORKER_MANIFEST_GLOB,
    dataset_repo_dir,
    extract_key,
    images_key,
    manifest_path,
    shard_key,
    source_key,
    worker_manifest_path,
    worker_manifests_dir,
)
from generator.store.manifest import Manifest, params_hash
from generator.store.masks import palette_mask_png
from generator.store.parquet import (
    write_images_shards,
)
from generator.store.records import (
    ConfigRecord,
    ExtractRecord,
    ModelFacts,
    SourceRecord,
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
    check_hub_repo_fits,
    config_name,
    prefix_config_name,
    write_dataset_card,
)
from generator.stream import LayerwiseAccumulator, plan_stream, run_stream_unit


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
            variants_unit(source, entry, options, out, manifest, tokens_hash, None)
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
        variants_unit(source, entry, options, out, manifest, tokens_hash, encoder)
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
