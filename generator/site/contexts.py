"""Page contexts: small functions from the summary and manifest to the values a template shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from generator.figures.plots import histogram_png, line_chart_png, stacked_bars_png
from generator.site.figures import NpzCache, PngWriter, SourceFigures, load_maps
from generator.site.options import RenderOptions
from generator.store.layout import (
    ATTENTION_ARRAYS_FILE,
    IMAGES_CONFIG,
    SOURCES_PREFIX,
    dataset_repo_dir,
    extract_prefix,
    kmeans_maps_path,
    position_modes_name,
    results_dir,
    summary_file,
)
from generator.store.manifest import Manifest
from generator.store.records import extract_records, recorded_hub_repo
from generator.store.repo import hub_viewer_url, is_placeholder
from generator.summarize import (
    RETRIEVAL_OUTCOMES,
    fmt_num,
    fmt_pct,
    is_reference,
    reference_tag,
)


def with_interval(row: dict, key: str, as_percent: bool = True) -> str:
    """``row[key]`` with its interval ``row[key + "_ci"]`` (``[lo, hi]``) when the result has one:
    "53.0 (49.0–57.0)"."""
    fmt = fmt_pct if as_percent else fmt_num
    text = fmt(row.get(key))
    interval = row.get(f"{key}_ci")
    if row.get(key) is not None and interval and None not in interval:
        text += f" ({fmt(interval[0])}–{fmt(interval[1])})"
    return text


@dataclass
class ModelRow:
    name: str
    family: str
    description: str
    patch_size: int
    input_size: int
    license: str
    timm_id: str
    status: str
    reason: str = ""
    weights: dict = field(default_factory=dict)
    resize: str = "squash"  # how images became the input (generator/sources/geometry.py)


def model_rows(manifest: Manifest, source: str | None = None) -> list[ModelRow]:
    rows: dict[str, ModelRow] = {}
    for name, unit in extract_records(manifest, source):
        facts = unit.model_facts
        if facts is None or (name in rows and rows[name].status == "done"):
            continue
        rows[name] = ModelRow(name, facts.family, facts.description, facts.patch_size, unit.input_size,
                              facts.license, facts.weights_label, unit.status, unit.reason, unit.weights or {},
                              unit.resize)
    return list(rows.values())


def _column_label(model: str, family: str) -> str:
    """A gallery column's heading: a reference model says it is one."""
    return f"{model} ({reference_tag(family)})" if is_reference(family) else model


def source_context(out: Path, docs: Path, src: dict, summary: dict, manifest: Manifest, options: RenderOptions,
                    writer: PngWriter) -> dict:
    """Figures and tables of one source from its summary: galleries, positional and artifact
    maps, attention, charts."""
    name = src["name"]
    figures = SourceFigures(out, docs, src, options, writer)
    npz = NpzCache()
    families, models, layers = summary["families"], summary["models"], summary["layers"]

    def maps_of(model: str, config: str) -> dict:
        return load_maps(npz, out, name, model, config)

    cluster_paths, mode_cells = {}, {}
    modes = npz.arrays(summary_file(out, position_modes_name(name)))
    for cell in summary["gallery"]:
        kmeans_npz = kmeans_maps_path(results_dir(out, name, cell["model"], cell["config"]), cell["k"])
        arrays = npz.arrays(kmeans_npz, ("display_maps", "image_ids"))
        cluster_paths[(cell["model"], cell["layer"])] = figures.cluster_maps(
            cell["model"], cell["config"], cell["k"], arrays["display_maps"], [str(v) for v in arrays["image_ids"]])
        mode_cells[(cell["model"], cell["layer"])] = figures.position_mode_map(
            cell["model"], cell["config"], cell["k"], modes[cell["position_mode"]])

    by_layer = []
    for layer in layers:
        layer_models = [m for m in models if (m, layer) in cluster_paths]
        by_layer.append(figures.grid(f"Layer {layer}", [_column_label(m, families[m]) for m in layer_models],
                                     [cluster_paths[(m, layer)] for m in layer_models]))
    by_model, pca, norms = [], [], []
    for model in models:
        model_layers = [layer for layer in layers if (model, layer) in cluster_paths]
        by_model.append(figures.grid(model, [f"layer {layer}" for layer in model_layers],
                                     [cluster_paths[(model, layer)] for layer in model_layers]))
        post_cfgs = [m for m in summary["post"] if m["model"] == model]
        pca.append(figures.grid(model, [f"layer {m['layer']}" for m in post_cfgs],
                                [figures.pca_maps(model, m["config"], maps_of(model, m["config"]))
                                 for m in post_cfgs]))
        pre_cfgs = [m for m in summary["pre"] if m["model"] == model]
        if pre_cfgs:
            norms.append(figures.grid(model, [f"layer {m['layer']}" for m in pre_cfgs],
                                      [figures.norm_maps(model, m["config"], maps_of(model, m["config"]))
                                       for m in pre_cfgs]))

    attention = summary["attention"]
    attention_grids = []
    for model in models:
        att = attention.get(model)
        if not att:
            continue
        arrays = npz.arrays(results_dir(out, name, model) / ATTENTION_ARRAYS_FILE)
        ids = [str(v) for v in arrays["image_ids"]]
        paths = figures.attention_maps(model, arrays["cls_maps"], ids, att["heads"])
        per_head = att.get("per_head") or [None] * att["heads"]
        columns = [f"head {h}" + (f" · J={100 * j:.0f}" if j is not None else "") for h, j in enumerate(per_head)]
        cells = [{image_id: paths.get((image_id, h)) for image_id in ids} for h in range(att["heads"])]
        attention_grids.append(figures.grid(model, columns, cells))

    border_cells = {(m["model"], m["layer"]): figures.border_map(
        m["model"], m["config"], maps_of(m["model"], m["config"])["border_map"], summary["border_top"])
        for m in summary["post"]}

    charts = {}
    gallery_norm = options.gallery_norm
    if summary["locality"]:
        rel = figures.assets / "charts" / "locality.png"
        line_chart_png(summary["locality"]["series"], docs / rel, xlabel="Patch distance (Chebyshev)",
                       ylabel="Mean cosine similarity", title=f"Locality on {name} (last layer, {gallery_norm})",
                       baseline=summary["locality"]["baseline"])
        charts["locality"] = rel.as_posix()
    if summary["norm_histograms"]:
        rel = figures.assets / "charts" / "norms.png"
        histogram_png(summary["norm_histograms"], docs / rel, xlabel="L2 norm of pre-norm patch tokens",
                      title=f"Token norms on {name}")
        charts["norms"] = rel.as_posix()

    return {
        "source": published_source(src), "models": model_rows(manifest, name), "families": families,
        "images": figures.base_rows,
        "ranked": summary["ranked"],
        "gallery": {"k": options.gallery_k, "norm": gallery_norm, "by_layer": by_layer, "by_model": by_model,
                    "pca": pca, "norms": norms, "attention": attention_grids},
        "metrics": summary["metrics"], "attention": attention, "positional_rows": summary["positional_rows"],
        "charts": charts, "notes": summary["notes"],
        "border": {"models": models, "layers": layers, "cells": border_cells},
        "position_modes": {"models": models, "layers": layers, "cells": mode_cells},
    }


# Chart axes name the metric in words; mIoU charts keep its whole 0–1 scale.
METRIC_LABELS = {"knn_miou": "k-NN mIoU", "linear_miou": "Linear-probe mIoU"}


MIOU_SCALE = (0.0, 1.0)


DEGRADATION_LABELS = {"blur": "Box blur kernel (px)", "noise": "Gaussian noise std (0–255 scale)",
                      "frequency_band": "Noise frequency band (0 = lowest)"}


def probe_context(docs: Path, name: str, probes: dict) -> dict:
    """The probe page's section of one source: its summary's tables, and its charts drawn."""
    assets = Path("assets") / name / "charts"
    series = probes["series"]
    charts = {}
    for metric in ("knn_miou", "linear_miou"):
        rel = assets / f"layers-{metric}.png"
        label = METRIC_LABELS[metric]
        line_chart_png(series[f"layers_{metric}"], docs / rel, xlabel="Layer", ylabel=label,
                       title=f"{label} by layer on {name}", ylim=MIOU_SCALE)
        charts[f"layers_{metric}"] = rel.as_posix()
    if "spectrum" in series:
        rel = assets / "variance-spectrum.png"
        line_chart_png(series["spectrum"], docs / rel, xlabel="Dimension (sorted by train variance)",
                       ylabel="Variance", title=f"Feature variance spectrum on {name}", log_y=True)
        charts["spectrum"] = rel.as_posix()
        rel = assets / "variance-removal.png"
        line_chart_png(series["removal"], docs / rel, xlabel="Top-variance dimensions removed",
                       ylabel="k-NN mIoU", title=f"Removing high-variance dimensions on {name}", ylim=MIOU_SCALE)
        charts["removal"] = rel.as_posix()
        for degradation in ("blur", "noise", "frequency_band"):
            if f"robustness_{degradation}" in series:
                rel = assets / f"robustness-{degradation}.png"
                line_chart_png(series[f"robustness_{degradation}"], docs / rel,
                               xlabel=DEGRADATION_LABELS[degradation], ylabel="k-NN mIoU",
                               title=f"Robustness to {degradation.replace('_', ' ')} on {name}", ylim=MIOU_SCALE)
                charts[f"robustness_{degradation}"] = rel.as_posix()
    if "retrieval" in series:
        bars = series["retrieval"]
        rel = assets / "retrieval.png"
        stacked_bars_png([_column_label(r["model"], r["family"]) + f" · {r['transform']} {r['level']:g}" for r in bars],
                         {o.replace("_", " "): [r["shares"][o] for r in bars] for o in RETRIEVAL_OUTCOMES}, docs / rel,
                         xlabel="Share of query patches", title=f"Nearest original patch on {name} (strongest level)",
                         value_lim=(0, 1))
        charts["retrieval"] = rel.as_posix()
    return {**{key: value for key, value in probes.items() if key != "series"}, "charts": charts}


def headline_figures(docs: Path, contexts: dict[str, dict]) -> list[dict]:
    """Small comparison charts for the home page: the locality chart of each dataset."""
    return [{"title": f"Locality on {name}", "path": ctx["charts"]["locality"]}
            for name, ctx in contexts.items() if "locality" in ctx["charts"]]


def gallery_strip(contexts: dict[str, dict], n_images: int = 3) -> dict | None:
    """The home page's opening picture: a few images of one dataset, their ground truth and
    every model's deepest-layer cluster map side by side (references last, labelled).

    The dataset is the first one whose images have regions to segment, else the first with a
    gallery; the cells are the dataset page's gallery PNGs, so nothing is drawn twice.
    """
    with_gallery = [name for name, ctx in contexts.items() if any(g.columns for g in ctx["gallery"]["by_model"])]
    if not with_gallery:
        return None
    name = next((n for n in with_gallery if contexts[n].get("ranked", True)), with_gallery[0])
    ctx = contexts[name]
    grids = [g for g in ctx["gallery"]["by_model"] if g.columns]
    columns = [{"model": g.title, "tag": reference_tag(ctx["families"].get(g.title)), "layer": g.columns[-1]}
               for g in grids]
    rows = [{"image_id": base["image_id"], "image": base["image"], "mask": base["mask"],
             "cells": [g.rows[i]["cells"][-1] for g in grids]}
            for i, base in enumerate(grids[0].rows[:n_images])]
    return {"source": name, "k": ctx["gallery"]["k"], "norm": ctx["gallery"]["norm"], "columns": columns,
            "rows": rows}


def published_source(src: dict) -> dict:
    """``src`` as a page may show it: skipped files named inside the source folder.

    The manifest records where they were on the machine that built it; a published page names
    them as the dataset's own files (``images/x.png``), never by that machine's paths.
    """
    root = str((src.get("params") or {}).get("path") or "")
    if not root or not src.get("skipped_images"):
        return src
    base = root.rstrip("/\\")
    name = Path(base).name

    def local(text) -> str:
        return str(text).replace(base + "/", "").replace(base + "\\", "").replace(base, name)

    return {**src, "skipped_images": [{k: local(v) for k, v in s.items()} for s in src["skipped_images"]]}


def downloads_context(out: Path, manifest: Manifest) -> list[dict]:
    """Every published config of every dataset repository, with size and schema."""
    datasets_ = []
    for _, src in sorted(manifest.entries(prefix=SOURCES_PREFIX)):
        configs = [{"name": IMAGES_CONFIG, "rows": src["num_images"], "bytes": None, "schema": "images"}]
        for _key, unit in sorted(manifest.entries(prefix=extract_prefix(src["name"]))):
            if unit.get("status") != "done" or "configs" not in unit:
                continue
            for cfg in unit["configs"]:
                configs.append({"name": cfg["name"], "rows": cfg["num_rows"], "bytes": cfg["num_bytes"],
                                "schema": f"patches, embedding {cfg['dtype']}[{cfg['dim']}]"})
            for path_key, suffix, schema in (("prefix_paths", "-prefix", "prefix tokens"),
                                             ("attention_paths", "-attention", "CLS attention")):
                if unit.get(path_key):
                    size = sum((dataset_repo_dir(out, src["name"]) / rel).stat().st_size for rel in unit[path_key])
                    configs.append({"name": f"{unit['model']}{suffix}", "rows": None, "bytes": size, "schema": schema})
        repo_id = recorded_hub_repo(manifest, src["name"])
        for c in configs:
            c["url"] = hub_viewer_url(repo_id, c["name"])
        datasets_.append({"name": src["name"], "license": src["license"], "configs": configs,
                          "repo_id": repo_id, "published": not is_placeholder(repo_id),
                          "url": hub_viewer_url(repo_id)})
    return datasets_
