"""The summarize stage: analysis results → the tables and series the site shows.

HELM's run → summarize → server: ``analyze`` writes one results folder per (source, model,
config); this stage aggregates them into a few summary files under ``<out>/summary/`` (JSON
records, and an ``.npz`` of the positional mode maps per source), and ``render`` only reads
those and draws. The aggregation functions here are pure (results records in, summary records
out); :func:`run_summarize` is the only one that reads or writes files. Its manifest entry
records the SHA-256 of every input it read, so a rerun with unchanged inputs does nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from generator.analyses.position_histograms import position_cluster_histogram, position_mode_map
from generator.analyses.protocol_fields import KNN_FIELDS
from generator.errors import PatchAtlasError
from generator.store.atomic import atomic_path, atomic_write_text
from generator.store.layout import (
    ATTENTION_FILE,
    IMAGES_CONFIG,
    KMEANS_FILE,
    LAYERWISE_FILE,
    MAPS_ARRAYS_FILE,
    MAPS_FILE,
    PROBES_FILE,
    SITE_SUMMARY,
    SUMMARIZE_KEY,
    dataset_repo_dir,
    kmeans_maps_path,
    manifest_path,
    position_modes_name,
    results_dir,
    source_summary_name,
    summary_file,
)
from generator.store.manifest import Manifest, params_hash
from generator.store.parquet import read_first_images
from generator.store.records import ModelFacts, extract_records, source_records

# Bumped when what a summary file holds changes, so older summaries are recomputed.
SUMMARY_VERSION = 1


def missing_summary_error(out: Path, what: str) -> PatchAtlasError:
    return PatchAtlasError(f"{out}: {what}; run `patchatlas summarize --out {out}` (or `patchatlas build`) "
                           f"before rendering")


# --- options -------------------------------------------------------------------------------------

GALLERY_NORMS = ("postnorm", "prenorm")


@dataclass
class SummarizeOptions:
    """What the summary's numbers depend on besides the results: which images, k and view the
    galleries (and so the per-dataset score tables) show. ``RenderOptions`` extends it."""

    gallery_images: int = 8
    gallery_k: int = 8
    gallery_norm: str = "postnorm"

    def validate(self):
        for name in ("gallery_images", "gallery_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PatchAtlasError(f"{name.replace('_', '-')} {value!r}: expected a whole number of at least 1")
        if self.gallery_norm not in GALLERY_NORMS:
            raise PatchAtlasError(f"gallery-norm {self.gallery_norm!r}: expected one of {', '.join(GALLERY_NORMS)}")
        return self

    def summary_params(self) -> dict:
        """The fields of :class:`SummarizeOptions` only (a subclass's own fields do not count)."""
        return {f.name: getattr(self, f.name) for f in fields(SummarizeOptions)}


# --- reference rows and their scales ---------------------------------------------------------------

# Families whose rows are references, with the word a reader sees beside them: the untrained
# network and the calibration controls (models with a known answer) give each metric its scale.
# They stand beside the models in every table and chart, never in a ranking.
REFERENCE_FAMILIES = {"random": "baseline", "control": "control"}


def is_reference(family: str | None) -> bool:
    return family in REFERENCE_FAMILIES


def reference_tag(family: str | None) -> str:
    return REFERENCE_FAMILIES.get(family, "")


def model_order(families: dict[str, str]):
    """Sort key for model names: real models first (by family, name), references after them."""
    return lambda model: (is_reference(families.get(model)), families.get(model, "?"), model)


def fmt_pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def fmt_num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


# What each metric's 0 (and 1) mean, shown with the reference values under every table.
METRIC_SCALES = {
    "miou": "0–100", "best_miou": "0–100", "knn_miou": "0–100, untrained network = floor",
    "linear_miou": "0–100, untrained network = floor", "attention": "0–100",
    "border_score": "0 = no boundary artifact", "border": "0 = no boundary artifact",
    "row_r2": "0 = no position information, 1 = exact", "col_r2": "0 = no position information, 1 = exact",
    "consistency": "0 = independent of position, 1 = purely positional",
    "stability": "1 = the same clusters for every seed",
    "outlier_share": "0 = no high-norm tokens", "outliers": "0 = no high-norm tokens",
}
LEADERBOARD_METRICS = (("best_miou", "Best mIoU", "pct"), ("border", "Border", "num"),
                       ("outliers", "Outliers", "pct"), ("attention", "Attention J", "pct"))
POSITIONAL_METRICS = (("border_score", "Border", "num"), ("row_r2", "Row R²", "num"), ("col_r2", "Col R²", "num"),
                      ("consistency", "Consistency", "num"), ("outlier_share", "Outliers", "pct"),
                      ("miou", "mIoU", "pct"))
PROBE_METRICS = (("knn_miou", "k-NN mIoU", "pct"), ("linear_miou", "Linear mIoU", "pct"))


def _last_layer_values(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """One summary row per model: each metric at the model's deepest layer, post-norm first
    (outlier shares exist on pre-norm rows only)."""
    summary: dict[str, dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        deepest = max((r.get("layer", 0) for r in own), default=0)
        at_last = sorted((r for r in own if r.get("layer", 0) == deepest), key=lambda r: r.get("norm") != "postnorm")
        row = {"model": model, "family": own[0]["family"]}
        for key in keys:
            row[key] = next((r[key] for r in at_last if r.get(key) is not None), None)
        summary[model] = row
    return summary


def metric_references(rows: list[dict], metrics, chance: dict[str, str] | None = None,
                      per_layer: bool = False) -> list[dict]:
    """The scale of each metric column of a table: its meaning at 0 (and 1), the chance level
    where one is computed (``chance`` maps a column to the rows' chance key, e.g. the shuffled-
    cluster mIoU), and every reference model's value (at its deepest layer when ``per_layer``).

    Returns one dict per metric: ``label``, ``scale``, ``chance`` (text or None) and ``controls``
    (``model``, ``tag``, ``value`` as text).
    """
    chance = chance or {}
    fmt = {"pct": fmt_pct, "num": fmt_num}
    references = [r for r in rows if is_reference(r.get("family"))]
    if per_layer:
        references = list(_last_layer_values(references, [key for key, _, _ in metrics]).values())
    notes = []
    for key, label, kind in metrics:
        chances = sorted({r[chance[key]] for r in rows if key in chance and r.get(chance[key]) is not None})
        chance_text = None
        if chances:
            lo, hi = fmt[kind](chances[0]), fmt[kind](chances[-1])
            chance_text = lo if lo == hi else f"{lo}–{hi}"
        controls = [{"model": r["model"], "tag": reference_tag(r["family"]), "value": fmt[kind](r[key])}
                    for r in references if r.get(key) is not None]
        notes.append({"label": label, "scale": METRIC_SCALES.get(key, ""), "chance": chance_text,
                      "controls": controls})
    return notes


# --- one source: k-means, positional and artifact tables ------------------------------------------

def labelled_class_count(mask: np.ndarray, ignore_index: int) -> int:
    """How many ground-truth classes one image's mask holds (ignored pixels are no class)."""
    values = np.unique(np.asarray(mask))
    return int((values != ignore_index).sum())


def ranks_by_segmentation(classes_per_image: list[int]) -> bool:
    """Whether a dataset's segmentation scores may rank models: some image holds two or more classes.

    Where every image is a single class (the content-free inputs: each image labelled by its
    kind), a Hungarian-matched mIoU rewards telling images apart, which an untrained network
    does perfectly on constant colours; it says nothing about segmenting.
    """
    return any(count >= 2 for count in classes_per_image)


def recorded_models(manifest: Manifest, source: str | None = None) -> dict[str, ModelFacts]:
    """What the extracts recorded of each model (of one source, or of all): the summary and the
    pages need no registry, so a model the code does not know is summarized from its record."""
    facts: dict[str, ModelFacts] = {}
    for name, unit in extract_records(manifest, source):
        if unit.model_facts is not None and (name not in facts or unit.done):
            facts[name] = unit.model_facts
    return facts


def model_families(models, facts: dict[str, ModelFacts]) -> dict[str, str]:
    return {m: facts[m].family if m in facts else "?" for m in models}


def nearest_k(metric: dict, k: int) -> int | None:
    """The k of a k-means record closest to the gallery's ``k`` (the smaller one on a tie)."""
    ks = [r["k"] for r in metric["kmeans"]]
    return min(ks, key=lambda v: (abs(v - k), v)) if ks else None


def metric_sort_key(families: dict[str, str]):
    return lambda m: (families[m["model"]], m["model"], m["layer"], m["norm"])


def positional_rows(kmeans: list[dict], maps_json: dict, families: dict[str, str], registers: dict,
                    k: int) -> list[dict]:
    """One row per (model, layer, view): border score, position decodability, consistency,
    stability, outlier share and the k-means mIoU at the k nearest the gallery's, CL and MIM apart."""
    rows = []
    for m in sorted(kmeans, key=metric_sort_key(families)):
        mj = maps_json.get((m["model"], m["config"]), {})
        chosen = next((r for r in m["kmeans"] if r["k"] == nearest_k(m, k)), None)
        position = mj.get("position") or {}
        rows.append({
            "model": m["model"], "family": families[m["model"]], "layer": m["layer"], "norm": m["norm"],
            "registers": registers.get(m["model"]),
            "border_score": mj.get("border_score"), "row_r2": position.get("row_r2"), "col_r2": position.get("col_r2"),
            "row_chance_r2": position.get("row_chance_r2"), "col_chance_r2": position.get("col_chance_r2"),
            "consistency": chosen.get("positional_consistency") if chosen else None,
            "stability": (m.get("stability") or {}).get("mean_ari"),
            "outlier_share": (mj.get("norms") or {}).get("outlier_share"),
            "miou": chosen["miou"] if chosen else None, "chance": chosen["chance_miou"] if chosen else None,
        })
    return rows


def source_reference_notes(rows: list[dict], k: int) -> dict[str, list[dict]]:
    """The references under a dataset's tables: the positional/artifact columns and the k-means
    scores (at the gallery's k, with the shuffled-cluster chance of every row)."""
    return {"positional": metric_references(rows, POSITIONAL_METRICS, chance={"miou": "chance"}, per_layer=True),
            "scores": metric_references(rows, (("miou", f"mIoU (k = {k})", "pct"), ("stability", "Stability", "num")),
                                        chance={"miou": "chance"}, per_layer=True)}


def deepest(metrics: list[dict], models: list[str]) -> dict[str, dict]:
    """Each model's record at its deepest layer among ``metrics``."""
    return {model: max((m for m in metrics if m["model"] == model), key=lambda m: m["layer"]) for model in models
            if any(m["model"] == model for m in metrics)}


def locality_series(last: dict[str, dict], maps_json: dict, families: dict[str, str]) -> dict | None:
    """The locality chart: each model's mean cosine by patch distance at its last layer."""
    if not last:
        return None
    series, baselines = [], []
    for model, m in last.items():
        loc = maps_json[(model, m["config"])]["locality"]
        series.append({"label": f"{model} L{m['layer']}", "x": loc["distance"], "y": loc["mean_cosine"],
                       "family": families[model], "reference": is_reference(families[model])})
        baselines.append(loc["random_baseline"])
    return {"series": series, "baseline": float(np.mean(baselines))}


def norm_histograms(last_pre: dict[str, dict], maps_json: dict, families: dict[str, str]) -> dict | None:
    """The token-norm histogram of each model's last pre-norm layer."""
    if not last_pre:
        return None
    return {f"{model} L{m['layer']}": {**maps_json[(model, m["config"])]["norms"]["histogram"],
                                       "family": families[model], "reference": is_reference(families[model])}
            for model, m in last_pre.items()}


def position_modes(display_maps: np.ndarray) -> np.ndarray:
    """The most frequent cluster at each position over all images (positional bias made visible)."""
    display = display_maps.astype(np.int64)
    mode, _ = position_mode_map(position_cluster_histogram(display, int(display.max()) + 1))
    return mode


def leaderboard_rows(positional: list[dict], attention: dict) -> list[dict]:
    """One row per model of a dataset: its best layer by k-means mIoU and its last-layer artifacts."""
    rows = {}
    for r in positional:
        if r["norm"] not in ("postnorm", "prenorm"):
            continue
        row = rows.setdefault(r["model"], {"model": r["model"], "family": r["family"], "best_miou": None,
                                           "best_layer": None, "border": None, "outliers": None,
                                           "chance": None, "last_layer": -1})
        if r["norm"] == "postnorm" and r["miou"] is not None and (row["best_miou"] is None or r["miou"] > row["best_miou"]):
            row.update(best_miou=r["miou"], best_layer=r["layer"], chance=r["chance"])
        if r["layer"] >= row["last_layer"]:
            row["last_layer"] = r["layer"]
            if r["norm"] == "postnorm":
                row["border"] = r["border_score"]
            if r["norm"] == "prenorm":
                row["outliers"] = r["outlier_share"]
    for model, att in attention.items():
        if model in rows:
            rows[model]["attention"] = att.get("best")
    return sorted(rows.values(), key=lambda r: -(r["best_miou"] or 0))


def leaderboard_tables(boards: dict[str, list[dict]], ranked: dict[str, bool]) -> dict[str, dict]:
    """Per dataset: the real models ranked by best mIoU, the reference rows apart, and each
    column's references. ``ranked[name]`` False (a dataset without regions to segment, see
    :func:`ranks_by_segmentation`) leaves the dataset out of the ranking altogether."""
    tables = {}
    # Ranked datasets first: the leaderboard opens on a ranking, not on a dataset left out.
    for name, rows in sorted(boards.items(), key=lambda item: not ranked.get(item[0], True)):
        models = [r for r in rows if not is_reference(r["family"])]
        reference = [r for r in rows if is_reference(r["family"])]
        tables[name] = {
            "ranked": ranked.get(name, True),
            "models": sorted(models, key=lambda r: (r["best_miou"] is None, -(r["best_miou"] or 0), r["model"])),
            "reference": sorted(reference, key=lambda r: (r["family"], r["model"])),
            "notes": metric_references(rows, LEADERBOARD_METRICS, chance={"best_miou": "chance"}),
        }
    return tables


def kmeans_summary(kmeans: list[dict], maps_json: dict, attention: dict, families: dict[str, str],
                   registers: dict, classes_per_image: list[int], options: SummarizeOptions) -> dict:
    """Every number of one dataset's page besides the probes: which configs the galleries show
    (at which k), the positional/artifact rows, their references, the locality and norm series."""
    k, norm = options.gallery_k, options.gallery_norm
    post = [m for m in kmeans if m["norm"] == norm]
    pre = [m for m in kmeans if m["norm"] == "prenorm"]
    models = sorted({m["model"] for m in kmeans}, key=model_order(families))
    rows = positional_rows(kmeans, maps_json, families, registers, k)
    gallery = [{"model": m["model"], "layer": m["layer"], "config": m["config"], "k": nearest_k(m, k)}
               for m in sorted(post, key=lambda m: (m["model"], m["layer"])) if nearest_k(m, k) is not None]
    return {
        "families": families, "models": models, "layers": sorted({m["layer"] for m in post}),
        "ranked": ranks_by_segmentation(classes_per_image),
        "metrics": sorted(kmeans, key=metric_sort_key(families)),
        "gallery": gallery,
        "post": [{"model": m["model"], "layer": m["layer"], "config": m["config"]}
                 for m in sorted(post, key=lambda m: (m["model"], m["layer"]))],
        "pre": [{"model": m["model"], "layer": m["layer"], "config": m["config"]}
                for m in sorted(pre, key=lambda m: (m["model"], m["layer"]))],
        "attention": attention, "positional_rows": rows,
        "notes": source_reference_notes(rows, k),
        "locality": locality_series(deepest(post, models), maps_json, families),
        "norm_histograms": norm_histograms(deepest(pre, models), maps_json, families),
        "leaderboard": leaderboard_rows(rows, attention),
    }


# --- one source: the few-shot probes ---------------------------------------------------------------

def _knn_protocol_key(protocol: dict | None) -> tuple | None:
    """What a k-NN number depends on (``KNN_FIELDS``), hashable; None if not recorded."""
    if not protocol:
        return None
    return tuple((field, protocol.get(field)) for field in KNN_FIELDS)


def _knn_protocol_label(protocol: dict | None) -> str:
    if not protocol:
        return "protocol not recorded"
    return (f"k = {protocol['knn_k']}, {protocol['knn_similarity']}, {protocol.get('label_rule') or '?'} labels, "
            f"mIoU over {protocol['miou_average']} classes")


def _recorded_protocols(probes: list[dict], streamed: list[dict]) -> list[dict]:
    """Each distinct recorded probe protocol of a source, with the models and layers scored by it."""
    groups: dict[str, dict] = {}
    for kind, rows in (("analysed", probes), ("streamed", streamed)):
        for row in rows:
            protocol = row.get("protocol")
            key = json.dumps(protocol, sort_keys=True)
            group = groups.setdefault(key, {"protocol": protocol, "models": set(), "kinds": set()})
            group["models"].add(row["model"])
            group["kinds"].add(kind)
    return [{"protocol": g["protocol"], "models": sorted(g["models"]), "kinds": sorted(g["kinds"])}
            for _, g in sorted(groups.items())]


def _interval_band(rows: list[dict], key: str) -> dict:
    """``y_lo``/``y_hi`` of a chart series from the rows' ``<key>_ci`` intervals, when all have one."""
    intervals = [r.get(f"{key}_ci") for r in rows]
    if not rows or any(not ci or None in ci for ci in intervals):
        return {}
    return {"y_lo": [ci[0] for ci in intervals], "y_hi": [ci[1] for ci in intervals]}


RETRIEVAL_OUTCOMES = ("same_patch", "same_fine", "same_super", "background", "wrong")


def probe_summary(probes: list[dict], layerwise: list[dict], families: dict[str, str]) -> dict | None:
    """Tables and chart series of the few-shot probes of one source (analyses 6–10); None without
    probes. ``layerwise`` are the records of layers streamed while extracting (generator/stream.py)."""
    if not probes:
        return None
    layer_rows = sorted(probes, key=lambda p: (families.get(p["model"], "?"), p["model"], p["layer"], p["norm"]))
    last = {}
    for p in probes:
        if p["norm"] == "postnorm" and p["layer"] >= last.get(p["model"], {}).get("layer", -1):
            last[p["model"]] = p

    def series(model_rows, x_key, y_key):
        order = model_order(families)
        return [{"label": model, "family": families.get(model, ""), "reference": is_reference(families.get(model)),
                 "x": [r[x_key] for r in rows], "y": [r[y_key] for r in rows], **_interval_band(rows, y_key)}
                for model, rows in sorted(model_rows.items(), key=lambda item: order(item[0]))]

    by_model: dict[str, list[dict]] = {}
    for p in layer_rows:
        if p["norm"] == "postnorm":
            by_model.setdefault(p["model"], []).append(p)
    # Layers that were not published: their curves were streamed while extracting.
    # They join a model's published curve only when both were scored by the same k-NN protocol;
    # otherwise they are drawn as a series of their own, named by their protocol.
    streamed, mismatched = [], []
    knn_by_model = {m: list(rows) for m, rows in by_model.items()}
    for record in layerwise:
        model = record["model"]
        published = {p["layer"] for p in by_model.get(model, [])}
        analysed = {_knn_protocol_key(p.get("protocol")) for p in by_model.get(model, [])}
        key = _knn_protocol_key(record.get("protocol"))
        series_name = model
        if analysed and analysed != {key}:
            series_name = f"{model} (streamed, {_knn_protocol_label(record.get('protocol'))})"
            mismatched.append({"model": model, "streamed": _knn_protocol_label(record.get("protocol")),
                               "analysed": ", ".join(sorted(_knn_protocol_label(dict(k) if k else None)
                                                            for k in analysed))})
        for row in record["layers"]:
            if row["layer"] not in published:
                streamed.append({"model": model, **row, "protocol": record.get("protocol")})
                knn_by_model.setdefault(series_name, []).append(row)
    for rows in knn_by_model.values():
        rows.sort(key=lambda r: r["layer"])
    charts = {"layers_knn_miou": series(knn_by_model, "layer", "knn_miou"),
              "layers_linear_miou": series(by_model, "layer", "linear_miou")}
    with_variance = {m: p for m, p in last.items() if "variance" in p}
    if with_variance:
        charts["spectrum"] = [{"label": m, "family": families.get(m, ""), "reference": is_reference(families.get(m)),
                               "x": list(range(1, len(p["variance"]["spectrum"]) + 1)),
                               "y": p["variance"]["spectrum"]} for m, p in with_variance.items()]
        charts["removal"] = series({m: p["variance"]["removal"] for m, p in with_variance.items()}, "n_removed",
                                   "knn_miou")
        for degradation in ("blur", "noise", "frequency_band"):
            rows = {m: [r for r in p.get("robustness", []) if r["degradation"] == degradation]
                    for m, p in with_variance.items()}
            if any(rows.values()):
                charts[f"robustness_{degradation}"] = series(rows, "level", "knn_miou")
    retrieval_rows = []
    for model, p in with_variance.items():
        for r in p.get("retrieval", []):
            if "shares" in r:
                retrieval_rows.append({"model": model, "family": families.get(model, ""), **r})
    strongest = {}
    for r in retrieval_rows:
        key = (r["model"], r["transform"], r["exclude_same_image"])
        if key not in strongest or r["level"] > strongest[key]["level"] and r["transform"] != "scale":
            strongest[key] = r
    if retrieval_rows:
        bars = [r for r in strongest.values() if not r["exclude_same_image"]]
        bars.sort(key=lambda r: (r["transform"], model_order(families)(r["model"])))
        charts["retrieval"] = [{"model": r["model"], "family": r["family"], "transform": r["transform"],
                                "level": r["level"], "shares": {o: r["shares"][o] for o in RETRIEVAL_OUTCOMES}}
                               for r in bars]
    last_rows = sorted(last.values(), key=lambda p: (families.get(p["model"], "?"), p["model"]))
    return {"last": last_rows, "layers": layer_rows, "series": charts, "families": families,
            "protocols": _recorded_protocols(probes, streamed), "protocol_mismatch": mismatched,
            "streamed": sorted(streamed, key=lambda r: (r["model"], r["layer"])),
            "knn_by_layer": {m: [[r["layer"], r["knn_miou"]] for r in rows] for m, rows in knn_by_model.items()},
            "retrieval": sorted(retrieval_rows, key=lambda r: (r["model"], r["transform"], r["level"],
                                                               r["exclude_same_image"])),
            "notes": metric_references([{**p, "family": families.get(p["model"])} for p in last_rows],
                                       PROBE_METRICS)}


def _top_variance_overlaps(probe_contexts: dict[str, dict], n: int = 200) -> list[dict]:
    """How many of a model's top-n variance dimensions two datasets share (the paper: 196/200)."""
    tops: dict[str, dict[str, list[int]]] = {}
    for name, ctx in probe_contexts.items():
        for p in ctx["last"]:
            if "variance" in p:
                tops.setdefault(p["model"], {})[name] = p["variance"]["top_dims"][:n]
    rows = []
    for model, by_source in sorted(tops.items()):
        names = sorted(by_source)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                size = min(len(by_source[a]), len(by_source[b]))
                rows.append({"model": model, "a": a, "b": b, "n": size,
                             "shared": len(set(by_source[a][:size]) & set(by_source[b][:size]))})
    return rows


def site_summary(sources: dict[str, dict], options: SummarizeOptions) -> dict:
    """What spans datasets: the home page's leaderboards and the top-variance overlaps."""
    boards = {name: s["leaderboard"] for name, s in sources.items()}
    probes = {name: s["probes"] for name, s in sources.items() if s["probes"]}
    return {"version": SUMMARY_VERSION, "options": options.summary_params(), "sources": list(sources),
            "leaderboards": leaderboard_tables(boards, {name: s["ranked"] for name, s in sources.items()}),
            "overlaps": _top_variance_overlaps(probes)}


# --- the stage -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PatchAtlasError(f"{path}: unreadable result ({err}); rerun `patchatlas analyze`") from err


def _input_files(out: Path, source: str) -> list[Path]:
    """Every file a source's summary is computed from: its results records and k-means maps, and
    the images table whose first masks decide whether it ranks."""
    root = results_dir(out, source)
    files = [*root.glob(f"*/*/{KMEANS_FILE}"), *root.glob(f"*/*/{MAPS_FILE}"), *root.glob(f"*/*/{PROBES_FILE}"),
             *root.glob(f"*/*/{kmeans_maps_path('', '*').name}"), *root.glob(f"*/*/{MAPS_ARRAYS_FILE}"),
             *root.glob(f"*/{ATTENTION_FILE}"), *root.glob(f"*/{LAYERWISE_FILE}"),
             *(dataset_repo_dir(out, source) / IMAGES_CONFIG).glob("train-*.parquet")]
    return sorted(files)


def inputs_digest(out: Path, sources: list[dict], manifest: Manifest) -> str:
    """One SHA-256 over the relative path and content hash of every input of every source (the
    manifest's hash cache: an unchanged file is not read again)."""
    digest = hashlib.sha256()
    for src in sources:
        for path in _input_files(out, src["name"]):
            digest.update(f"{path.relative_to(out).as_posix()}\0{manifest.sha256(path)}\n".encode())
    return digest.hexdigest()


def _summarize_source(out: Path, src: dict, options: SummarizeOptions,
                      facts: dict[str, ModelFacts]) -> tuple[dict, dict[str, np.ndarray]]:
    name = src["name"]
    root = results_dir(out, name)
    kmeans = [_read_json(p) for p in sorted(root.glob(f"*/*/{KMEANS_FILE}"))]
    maps_json = {(m["model"], m["config"]): m for m in (_read_json(p) for p in sorted(root.glob(f"*/*/{MAPS_FILE}")))}
    attention = {p.parent.name: _read_json(p) for p in sorted(root.glob(f"*/{ATTENTION_FILE}"))}
    families = model_families({m["model"] for m in kmeans}, facts)
    registers = {m: facts[m].num_registers for m in families if m in facts}
    images = read_first_images(dataset_repo_dir(out, name) / IMAGES_CONFIG, options.gallery_images)
    classes = [labelled_class_count(_decode_png(img["mask_png"]), src["ignore_index"]) for img in images]
    summary = kmeans_summary(kmeans, maps_json, attention, families, registers, classes, options)
    # The shared scale of the border maps; arrays are read here once, not on every render.
    tops = []
    for m in summary["post"]:
        with np.load(results_dir(out, name, m["model"], m["config"]) / MAPS_ARRAYS_FILE) as npz:
            tops.append(float(np.max(npz["border_map"])))
    summary["border_top"] = max(tops, default=1.0) or 1.0
    modes = {}
    for i, cell in enumerate(summary["gallery"]):
        with np.load(kmeans_maps_path(results_dir(out, name, cell["model"], cell["config"]), cell["k"])) as npz:
            modes[f"mode_{i}"] = position_modes(npz["display_maps"])
        cell["position_mode"] = f"mode_{i}"
    probes = [_read_json(p) for p in sorted(root.glob(f"*/*/{PROBES_FILE}"))]
    layerwise = [_read_json(p) for p in sorted(root.glob(f"*/{LAYERWISE_FILE}"))]
    summary["probes"] = probe_summary(probes, layerwise, families)
    summary["source"] = name
    return summary, modes


def _decode_png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _write_json(path: Path, record) -> None:
    # Key order is kept, not sorted: it is the order tables and chart legends show.
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def run_summarize(out: Path, options: SummarizeOptions) -> bool:
    """The stage: ``<out>/summary/`` from ``<out>/results``. Returns False when the summary was
    already up to date (same inputs, same options) and nothing was written."""
    out = Path(out)
    options.validate()
    manifest = Manifest.load(manifest_path(out))
    sources = [record.to_entry() for record in source_records(manifest)]
    if not sources:
        raise PatchAtlasError(f"{out}: nothing has been extracted yet; run `patchatlas extract --out {out}` first")
    # Families and register counts come from the extracts' records, not the results: a changed
    # record counts too.
    facts = recorded_models(manifest)
    models = sorted({p.name for src in sources if results_dir(out, src["name"]).is_dir()
                     for p in results_dir(out, src["name"]).iterdir() if p.is_dir()})
    recorded = {m: [family, facts[m].num_registers if m in facts else None]
                for m, family in model_families(models, facts).items()}
    params = {"version": SUMMARY_VERSION, "options": options.summary_params(), "models": recorded,
              "sources": [s["name"] for s in sources], "inputs": inputs_digest(out, sources, manifest)}
    if manifest.is_done(SUMMARIZE_KEY, params, out):
        return False
    summaries, written = {}, []
    for src in sources:
        summary, modes = _summarize_source(out, src, options, facts)
        summaries[src["name"]] = summary
        _write_json(summary_file(out, source_summary_name(src["name"])), summary)
        _write_npz(summary_file(out, position_modes_name(src["name"])), modes)
        written += [source_summary_name(src["name"]), position_modes_name(src["name"])]
    _write_json(summary_file(out, SITE_SUMMARY), site_summary(summaries, options))
    written.append(SITE_SUMMARY)
    files = {summary_file(out, name).relative_to(out).as_posix(): manifest.sha256(summary_file(out, name))
             for name in written}
    manifest.set(SUMMARIZE_KEY, {"status": "done", "params": params, "params_hash": params_hash(params),
                                "files": files})
    manifest.save()
    return True


def load_site_summary(out: Path, options: SummarizeOptions, source_names: list[str]) -> dict:
    """The summary files a render reads, checked against what it is asked to show."""
    path = summary_file(out, SITE_SUMMARY)
    if not path.is_file():
        raise missing_summary_error(out, f"the results have not been summarized ({path} is missing)")
    site = json.loads(path.read_text())
    if site.get("version") != SUMMARY_VERSION:
        raise missing_summary_error(out, f"{path} was written by another version of PatchAtlas")
    if site["options"] != options.summary_params():
        wanted = ", ".join(f"{k}={v}" for k, v in options.summary_params().items())
        made = ", ".join(f"{k}={v}" for k, v in site["options"].items())
        raise missing_summary_error(out, f"the summary was made for {made}, and this render shows {wanted}")
    missing = [name for name in source_names if name not in site["sources"]]
    if missing:
        raise missing_summary_error(out, f"the summary has no record of dataset(s) {', '.join(missing)}")
    site["by_source"] = {name: read_source_summary(out, name) for name in source_names}
    return site


def read_source_summary(out: Path, source: str) -> dict:
    """One dataset's summary record, as :func:`run_summarize` wrote it."""
    path = summary_file(out, source_summary_name(source))
    if not path.is_file():
        raise missing_summary_error(out, f"the summary of {source!r} is missing ({path})")
    return json.loads(path.read_text())
