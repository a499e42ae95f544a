"""The analyze stage: reads the extracted patch tables, runs the analyses, writes results.

Per (source, model, config) it writes ``<out>/results/<source>/<model>/<config>/``:

- ``kmeans.json`` + ``kmeans-k<k>.npz``: joint k-means segmentation for every k (cluster maps,
  display maps coloured by their matched class, Hungarian mIoU against a chance control);
- ``maps.json`` + ``maps.npz``: positional bias and locality (border score and map, position
  decodability, locality curve, positional consistency per k, stability across seeds), PCA
  colour maps and, for pre-norm tokens, token-norm maps and high-norm outliers.

Per (source, model) with a CLS token it writes ``attention.json`` + ``attention.npz``: the
last block's CLS attention per head and its Jaccard with the foreground.

Results are plain files, so the render stage is a pure function of this folder. Each unit is
recorded in the manifest with the hashes of the tables it read and its parameters, so unchanged
inputs are not analysed twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.analyses.alignment import cluster_stability
from generator.analyses.artifacts import high_norm_outliers, norm_histogram, token_norms
from generator.analyses.attention import foreground_jaccard
from generator.analyses.clusters import chance_miou, joint_kmeans_segmentation
from generator.analyses.pca import pca_rgb
from generator.analyses.position import (
    border_map,
    border_score,
    locality_curve,
    position_cluster_histogram,
    position_decodability,
    positional_consistency,
)
from generator.errors import PatchAtlasError
from generator.extract import dataset_repo_dir
from generator.store.atomic import atomic_path, atomic_write_json
from generator.store.manifest import Manifest, file_sha256, params_hash
from generator.store.parquet import patch_grid, read_attention_table, read_patch_table

ANALYSIS_VERSION = "2"
STABILITY_SEEDS = 3


@dataclass
class AnalyzeOptions:
    ks: Sequence[int] = (4, 8, 16)
    seed: int = 0
    n_init: int = 3
    max_iter: int = 100
    l2_normalize: bool = True
    stability_k: int = 8  # k at which cluster stability across seeds is measured
    attention_mass: float = 0.6
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if not self.ks or any(k < 2 for k in self.ks):
            raise PatchAtlasError(f"k values {list(self.ks)}: each k must be at least 2")

    def result_params(self) -> dict:
        """The options that change results (device and progress bars do not)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k not in ("device", "progress")}


@dataclass
class AnalysisUnit:
    source: str
    model: str
    config: str
    layer: int
    norm: str
    table: Path
    results_dir: Path

    @property
    def key(self) -> str:
        return f"analyze/{self.source}/{self.model}/{self.config}"


def results_dir(out: Path, source: str, model: str, config: str | None = None) -> Path:
    base = Path(out) / "results" / source / model
    return base / config if config else base


def kmeans_maps_path(unit_dir: Path, k: int) -> Path:
    return unit_dir / f"kmeans-k{k}.npz"


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def analysis_units(out: Path, manifest: Manifest) -> list[AnalysisUnit]:
    """Every extracted patch config recorded as done, in a stable order."""
    units = []
    for _, entry in sorted(manifest.entries(prefix="extract/")):
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


def kmeans_results(tokens: torch.Tensor, labels: np.ndarray, n_classes: int, ignore_index: int,
                   options: AnalyzeOptions) -> tuple[list[dict], dict[int, dict[str, np.ndarray]]]:
    """Joint k-means for every k: (metrics per k, maps per k)."""
    n_patches = labels.size
    metrics, maps = [], {}
    for k in options.ks:
        if k > n_patches:
            continue
        seg = joint_kmeans_segmentation(
            tokens, labels, k, n_classes, ignore_index=ignore_index, seed=options.seed,
            n_init=options.n_init, max_iter=options.max_iter, l2_normalize=options.l2_normalize,
        )
        hist = position_cluster_histogram(seg.cluster_maps, k)
        metrics.append({
            "k": k, "miou": seg.match.miou, "pixel_accuracy": seg.match.pixel_accuracy,
            "per_class_iou": [None if np.isnan(v) else float(v) for v in seg.match.per_class_iou],
            "cluster_to_class": seg.match.cluster_to_class.tolist(), "inertia": seg.inertia,
            "chance_miou": chance_miou(labels.reshape(-1), k, n_classes, ignore_index, seed=options.seed,
                                       pred=seg.cluster_maps.reshape(-1)),
            "positional_consistency": positional_consistency(hist),
        })
        maps[k] = {"cluster_maps": seg.cluster_maps, "display_maps": seg.display_maps}
    return metrics, maps


def stability_across_seeds(tokens: torch.Tensor, labels: np.ndarray, n_classes: int, ignore_index: int,
                           options: AnalyzeOptions, first: np.ndarray) -> dict:
    """Adjusted Rand index between k-means fits that differ only in their seed."""
    label_sets = [first.reshape(-1)]
    for extra in range(1, STABILITY_SEEDS):
        seg = joint_kmeans_segmentation(
            tokens, labels, options.stability_k, n_classes, ignore_index=ignore_index,
            seed=options.seed + extra, n_init=options.n_init, max_iter=options.max_iter,
            l2_normalize=options.l2_normalize,
        )
        label_sets.append(seg.cluster_maps.reshape(-1))
    result = cluster_stability(label_sets)
    return {"k": options.stability_k, "seeds": STABILITY_SEEDS, "mean_ari": result["mean_ari"],
            "min_ari": result["min_ari"]}


def map_results(tokens: torch.Tensor, is_prenorm: bool, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Positional bias, locality, PCA and (pre-norm) token-norm analyses of one config."""
    distances, curve, baseline = locality_curve(tokens)
    metrics = {
        "border_score": border_score(tokens),
        "position": position_decodability(tokens, seed=seed) if tokens.shape[0] >= 2 else None,
        "locality": {"distance": distances.tolist(), "mean_cosine": curve.tolist(), "random_baseline": baseline},
    }
    rgb, ratio = pca_rgb(tokens)
    metrics["pca_explained_variance_ratio"] = ratio.tolist()
    arrays = {"border_map": border_map(tokens), "pca_rgb": rgb}
    if is_prenorm:
        # High-norm artifact tokens show in the raw block output; LayerNorm hides them.
        norms = token_norms(tokens)
        outliers = high_norm_outliers(norms)
        counts, edges = norm_histogram(norms)
        metrics["norms"] = {"threshold": float(outliers["threshold"]), "outlier_share": float(outliers["share"]),
                            "median": float(norms.median()), "max": float(norms.max()),
                            "histogram": {"counts": np.asarray(counts).tolist(), "edges": np.asarray(edges).tolist()}}
        arrays["norm_maps"] = norms.cpu().numpy().astype(np.float32)
        arrays["outlier_masks"] = np.asarray(outliers["mask"].cpu() if torch.is_tensor(outliers["mask"]) else outliers["mask"])
    return metrics, arrays


def analyze_unit(unit: AnalysisUnit, n_classes: int, ignore_index: int, options: AnalyzeOptions) -> list[str]:
    """All per-config analyses; returns the files written, relative to the unit's folder."""
    image_ids, tokens, labels = patch_grid(read_patch_table(unit.table))
    tokens_t = torch.from_numpy(tokens).to(options.device)
    header = {"source": unit.source, "model": unit.model, "config": unit.config, "layer": unit.layer,
              "norm": unit.norm, "image_ids": list(image_ids), "grid": list(labels.shape[1:])}
    written = []
    kmeans_metrics, kmeans_maps = kmeans_results(tokens_t, labels, n_classes, ignore_index, options)
    for k, arrays in kmeans_maps.items():
        _save_npz(kmeans_maps_path(unit.results_dir, k), **arrays, labels=labels, image_ids=np.asarray(image_ids))
        written.append(kmeans_maps_path(unit.results_dir, k).name)
    stability = None
    if options.stability_k in kmeans_maps:
        stability = stability_across_seeds(tokens_t, labels, n_classes, ignore_index, options,
                                           kmeans_maps[options.stability_k]["cluster_maps"])
    atomic_write_json(unit.results_dir / "kmeans.json", {
        **header, "l2_normalize": options.l2_normalize, "seed": options.seed, "kmeans": kmeans_metrics,
        "stability": stability})
    maps_metrics, maps_arrays = map_results(tokens_t, unit.norm == "prenorm", options.seed)
    _save_npz(unit.results_dir / "maps.npz", **maps_arrays, image_ids=np.asarray(image_ids))
    atomic_write_json(unit.results_dir / "maps.json", {**header, **maps_metrics})
    return written + ["kmeans.json", "maps.npz", "maps.json"]


def analyze_attention(table: Path, labels_table: Path, background_ids: list[int], ignore_index: int,
                      unit_dir: Path, options: AnalyzeOptions) -> list[str]:
    """CLS attention of the last block: per-head foreground Jaccard of the 60 %-mass masks."""
    image_ids, maps = read_attention_table(table)
    label_ids, _, labels = patch_grid(read_patch_table(labels_table))
    order = {image_id: i for i, image_id in enumerate(label_ids)}
    labels = labels[[order[i] for i in image_ids]]
    metrics = {"image_ids": image_ids, "mass": options.attention_mass, "heads": int(maps.shape[1])}
    try:
        result = foreground_jaccard(torch.from_numpy(maps), labels, background_ids, ignore_index,
                                    mass=options.attention_mass)
        metrics.update({"per_head": result["per_head"].tolist(), "best_head": result["best_head"],
                        "best": result["best"], "mean": result["mean"]})
    except PatchAtlasError as err:  # e.g. a dataset without foreground classes
        metrics["skipped"] = str(err)
    _save_npz(unit_dir / "attention.npz", cls_maps=maps, image_ids=np.asarray(image_ids))
    atomic_write_json(unit_dir / "attention.json", metrics)
    return ["attention.npz", "attention.json"]


def run_analyze(out: Path, options: AnalyzeOptions) -> list[str]:
    """The stage: every extracted unit whose inputs or parameters changed since last time."""
    options.validate()
    out = Path(out)
    manifest = Manifest.load(out / "manifest.json")
    units = analysis_units(out, manifest)
    if not units:
        raise PatchAtlasError(f"{out}: no extracted embeddings to analyse; run `patchatlas extract --out {out}` first")
    done = []
    for unit in tqdm(units, disable=not options.progress, desc="analyses", unit="config"):
        source = _source_record(out, unit.source, manifest)
        params = {"version": ANALYSIS_VERSION, "table_sha256": file_sha256(unit.table), **options.result_params(),
                  "n_classes": len(source["classes"]), "ignore_index": source["ignore_index"]}
        if manifest.is_done(unit.key, params, out):
            continue
        files = analyze_unit(unit, len(source["classes"]), source["ignore_index"], options)
        _record(manifest, unit.key, params, out, unit.results_dir, files)
        done.append(unit.key)
    for _, entry in sorted(manifest.entries(prefix="extract/")):
        if entry.get("status") != "done" or not entry.get("attention_path"):
            continue
        source = _source_record(out, entry["source"], manifest)
        repo = dataset_repo_dir(out, entry["source"])
        table, labels_table = repo / entry["attention_path"], repo / entry["configs"][0]["path"]
        background = [c["id"] for c in source["classes"] if c.get("is_background")]
        key = f"analyze/{entry['source']}/{entry['model']}/attention"
        params = {"version": ANALYSIS_VERSION, "table_sha256": file_sha256(table), "mass": options.attention_mass,
                  "background": background}
        if manifest.is_done(key, params, out):
            continue
        unit_dir = results_dir(out, entry["source"], entry["model"])
        files = analyze_attention(table, labels_table, background, source["ignore_index"], unit_dir, options)
        _record(manifest, key, params, out, unit_dir, files)
        done.append(key)
    return done


def _record(manifest: Manifest, key: str, params: dict, out: Path, unit_dir: Path, files: list[str]) -> None:
    hashes = {str((unit_dir / name).relative_to(out)): file_sha256(unit_dir / name) for name in files}
    manifest.set(key, {"status": "done", "params": params, "params_hash": params_hash(params), "files": hashes})
    manifest.save()


def _source_record(out: Path, source: str, manifest: Manifest) -> dict:
    """What extract recorded of a source: classes, ignore label, licence."""
    entry = manifest.get(f"sources/{source}")
    if entry is None:
        raise PatchAtlasError(f"{out}: the manifest has no record of dataset {source!r}; rerun extract")
    return entry
