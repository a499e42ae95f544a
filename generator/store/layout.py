"""Where everything in an output folder lives, and the manifest keys that name its units.

Every stage finds the files of the stages before it here, so a path or a key is spelt once::

    <out>/
      manifest.json                  the build manifest (generator.store.manifest)
      manifest.d/rank-R-of-N.json    what each worker of a distributed run recorded
      datasets/<source>/             a Hub dataset repository (its inside: generator.store.repo,
                                     which owns the config folders and shard names)
      variants/<source>/<model>/     degraded and transformed evaluation tokens (.npz)
      results/<source>/<model>/      layerwise.json, attention.json + .npz
      results/<source>/<model>/<config>/
                                     kmeans.json, kmeans-k<k>.npz, maps.json + .npz, probes.json
      docs/   site/                  the rendered Markdown and the built HTML
      .render-XXXX/                  a render's staging folder, swapped in whole
      .docs.old/  .site.old/         the previous tree while a swap is under way
      .patchatlas.lock*              the folder's lock (generator.store.lock)
      .<name>.XXXX.tmp               a file being written (generator.store.atomic)

Manifest keys, one unit each::

    sources/<source>                 what later stages need of a source (SourceRecord)
    hub/<source>                     the Hub repository its files name
    extract/<source>/images          the images config
    extract/<source>/<model>         a model's extract (ExtractRecord)
    shards/<source>/<model>/<i>-of-<n>
    variants/<source>/<model>        (VariantsRecord)
    stream/<source>/<model>          the layer-wise curves streamed from the extraction
    analyze/<source>/<model>/<config>, analyze/<source>/<model>/attention

This module only names things: it reads and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

# --- the output folder ------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
# Where the workers of a distributed run record what they did, one file each.
WORKER_MANIFESTS = "manifest.d"
WORKER_MANIFEST_GLOB = "rank-*.json"
DATASETS_DIR = "datasets"
RESULTS_DIR = "results"
VARIANTS_DIR = "variants"
DOCS_DIR = "docs"
SITE_DIR = "site"
# Inside a render's staging folder: the docs and site it builds before they are swapped in.
RENDER_STAGING_PREFIX = ".render-"
RENDER_STAGING_GLOB = f"{RENDER_STAGING_PREFIX}*"
# A swap keeps the previous docs/ or site/ as ".<name>.old" until the new one is in place.
SWAP_LEFTOVER_GLOB = ".*.old"

# The folder's lock, who holds it, and the per-rank locks of a distributed run's workers.
LOCK_NAME = ".patchatlas.lock"
HOLDER_NAME = f"{LOCK_NAME}.holder"
RANK_GLOB = f"{LOCK_NAME}.rank-*-of-*"
# Temporary files are ".<final name>.<random>.tmp", next to their final name: hidden, so a
# push never uploads one, and matched by one glob, so a cleanup finds them all.
TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_GLOB = f".*{TEMPORARY_SUFFIX}"
# What two runs of the same command may leave differently, however often either was killed:
# the lock holder's PID and command, and in the manifest when each unit was recorded and the
# hash cache (size, mtime, inode of each file hashed). Every other byte is the same
# (generator.store.lock.comparable_digests masks exactly these).
RUN_DEPENDENT = {
    HOLDER_NAME: "the PID and command of the last holder",
    MANIFEST_FILE: ("updated_at", "file_stats"),
}


def temporary_prefix(final: Path) -> str:
    """The prefix of a temporary file that will be renamed onto ``final``."""
    return f".{final.name}."


def manifest_path(out: Path) -> Path:
    return Path(out) / MANIFEST_FILE


def worker_manifests_dir(out: Path) -> Path:
    return Path(out) / WORKER_MANIFESTS


def worker_manifest_path(out: Path, rank: int, world_size: int) -> Path:
    return worker_manifests_dir(out) / f"rank-{rank:04d}-of-{world_size:04d}.json"


def lock_path(out: Path) -> Path:
    return Path(out) / LOCK_NAME


def holder_path(out: Path) -> Path:
    return Path(out) / HOLDER_NAME


def rank_lock_path(out: Path, rank: int, world_size: int) -> Path:
    return Path(out) / f"{LOCK_NAME}.rank-{rank}-of-{world_size}"


def datasets_dir(out: Path) -> Path:
    return Path(out) / DATASETS_DIR


def dataset_repo_dir(out: Path, source: str) -> Path:
    """The Hub dataset repository of one source."""
    return datasets_dir(out) / source


def docs_dir(out: Path) -> Path:
    return Path(out) / DOCS_DIR


def site_dir(out: Path) -> Path:
    return Path(out) / SITE_DIR


# --- variants: analysis inputs, not published ---------------------------------------------------

def variants_dir(out: Path, source: str, model: str) -> Path:
    return Path(out) / VARIANTS_DIR / source / model


def variant_name(kind: str, name: str, level) -> str:
    """``degraded-blur-2``: one degradation or transformation at one level."""
    return f"{kind}-{name}-{level}"


def variant_path(folder: Path, kind: str, name: str, level) -> Path:
    """One variant's token file inside ``variants_dir``."""
    return Path(folder) / f"{variant_name(kind, name, level)}.npz"


# --- results ----------------------------------------------------------------------------------

KMEANS_FILE = "kmeans.json"
MAPS_FILE = "maps.json"
MAPS_ARRAYS_FILE = "maps.npz"
PROBES_FILE = "probes.json"
ATTENTION_FILE = "attention.json"
ATTENTION_ARRAYS_FILE = "attention.npz"
LAYERWISE_FILE = "layerwise.json"


def results_root(out: Path) -> Path:
    return Path(out) / RESULTS_DIR


def results_dir(out: Path, source: str, model: str | None = None, config: str | None = None) -> Path:
    """``results/<source>``, ``…/<model>`` or ``…/<model>/<config>``."""
    base = results_root(out) / source
    if model is None:
        return base
    return base / model / config if config else base / model


def kmeans_maps_path(unit_dir: Path, k: int) -> Path:
    """The cluster maps of one k in a config's results folder."""
    return Path(unit_dir) / f"kmeans-k{k}.npz"


def layerwise_path(out: Path, source: str, model: str) -> Path:
    return results_dir(out, source, model) / LAYERWISE_FILE


# --- summary -----------------------------------------------------------------------------------

SUMMARY_DIR = "summary"
SITE_SUMMARY = "site.json"
SUMMARIZE_KEY = "summarize"


def summary_dir(out: Path) -> Path:
    return Path(out) / SUMMARY_DIR


def summary_file(out: Path, name: str) -> Path:
    return summary_dir(out) / name


def source_summary_name(source: str) -> str:
    return f"{source}.json"


def position_modes_name(source: str) -> str:
    return f"{source}-position-modes.npz"


def explorer_summary_dir(out: Path, source: str) -> Path:
    """The explorer's reduced gallery tokens of one dataset, as the summarize stage wrote them."""
    return summary_dir(out) / "explorer" / source


# --- manifest keys ----------------------------------------------------------------------------

# The images config of a dataset repository; its extract unit sits beside the models' units.
IMAGES_CONFIG = "images"

SOURCES_PREFIX = "sources/"
EXTRACT_PREFIX = "extract/"


def source_key(source: str) -> str:
    return f"{SOURCES_PREFIX}{source}"


def hub_key(source: str) -> str:
    return f"hub/{source}"


def extract_prefix(source: str | None = None) -> str:
    """The prefix of every extract unit, or of one source's."""
    return f"{EXTRACT_PREFIX}{source}/" if source else EXTRACT_PREFIX


def extract_key(source: str, model: str) -> str:
    return f"{extract_prefix(source)}{model}"


def images_key(source: str) -> str:
    """The images config's unit, beside the models' units (it has the config's name)."""
    return extract_key(source, IMAGES_CONFIG)


def key_model(key: str) -> str:
    """The last part of a unit's key: the model of ``extract/<source>/<model>``."""
    return key.rsplit("/", 1)[-1]


def shard_key(source: str, model: str, index: int, total: int) -> str:
    return f"shards/{source}/{model}/{index:05d}-of-{total:05d}"


def variants_key(source: str, model: str) -> str:
    return f"variants/{source}/{model}"


def stream_key(source: str, model: str) -> str:
    return f"stream/{source}/{model}"


def analyze_key(source: str, model: str, config: str) -> str:
    return f"analyze/{source}/{model}/{config}"


def attention_key(source: str, model: str) -> str:
    return analyze_key(source, model, "attention")
