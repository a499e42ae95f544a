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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
from generator.analyses.probes import LinearProbe, ProbeProtocol, bootstrap_miou, knn_predict, segmentation_metrics
from generator.analyses.retrieval import retrieval_outcomes
from generator.analyses.variance import (
    batchnorm_normalise,
    feature_variance,
    removal_counts_for,
    removal_curve,
    variance_spectrum,
)
from generator.errors import PatchAtlasError
from generator.sources.splits import few_shot_split
from generator.store.atomic import atomic_path, atomic_write_json
from generator.store.layout import (
    ATTENTION_ARRAYS_FILE,
    ATTENTION_FILE,
    KMEANS_FILE,
    MAPS_ARRAYS_FILE,
    MAPS_FILE,
    PROBES_FILE,
    analyze_key,
    attention_key,
    dataset_repo_dir,
    kmeans_maps_path,
    manifest_path,
    results_dir,
    source_key,
    variants_dir,
    variants_key,
)
from generator.store.manifest import Manifest, params_hash
from generator.store.parquet import patch_grid, read_attention_table, read_patch_table
from generator.store.records import SourceRecord, extract_records, source_record, variants_record

ANALYSIS_VERSION = "4"  # 4: high-norm mode by log gap, cross-validated position probe, probe protocol
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
    probe: ProbeProtocol = field(default_factory=ProbeProtocol)  # the few-shot probes' settings
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> AnalyzeOptions:
        """Raise a PatchAtlasError naming the first option with a bad value; changes nothing."""
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in self.ks):
            raise PatchAtlasError(f"--k {list(self.ks)}: each k must be a whole number of at least 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PatchAtlasError(f"--seed {self.seed!r}: expected a whole number")
        self.probe.validate()
        return self

    def result_params(self) -> dict:
        """The options that change results (device and progress bars do not)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k not in ("device", "progress")}  # asdict turns the protocol into a dict too


@dataclass
class AnalysisUnit:
    source: str
    model: str
    config: str
    layer: int
    norm: str
    tables: list[Path]  # the config's shards, in order
    results_dir: Path
    # How the tokens' images became the model input: {"input_size": side, "resize": policy}.
    input: dict = field(default_factory=dict)
    # From the extract record, so a model the registry does not know is probed as it was extracted.
    label_rule: str | None = None
    probe_batchnorm: bool = False

    @property
    def key(self) -> str:
        return analyze_key(self.source, self.model, self.config)


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def analysis_units(out: Path, manifest: Manifest) -> list[AnalysisUnit]:
    """Every extracted patch config recorded as done, in a stable order."""
    units = []
    for _, entry in extract_records(manifest):
        if not entry.done:
            continue
        repo = dataset_repo_dir(out, entry.source)
        for cfg in entry.configs:
            units.append(AnalysisUnit(
                source=entry.source, model=entry.model, config=cfg.name, layer=cfg.layer,
                norm=cfg.norm, tables=[repo / rel for rel in cfg.paths],
                results_dir=results_dir(out, entry.source, entry.model, cfg.name),
                input=entry.input, label_rule=entry.label_rule, probe_batchnorm=entry.probe_batchnorm,
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
        metrics["norms"] = {"threshold": outliers["threshold"], "outlier_share": float(outliers["share"]),
                            "outlier_method": outliers["method"], "outlier_params": outliers["params"],
                            "median": float(norms.median()), "max": float(norms.max()),
                            "histogram": {"counts": np.asarray(counts).tolist(), "edges": np.asarray(edges).tolist()}}
        arrays["norm_maps"] = norms.cpu().numpy().astype(np.float32)
        arrays["outlier_masks"] = np.asarray(outliers["mask"].cpu() if torch.is_tensor(outliers["mask"]) else outliers["mask"])
    return metrics, arrays


def analyze_unit(unit: AnalysisUnit, n_classes: int, ignore_index: int, options: AnalyzeOptions,
                 source: SourceRecord | None = None, variants: Path | None = None) -> list[str]:
    """All per-config analyses; returns the files written, relative to the unit's folder.

    ``variants`` (the degraded/transformed tokens of this model) is given for the config they
    were extracted from — the last layer's post-norm tokens — which also gets the variance study.
    """
    image_ids, tokens, labels = patch_grid(read_patch_table(unit.tables))
    tokens_t = torch.from_numpy(tokens).to(options.device)
    header = {"source": unit.source, "model": unit.model, "config": unit.config, "layer": unit.layer,
              "norm": unit.norm, "image_ids": list(image_ids), "grid": list(labels.shape[1:]), **unit.input}
    written = []
    kmeans_metrics, kmeans_maps = kmeans_results(tokens_t, labels, n_classes, ignore_index, options)
    for k, arrays in kmeans_maps.items():
        _save_npz(kmeans_maps_path(unit.results_dir, k), **arrays, labels=labels, image_ids=np.asarray(image_ids))
        written.append(kmeans_maps_path(unit.results_dir, k).name)
    stability = None
    if options.stability_k in kmeans_maps:
        stability = stability_across_seeds(tokens_t, labels, n_classes, ignore_index, options,
                                           kmeans_maps[options.stability_k]["cluster_maps"])
    atomic_write_json(unit.results_dir / KMEANS_FILE, {
        **header, "l2_normalize": options.l2_normalize, "seed": options.seed, "kmeans": kmeans_metrics,
        "stability": stability})
    maps_metrics, maps_arrays = map_results(tokens_t, unit.norm == "prenorm", options.seed)
    _save_npz(unit.results_dir / MAPS_ARRAYS_FILE, **maps_arrays, image_ids=np.asarray(image_ids))
    atomic_write_json(unit.results_dir / MAPS_FILE, {**header, **maps_metrics})
    written += [KMEANS_FILE, MAPS_ARRAYS_FILE, MAPS_FILE]
    if len(image_ids) >= 2 and (source is None or source.probes):
        train_count = source.probe_train_count if source is not None else None
        protocol = options.probe.for_unit(label_rule=unit.label_rule, train_count=train_count,
                                          batchnorm=unit.probe_batchnorm)
        data = few_shot_data(image_ids, tokens, labels, train_count, options.device)
        probes, probe = probe_results(data, n_classes, ignore_index, protocol)
        if variants is not None and source is not None:
            probes["variance"] = variance_results(data, n_classes, ignore_index, protocol)
            probes.update(robustness_and_retrieval(data, probe, variants, source, options, protocol))
            probes["clean"] = {"knn_miou": probes["knn_miou"], "linear_miou": probes["linear_miou"]}
        atomic_write_json(unit.results_dir / PROBES_FILE, {**header, **probes})
        written.append(PROBES_FILE)
    return written


@dataclass
class FewShotData:
    """One config's tokens split for the probes: flat train/test rows on the device, and the
    test images' grids for retrieval. Built once per config and shared by every probe."""

    train: torch.Tensor  # [N_train, D]
    train_y: np.ndarray  # [N_train]
    test: torch.Tensor  # [N_test, D]
    test_y: np.ndarray  # [N_test]
    test_grid: np.ndarray  # [n_test_images, gh, gw, D]
    test_labels: np.ndarray  # [n_test_images, gh, gw]
    n_train_images: int


def few_shot_data(image_ids: list[str], tokens: np.ndarray, labels: np.ndarray, train_count: int | None,
                  device: str) -> FewShotData:
    """Split by the few-shot rule (the first part of the images trains)."""
    n_train = len(few_shot_split(image_ids, train_count=train_count)[0])
    dim = tokens.shape[-1]
    return FewShotData(
        train=torch.from_numpy(tokens[:n_train].reshape(-1, dim)).to(device), train_y=labels[:n_train].reshape(-1),
        test=torch.from_numpy(tokens[n_train:].reshape(-1, dim)).to(device), test_y=labels[n_train:].reshape(-1),
        test_grid=tokens[n_train:], test_labels=labels[n_train:], n_train_images=n_train,
    )


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _nan_to_none(values) -> list:
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=float)]


def probe_results(data: FewShotData, n_classes: int, ignore_index: int,
                  protocol: ProbeProtocol) -> tuple[dict, LinearProbe]:
    """Few-shot k-NN and linear probes on the patch tokens of one config (analyses 6 and 8),
    scored and recorded by ``protocol`` (its unit fields filled in), with a bootstrap interval
    over the evaluation images for each mIoU.

    Returns the metrics and the fitted linear probe, which the robustness curves evaluate again.
    """
    knn = knn_predict(data.train, data.train_y, data.test, k=protocol.knn_k, similarity=protocol.knn_similarity,
                      n_classes=n_classes, ignore_index=ignore_index)
    probe = protocol.linear_probe(n_classes, ignore_index).fit(data.train, data.train_y)
    scores = {}
    for name, pred in (("knn", _np(knn)), ("linear", _np(probe.predict(data.test)))):
        metrics = segmentation_metrics(pred, data.test_y, n_classes, ignore_index, average=protocol.miou_average)
        per_image = pred.reshape(data.test_labels.shape)
        scores.update({
            f"{name}_miou": metrics["miou"], f"{name}_pixel_accuracy": metrics["pixel_accuracy"],
            f"{name}_per_class_iou": _nan_to_none(metrics["per_class_iou"]),
            f"{name}_miou_ci": _nan_to_none(bootstrap_miou(
                per_image, data.test_labels, n_classes, ignore_index=ignore_index, average=protocol.miou_average,
                resamples=protocol.bootstrap_resamples, seed=protocol.bootstrap_seed)),
        })
    return {**scores, "n_train_images": data.n_train_images, "n_val_images": int(data.test_grid.shape[0]),
            "protocol": protocol.record(),
            "linear_fit": {**probe.settings(), "steps": probe.steps_, "final_loss": probe.final_loss_,
                           "grad_max": probe.grad_max_, "converged": probe.converged_},
            # Kept under their earlier names for readers of older results.
            "knn_k": protocol.knn_k, "knn_similarity": protocol.knn_similarity,
            "linear_batchnorm": bool(protocol.batchnorm)}, probe


def variance_results(data: FewShotData, n_classes: int, ignore_index: int, protocol: ProbeProtocol) -> dict:
    """High-variance feature spectrum and removal curves on the train split (analysis 7)."""
    spectrum, order = variance_spectrum(feature_variance(data.train))
    knn_kwargs = {"k": protocol.knn_k, "similarity": protocol.knn_similarity}
    linear_kwargs = protocol.linear_probe(n_classes, ignore_index).settings()
    linear_kwargs.pop("solver")
    curve = removal_curve(data.train, data.train_y, data.test, data.test_y, removal_counts_for(data.train.shape[1]),
                          n_classes=n_classes, ignore_index=ignore_index, knn_kwargs=knn_kwargs,
                          linear_kwargs=linear_kwargs, average=protocol.miou_average)
    bn_train, bn_test = batchnorm_normalise(data.train, data.test)
    bn_knn = knn_predict(bn_train, data.train_y, bn_test, n_classes=n_classes, ignore_index=ignore_index,
                         **knn_kwargs)
    bn = segmentation_metrics(_np(bn_knn), data.test_y, n_classes, ignore_index, average=protocol.miou_average)
    return {"spectrum": _np(spectrum).astype(float).tolist(), "top_dims": _np(order)[:200].tolist(),
            "removal": curve, "batchnorm_knn_miou": bn["miou"]}


def robustness_and_retrieval(data: FewShotData, probe: LinearProbe, variants: Path, source: SourceRecord,
                             options: AnalyzeOptions, protocol: ProbeProtocol) -> dict:
    """Probes trained on clean train images, evaluated on degraded evaluation images (analysis 9),
    and retrieval of the original patch from transformed ones (analysis 10)."""
    n_classes, ignore_index = len(source.classes), source.ignore_index
    dim = data.train.shape[1]
    supers = sorted({c["super_name"] for c in source.classes})
    fine_to_super = np.array([supers.index(c["super_name"]) for c in source.classes])
    background = [c["id"] for c in source.classes if c.get("is_background")]
    originals = torch.from_numpy(data.test_grid).to(options.device)
    robustness, retrieval = [], []
    for path in sorted(variants.glob("*.npz")):
        kind, name, level = path.stem.split("-", 2)
        with np.load(path) as npz:
            var_tokens = npz["tokens"].astype(np.float32)
            var_labels = npz["labels"]
            correspondence = npz["correspondence"] if "correspondence" in npz.files else None
        flat = torch.from_numpy(var_tokens.reshape(-1, dim)).to(options.device)
        if kind == "degraded":
            knn = knn_predict(data.train, data.train_y, flat, k=protocol.knn_k, similarity=protocol.knn_similarity,
                              n_classes=n_classes, ignore_index=ignore_index)
            knn_m = segmentation_metrics(_np(knn), var_labels.reshape(-1), n_classes, ignore_index,
                                         average=protocol.miou_average)
            lin_m = segmentation_metrics(_np(probe.predict(flat)), var_labels.reshape(-1), n_classes, ignore_index,
                                         average=protocol.miou_average)
            robustness.append({"degradation": name, "level": float(level), "knn_miou": knn_m["miou"],
                               "linear_miou": lin_m["miou"]})
        if kind == "transformed" or name in ("blur", "noise"):
            if correspondence is None:  # photometric: every patch corresponds to itself
                gh, gw = var_labels.shape[1:]
                rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
                correspondence = np.broadcast_to(np.stack([rows, cols], -1), (*var_labels.shape, 2)).copy()
            for exclude in (False, True):
                try:
                    result = retrieval_outcomes(originals, data.test_labels,
                                                torch.from_numpy(var_tokens).to(options.device), var_labels,
                                                correspondence, fine_to_super, background,
                                                exclude_same_image=exclude, ignore_index=ignore_index)
                except PatchAtlasError as err:  # e.g. no labelled foreground patch to query
                    retrieval.append({"transform": name, "level": float(level), "exclude_same_image": exclude,
                                      "skipped": str(err)})
                    continue
                retrieval.append({"transform": name, "level": float(level), "exclude_same_image": exclude,
                                  "shares": {k: float(v) for k, v in result["shares"].items()},
                                  "n_queries": int(result["n_queries"]), "upper_bound": float(result["upper_bound"])})
    return {"robustness": robustness, "retrieval": retrieval}


def analyze_attention(table: list[Path], labels_table: list[Path], background_ids: list[int], ignore_index: int,
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
    _save_npz(unit_dir / ATTENTION_ARRAYS_FILE, cls_maps=maps, image_ids=np.asarray(image_ids))
    atomic_write_json(unit_dir / ATTENTION_FILE, metrics)
    return [ATTENTION_ARRAYS_FILE, ATTENTION_FILE]


def run_analyze(out: Path, options: AnalyzeOptions) -> list[str]:
    """The stage: every extracted unit whose inputs or parameters changed since last time."""
    options.validate()
    out = Path(out)
    manifest = Manifest.load(manifest_path(out))
    units = analysis_units(out, manifest)
    if not units:
        raise PatchAtlasError(f"{out}: no extracted embeddings to analyse; run `patchatlas extract --out {out}` first")
    done = []
    for unit in tqdm(units, disable=not options.progress, desc="analyses", unit="config"):
        source = _source_record(out, unit.source, manifest)
        # The tables' hashes, read again only for a table whose size, mtime or inode changed.
        params = {"version": ANALYSIS_VERSION, "table_sha256": [manifest.sha256(t) for t in unit.tables],
                  **options.result_params(), "n_classes": len(source.classes),
                  "ignore_index": source.ignore_index}
        variants_entry = variants_record(manifest, variants_key(unit.source, unit.model))
        variants = None
        if variants_entry and variants_entry.status == "done" and unit.norm == "postnorm" \
                and unit.layer == variants_entry.layer:
            variants = variants_dir(out, unit.source, unit.model)
            params["variants"] = variants_entry.params_hash
        if manifest.is_done(unit.key, params, out):
            continue
        files = analyze_unit(unit, len(source.classes), source.ignore_index, options, source, variants)
        _record(manifest, unit.key, params, out, unit.results_dir, files)
        done.append(unit.key)
    for _, entry in extract_records(manifest):
        if not entry.done or not entry.attention_paths:
            continue
        source = _source_record(out, entry.source, manifest)
        repo = dataset_repo_dir(out, entry.source)
        table = [repo / rel for rel in entry.attention_paths]
        labels_table = [repo / rel for rel in entry.configs[0].paths]
        background = [c["id"] for c in source.classes if c.get("is_background")]
        key = attention_key(entry.source, entry.model)
        params = {"version": ANALYSIS_VERSION, "table_sha256": [manifest.sha256(t) for t in table],
                  "mass": options.attention_mass, "background": background}
        if manifest.is_done(key, params, out):
            continue
        unit_dir = results_dir(out, entry.source, entry.model)
        files = analyze_attention(table, labels_table, background, source.ignore_index, unit_dir, options)
        _record(manifest, key, params, out, unit_dir, files)
        done.append(key)
    return done


def _record(manifest: Manifest, key: str, params: dict, out: Path, unit_dir: Path, files: list[str]) -> None:
    hashes = {str((unit_dir / name).relative_to(out)): manifest.sha256(unit_dir / name) for name in files}
    manifest.set(key, {"status": "done", "params": params, "params_hash": params_hash(params), "files": hashes})
    manifest.save()


def _source_record(out: Path, source: str, manifest: Manifest) -> SourceRecord:
    """What extract recorded of a source: classes, ignore label, licence."""
    record = source_record(manifest, source_key(source))
    if record is None:
        raise PatchAtlasError(f"{out}: the manifest has no record of dataset {source!r}; rerun extract")
    return record
