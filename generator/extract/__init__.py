"""The extract stage: images in, per-layer patch tokens out, written as a Hub dataset repository.

Batches flow source → preprocess → encoder → one Parquet writer per (layer, norm). Each
(source, model) unit is recorded in the manifest only after all its files are in place, so an
interrupted run resumes by redoing only the units that are not recorded as done.

``plan`` says what a unit extracts, ``engine`` runs the encoder over a shard, ``variants`` makes
the degraded-image tokens, and ``stage`` walks the units of a run.
"""

from generator.extract.engine import extract_shard, to_host
from generator.extract.plan import (
    DEFAULT_BATCH_SIZES,
    EXTRACTOR_VERSION,
    ROW_OVERHEAD_BYTES,
    SHARD_BYTES,
    ExtractOptions,
    JobCounter,
    Shard,
    TableSpec,
    images_per_shard,
    model_params,
    plan_shards,
    shard_tables,
    table_geometry,
    token_params,
)
from generator.extract.stage import (
    ModelOutcome,
    apply_hub_repo,
    open_manifest,
    record_source,
    run_extract,
    write_card,
    write_images,
)
from generator.extract.variants import variants_unit

# Layout helpers that callers of the stage name alongside it.
from generator.store.layout import dataset_repo_dir, extract_key, variants_dir

__all__ = [
    "DEFAULT_BATCH_SIZES", "EXTRACTOR_VERSION", "ROW_OVERHEAD_BYTES", "SHARD_BYTES", "ExtractOptions", "JobCounter",
    "ModelOutcome", "Shard", "TableSpec", "apply_hub_repo", "dataset_repo_dir", "extract_key", "extract_shard",
    "images_per_shard", "model_params", "open_manifest", "plan_shards", "record_source", "run_extract", "shard_tables",
    "table_geometry", "to_host", "token_params", "variants_dir", "variants_unit", "write_card", "write_images",
]
