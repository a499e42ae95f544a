"""The analyze stage: reads the extracted patch tables, runs the analyses, writes results.

Results live under ``<out>/results/<source>/<model>/<config>/`` as plain files (JSON metrics,
NPZ maps) so the render stage is a pure function of that folder. Each unit is recorded in the
manifest with the hashes of the tables it read, so unchanged inputs are not analysed twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.analyses.clusters import chance_miou, joint_kmeans_segmentation
from generator.errors import PatchAtlasError
from generator.extract import dataset_repo_dir
from generator.store.atomic import atomic_path, atomic_write_json
from generator.store.manifest import Manifest, file_sha256, params_hash
from generator.store.parquet import patch_grid, read_patch_table

ANALYSIS_VERSION = "1"


@dataclass
class AnalyzeOptions:
    ks: Sequence[int] = (4, 8, 16)
    seed: int = 0
    n_init: int = 3
    max_iter: int = 100
    l2_normalize: bool = True
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if not self.ks or any(k < 2 for k in self.ks):
            raise PatchAtlasError(f"k values {list(self.ks)}: each k must be at least 2")


@dataclass
class AnalysisUnit:
    source: str
    model: str
    config: str
    layer: int
    norm: str
    table: Path
    results_dir: Path
    key: str = field(init=False)

    def __post_init__(self):
        self.key = f"analyze/{self.source}/{self.model}/{self.config}/kmeans"


def results_dir(out: Path, source: str, model: str, config: str) -> Path:
    return Path(out) / "results" / source / model / config


def kmeans_maps_path(unit_dir: Path, k: int) -> Path:
    return unit_dir / f"kmeans-k{k}.npz"


def analysis_units(out: Path, manifest: Manifest) -> list[AnalysisUnit]:
    """Every extracted patch config recorded as done, in a stable order."""
    units = []
    for key, entry in sorted(manifest.entries(prefix="extract/")):
        if entry.get("status") != "done" or "configs" not in entry:
            continue
        repo = dataset_repo_dir(out, entry["source"])
        for cfg in entry["configs"]:
            units.append(AnalysisUnit(
                source=entry["source"], model=entry["model"], config=cfg["name"], layer=cfg["layer"],
                norm=cfg["norm"], table=repo / cfg["path"],
                results_dir=results_dir(out, entry["source"], entry["model"], cfg["name"]),
            ))
    return units


def analyze_unit(unit: AnalysisUnit, n_classes: int, ignore_index: int, options: AnalyzeOptions) -> dict:
    """Joint k-means segmentation of one config for every k; writes maps, returns metrics."""
    image_ids, tokens, labels = patch_grid(read_patch_table(unit.table))
    tokens_t = torch.from_numpy(tokens).to(options.device)
    metrics = {"source": unit.source, "model": unit.model, "config": unit.config, "layer": unit.layer,
               "norm": unit.norm, "image_ids": list(image_ids), "grid": list(labels.shape[1:]),
               "l2_normalize": options.l2_normalize, "seed": options.seed, "kmeans": []}
    for k in options.ks:
        if k > tokens.shape[0] * tokens.shape[1] * tokens.shape[2]:
            continue
        seg = joint_kmeans_segmentation(
            tokens_t, labels, k, n_classes, ignore_index=ignore_index, seed=options.seed,
            n_init=options.n_init, max_iter=options.max_iter, l2_normalize=options.l2_normalize,
        )
        with atomic_path(kmeans_maps_path(unit.results_dir, k)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, cluster_maps=seg.cluster_maps, display_maps=seg.display_maps,
                                    labels=labels, image_ids=np.asarray(image_ids))
        metrics["kmeans"].append({
            "k": k, "miou": seg.match.miou, "pixel_accuracy": seg.match.pixel_accuracy,
            "per_class_iou": [None if np.isnan(v) else float(v) for v in seg.match.per_class_iou],
            "cluster_to_class": seg.match.cluster_to_class.tolist(), "inertia": seg.inertia,
            "chance_miou": chance_miou(labels.reshape(-1), k, n_classes, ignore_index, seed=options.seed,
                                       pred=seg.cluster_maps.reshape(-1)),
        })
    atomic_write_json(unit.results_dir / "kmeans.json", metrics)
    return metrics


def run_analyze(out: Path, options: AnalyzeOptions) -> list[dict]:
    """The stage: every extracted config whose inputs or parameters changed since last time."""
    options.validate()
    out = Path(out)
    manifest = Manifest.load(out / "manifest.json")
    units = analysis_units(out, manifest)
    if not units:
        raise PatchAtlasError(f"{out}: no extracted embeddings to analyse; run `patchatlas extract --out {out}` first")
    classes_by_source = {}
    done = []
    for unit in tqdm(units, disable=not options.progress, desc="k-means", unit="config"):
        if unit.source not in classes_by_source:
            classes_by_source[unit.source] = _source_classes(out, unit.source, manifest)
        n_classes, ignore_index = classes_by_source[unit.source]
        params = {"analysis": "kmeans", "version": ANALYSIS_VERSION, "table_sha256": file_sha256(unit.table),
                  **{k: v for k, v in asdict(options).items() if k not in ("device", "progress")},
                  "ks": list(options.ks), "n_classes": n_classes, "ignore_index": ignore_index}
        rel_files = [f"{unit.results_dir.relative_to(out)}/kmeans.json"] + [
            str(kmeans_maps_path(unit.results_dir, k).relative_to(out)) for k in options.ks]
        if manifest.is_done(unit.key, params, out):
            continue
        analyze_unit(unit, n_classes, ignore_index, options)
        files = {rel: file_sha256(out / rel) for rel in rel_files if (out / rel).exists()}
        manifest.set(unit.key, {"status": "done", "params": params, "params_hash": params_hash(params),
                                "files": files})
        manifest.save()
        done.append(unit.key)
    return done


def _source_classes(out: Path, source: str, manifest: Manifest) -> tuple[int, int]:
    """Class count and ignore label of a source, as recorded when it was extracted."""
    entry = manifest.get(f"sources/{source}")
    if entry is None:
        raise PatchAtlasError(f"{out}: the manifest has no record of dataset {source!r}; rerun extract")
    return len(entry["classes"]), entry["ignore_index"]
