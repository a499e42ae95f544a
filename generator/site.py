"""The render stage: results folder → figures and Markdown pages → ``mkdocs build``.

The site is a pure function of ``<out>`` (manifest, dataset repos, results): pages are rendered
from ``templates/`` into ``<out>/docs`` on top of the hand-written skeleton in ``site/``, and
MkDocs builds ``<out>/site``. Both folders are rebuilt whole and swapped in, so a failed render
never leaves half a site behind.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from tqdm.auto import tqdm
import markupsafe
import numpy as np
from PIL import Image

from generator.assets import mkdocs_config, site_skeleton_dir, templates_dir
from generator.errors import PatchAtlasError
from generator.extract import extract_input, recorded_hub_repo
from generator.sources.geometry import DEFAULT_RESIZE
from generator.analyses.position import position_cluster_histogram, position_mode_map
from generator.analyses.probes import ProbeProtocol
from generator.figures.maps import thumbnail, to_png_bytes, upsample_nearest
from generator.figures.palette import PALETTE, colorize
from generator.figures.plots import heatmap_rgb, histogram_png, line_chart_png, stacked_bars_png
from generator.models.registry import MODELS, get_model_entry
from generator.store.atomic import disk_full_error, is_disk_full
from generator.store.lock import RENDER_STAGING_PREFIX
from generator.store.manifest import Manifest
from generator.store.parquet import read_first_images
from generator.store.repo import IMAGES_CONFIG, hub_viewer_url, is_placeholder

# Characters that would start Markdown or HTML syntax when they come from data (names, labels).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_escape(value) -> markupsafe.Markup:
    """Escape result-derived text for a Markdown page: HTML first, then Markdown syntax."""
    html_safe = str(markupsafe.escape(str(value)))
    return markupsafe.Markup(_MD_SPECIAL.sub(r"\\\1", html_safe))


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


def _fmt_pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _fmt_num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def with_interval(row: dict, key: str, as_percent: bool = True) -> str:
    """``row[key]`` with its interval ``row[key + "_ci"]`` (``[lo, hi]``) when the result has one:
    "53.0 (49.0–57.0)"."""
    fmt = _fmt_pct if as_percent else _fmt_num
    text = fmt(row.get(key))
    interval = row.get(f"{key}_ci")
    if row.get(key) is not None and interval and None not in interval:
        text += f" ({fmt(interval[0])}–{fmt(interval[1])})"
    return text


def template_env() -> jinja2.Environment:
    # Autoescape is on so any value that skips the `md` filter is still HTML-escaped.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters["md"] = md_escape
    # Front matter is YAML, not Markdown: a JSON string is a safe YAML scalar for any name.
    env.filters["yaml_str"] = lambda value: markupsafe.Markup(json.dumps(str(value)))
    env.filters["pct"] = _fmt_pct
    env.filters["with_interval"] = with_interval
    env.filters["reference_tag"] = reference_tag
    env.tests["reference"] = is_reference
    env.filters["reference_models"] = lambda families: [m for m, f in families.items() if is_reference(f)]
    env.filters["mib"] = lambda v: "—" if v is None else f"{v / 2**20:.2f} MiB"
    return env


@dataclass
class RenderOptions:
    gallery_images: int = 8
    gallery_k: int = 8
    gallery_norm: str = "postnorm"
    thumb_side: int = 224  # stored size; pages show them smaller and open them full size on click
    build_html: bool = True
    progress: bool = True


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


def _weights_label(entry) -> str:
    """What a page says the weights are: the timm id, or how a reference model got its own."""
    if entry.construction:
        return f"constructed in code ({entry.construction})"
    return entry.timm_id if entry.pretrained else "untrained"


def _model_rows(manifest: Manifest, source: str | None = None) -> list[ModelRow]:
    rows: dict[str, ModelRow] = {}
    prefix = f"extract/{source}/" if source else "extract/"
    for key, unit in sorted(manifest.entries(prefix=prefix)):
        name = key.rsplit("/", 1)[-1]
        if name == IMAGES_CONFIG or name not in MODELS:
            continue
        entry = get_model_entry(name)
        status = unit.get("status", "unknown")
        if name in rows and rows[name].status == "done":
            continue
        recorded = extract_input(unit["params"]) if "params" in unit else {"input_size": entry.input_size}
        rows[name] = ModelRow(name, entry.family, entry.description, entry.patch_size, recorded["input_size"],
                              entry.license, _weights_label(entry),
                              status, unit.get("reason", ""), unit.get("weights", {}),
                              recorded.get("resize", DEFAULT_RESIZE))
    return list(rows.values())


def _load_json(paths) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(paths)]


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@dataclass
class Grid:
    """A table of pictures: one row per image (image, ground truth, then one cell per column)."""

    title: str
    columns: list[str]
    rows: list[dict]  # {"image_id", "image", "mask", "cells": [path | None]}
    caption: str = ""


class PngWriter:
    """Encodes and writes figure PNGs on a thread pool (zlib runs without the GIL).

    Files go straight to their final names: they live in the render's staging folder, which is
    swapped in whole once complete, so a per-file temporary name and fsync would buy nothing.
    """

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        self._futures = []

    def submit(self, rgb: np.ndarray, path: Path) -> None:
        self._futures.append(self._pool.submit(self._write, np.ascontiguousarray(rgb), path))

    def submit_bytes(self, data: bytes, path: Path) -> None:
        self._futures.append(self._pool.submit(self._write_bytes, data, path))

    @staticmethod
    def _write_bytes(data: bytes, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    @staticmethod
    def _write(rgb: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_png_bytes(rgb))

    def close(self) -> None:
        try:
            for future in self._futures:
                future.result()  # re-raises the first failed write
        finally:
            self._pool.shutdown()


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


class SourceFigures:
    """Writes the figures of one source under ``docs/assets/<source>`` and returns their paths.

    Paths are relative to the docs root; templates prefix them for the page's depth.
    """

    def __init__(self, out: Path, docs: Path, source: dict, options: RenderOptions, writer: "PngWriter"):
        self.out, self.docs, self.source, self.options, self.writer = out, docs, source, options, writer
        self.name = source["name"]
        self.assets = Path("assets") / self.name
        self.ignore_index = source["ignore_index"]
        repo = out / "datasets" / self.name
        self.images = read_first_images(repo / IMAGES_CONFIG, options.gallery_images)
        self.ids = [img["image_id"] for img in self.images]
        self.base_rows = []
        self.sizes = {}
        self.classes_per_image = []
        for img in self.images:
            rgb = _decode_png(img["image_png"])
            rgb = thumbnail(rgb.reshape(img["height"], img["width"], -1)[..., :3], options.thumb_side)
            self.sizes[img["image_id"]] = rgb.shape[:2]
            image_rel = self._save_rgb(rgb, "images", img["image_id"])
            # The stored original opens on click; galleries show the thumbnail.
            full_rel = (self.assets / "full" / f"{img['image_id']}.png").as_posix()
            self.writer.submit_bytes(img["image_png"], self.docs / full_rel)
            raw_mask = _decode_png(img["mask_png"])
            self.classes_per_image.append(labelled_class_count(raw_mask, self.ignore_index))
            mask = upsample_nearest(colorize(raw_mask, self.ignore_index), rgb.shape[:2])
            mask_rel = self._save_rgb(mask, "masks", img["image_id"])
            self.base_rows.append({"image_id": img["image_id"], "image": image_rel, "image_full": full_rel,
                                   "mask": mask_rel})

    def _save_rgb(self, rgb: np.ndarray, *parts: str) -> str:
        rel = self.assets.joinpath(*parts[:-1]) / f"{parts[-1]}.png"
        self.writer.submit(rgb, self.docs / rel)
        return rel.as_posix()

    def _per_image(self, ids: list[str], arrays: np.ndarray, to_rgb, *parts: str) -> dict[str, str]:
        """One PNG per gallery image from per-image arrays [n, gh, gw(, 3)]."""
        paths = {}
        for image_id, array in zip(ids, arrays):
            if image_id in self.sizes:
                rgb = upsample_nearest(to_rgb(array), self.sizes[image_id])
                paths[image_id] = self._save_rgb(rgb, *parts, image_id)
        return paths

    def cluster_maps(self, model: str, config: str, k: int) -> dict[str, str]:
        with np.load(self.out / "results" / self.name / model / config / f"kmeans-k{k}.npz") as npz:
            display, ids = npz["display_maps"], [str(v) for v in npz["image_ids"]]
        return self._per_image(ids, display, lambda m: colorize(m, self.ignore_index), model, config, f"clusters-k{k}")

    def pca_maps(self, model: str, config: str, maps: dict) -> dict[str, str]:
        return self._per_image(maps["ids"], maps["pca_rgb"], lambda a: a, model, config, "pca")

    def norm_maps(self, model: str, config: str, maps: dict) -> dict[str, str]:
        norms = maps["norm_maps"]
        top = float(norms.max()) if norms.size else 1.0  # one scale per config: images compare
        return self._per_image(maps["ids"], norms, lambda a: heatmap_rgb(a, 0.0, top, "magma"), model, config, "norms")

    def position_mode_map(self, model: str, config: str, k: int) -> str:
        """The most frequent cluster at each position over all images (positional bias made visible)."""
        with np.load(self.out / "results" / self.name / model / config / f"kmeans-k{k}.npz") as npz:
            display = npz["display_maps"].astype(np.int64)
        mode, _ = position_mode_map(position_cluster_histogram(display, int(display.max()) + 1))
        rgb = upsample_nearest(colorize(mode, self.ignore_index), (96, 96))
        return self._save_rgb(rgb, model, config, f"position-mode-k{k}")

    def border_map(self, model: str, config: str, values: np.ndarray, top: float) -> str:
        rgb = upsample_nearest(heatmap_rgb(values, 0.0, top, "viridis"), (96, 96))
        return self._save_rgb(rgb, model, config, "border")

    def attention_maps(self, model: str, maps: np.ndarray, ids: list[str], heads: int) -> dict[tuple[str, int], str]:
        paths = {}
        for image_id, per_head in zip(ids, maps):
            if image_id not in self.sizes:
                continue
            for head in range(min(heads, per_head.shape[0])):
                rgb = upsample_nearest(heatmap_rgb(per_head[head], 0.0, None, "inferno"), self.sizes[image_id])
                paths[(image_id, head)] = self._save_rgb(rgb, model, "attention", f"{image_id}-h{head}")
        return paths

    def grid(self, title: str, columns: list[str], cells: list[dict[str, str]], caption: str = "") -> Grid:
        rows = [{**row, "cells": [c.get(row["image_id"]) for c in cells]} for row in self.base_rows]
        return Grid(title, columns, rows, caption)


def _column_label(model: str, family: str) -> str:
    """A gallery column's heading: a reference model says it is one."""
    return f"{model} ({reference_tag(family)})" if is_reference(family) else model


def _load_maps(out: Path, source: str, model: str, config: str) -> dict:
    path = out / "results" / source / model / config / "maps.npz"
    with np.load(path) as npz:
        maps = {key: npz[key] for key in npz.files}
    maps["ids"] = [str(v) for v in maps.pop("image_ids")]
    return maps


def _source_context(out: Path, docs: Path, src: dict, manifest: Manifest, options: RenderOptions,
                    writer: PngWriter) -> dict:
    """Figures and tables of one source: galleries, positional and artifact maps, attention."""
    name = src["name"]
    figures = SourceFigures(out, docs, src, options, writer)
    loaded_maps: dict[tuple[str, str], dict] = {}

    def maps_of(model: str, config: str) -> dict:  # each maps.npz is decompressed once
        if (model, config) not in loaded_maps:
            loaded_maps[(model, config)] = _load_maps(out, name, model, config)
        return loaded_maps[(model, config)]

    kmeans = _load_json((out / "results" / name).glob("*/*/kmeans.json"))
    maps_json = {(m["model"], m["config"]): m for m in _load_json((out / "results" / name).glob("*/*/maps.json"))}
    attention = {p.parent.name: json.loads(p.read_text()) for p in (out / "results" / name).glob("*/attention.json")}
    families = {m: get_model_entry(m).family if m in MODELS else "?" for m in {r["model"] for r in kmeans}}
    k = options.gallery_k

    def nearest_k(metric: dict) -> int | None:
        ks = [r["k"] for r in metric["kmeans"]]
        return min(ks, key=lambda v: (abs(v - k), v)) if ks else None

    gallery_norm = options.gallery_norm
    post = [m for m in kmeans if m["norm"] == gallery_norm]
    pre = [m for m in kmeans if m["norm"] == "prenorm"]
    models = sorted({m["model"] for m in kmeans}, key=model_order(families))
    layers = sorted({m["layer"] for m in post})
    cluster_paths = {(m["model"], m["layer"]): figures.cluster_maps(m["model"], m["config"], nearest_k(m))
                     for m in post if nearest_k(m) is not None}

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
        post_cfgs = sorted((m for m in post if m["model"] == model), key=lambda m: m["layer"])
        pca.append(figures.grid(model, [f"layer {m['layer']}" for m in post_cfgs],
                                [figures.pca_maps(model, m["config"], maps_of(model, m["config"]))
                                 for m in post_cfgs]))
        pre_cfgs = sorted((m for m in pre if m["model"] == model), key=lambda m: m["layer"])
        if pre_cfgs:
            norms.append(figures.grid(model, [f"layer {m['layer']}" for m in pre_cfgs],
                                      [figures.norm_maps(model, m["config"], maps_of(model, m["config"]))
                                       for m in pre_cfgs]))

    attention_grids = []
    for model in models:
        att = attention.get(model)
        if not att:
            continue
        with np.load(out / "results" / name / model / "attention.npz") as npz:
            maps, ids = npz["cls_maps"], [str(v) for v in npz["image_ids"]]
        paths = figures.attention_maps(model, maps, ids, att["heads"])
        per_head = att.get("per_head") or [None] * att["heads"]
        columns = [f"head {h}" + (f" · J={100 * j:.0f}" if j is not None else "") for h, j in enumerate(per_head)]
        cells = [{image_id: paths.get((image_id, h)) for image_id in ids} for h in range(att["heads"])]
        attention_grids.append(figures.grid(model, columns, cells))

    # Positional bias and artifacts: one row per (model, layer, view), CL and MIM grouped.
    rows = []
    border_top = max((float(np.max(maps_of(m["model"], m["config"])["border_map"]))
                      for m in post), default=1.0) or 1.0
    border_cells: dict[tuple[str, int], str] = {}
    mode_cells: dict[tuple[str, int], str] = {}
    for m in sorted(kmeans, key=lambda m: (families[m["model"]], m["model"], m["layer"], m["norm"])):
        mj = maps_json.get((m["model"], m["config"]), {})
        chosen = next((r for r in m["kmeans"] if r["k"] == nearest_k(m)), None)
        position = mj.get("position") or {}
        rows.append({
            "model": m["model"], "family": families[m["model"]], "layer": m["layer"], "norm": m["norm"],
            "registers": get_model_entry(m["model"]).num_registers if m["model"] in MODELS else None,
            "border_score": mj.get("border_score"), "row_r2": position.get("row_r2"), "col_r2": position.get("col_r2"),
            "row_chance_r2": position.get("row_chance_r2"), "col_chance_r2": position.get("col_chance_r2"),
            "consistency": chosen.get("positional_consistency") if chosen else None,
            "stability": (m.get("stability") or {}).get("mean_ari"),
            "outlier_share": (mj.get("norms") or {}).get("outlier_share"),
            "miou": chosen["miou"] if chosen else None, "chance": chosen["chance_miou"] if chosen else None,
        })
        if m["norm"] == gallery_norm:
            border_cells[(m["model"], m["layer"])] = figures.border_map(
                m["model"], m["config"], maps_of(m["model"], m["config"])["border_map"], border_top)
            if nearest_k(m) is not None:
                mode_cells[(m["model"], m["layer"])] = figures.position_mode_map(m["model"], m["config"], nearest_k(m))

    charts = {}
    last = {model: max((m for m in post if m["model"] == model), key=lambda m: m["layer"]) for model in models
            if any(m["model"] == model for m in post)}
    if last:
        series, baselines = [], []
        for model, m in last.items():
            loc = maps_json[(model, m["config"])]["locality"]
            series.append({"label": f"{model} L{m['layer']}", "x": loc["distance"], "y": loc["mean_cosine"],
                           "family": families[model], "reference": is_reference(families[model])})
            baselines.append(loc["random_baseline"])
        rel = figures.assets / "charts" / "locality.png"
        line_chart_png(series, docs / rel, xlabel="Patch distance (Chebyshev)", ylabel="Mean cosine similarity",
                       title=f"Locality on {name} (last layer, {gallery_norm})", baseline=float(np.mean(baselines)))
        charts["locality"] = rel.as_posix()
    last_pre = {model: max((m for m in pre if m["model"] == model), key=lambda m: m["layer"]) for model in models
                if any(m["model"] == model for m in pre)}
    if last_pre:
        hists = {}
        for model, m in last_pre.items():
            h = maps_json[(model, m["config"])]["norms"]["histogram"]
            hists[f"{model} L{m['layer']}"] = {**h, "family": families[model], "reference": is_reference(families[model])}
        rel = figures.assets / "charts" / "norms.png"
        histogram_png(hists, docs / rel, xlabel="L2 norm of pre-norm patch tokens", title=f"Token norms on {name}")
        charts["norms"] = rel.as_posix()

    return {
        "source": _published_source(src), "models": _model_rows(manifest, name), "families": families,
        "ranked": ranks_by_segmentation(figures.classes_per_image),
        "gallery": {"k": k, "norm": gallery_norm, "by_layer": by_layer, "by_model": by_model, "pca": pca,
                    "norms": norms, "attention": attention_grids},
        "metrics": sorted(kmeans, key=lambda m: (families[m["model"]], m["model"], m["layer"], m["norm"])),
        "attention": attention, "positional_rows": rows, "charts": charts,
        "border": {"models": models, "layers": layers, "cells": border_cells},
        "position_modes": {"models": models, "layers": layers, "cells": mode_cells},
    }


def _legend(docs: Path, source: str, classes: list[dict], writer: PngWriter) -> list[dict]:
    legend = []
    for c in classes:
        swatch = np.full((12, 12, 3), PALETTE[c["id"] % len(PALETTE)], dtype=np.uint8)
        rel = Path("assets") / source / "legend" / f"class-{c['id']}.png"
        writer.submit(swatch, docs / rel)
        legend.append({**c, "swatch": rel.as_posix()})
    return legend


def render_docs(out: Path, docs: Path, options: RenderOptions) -> list[Path]:
    """Write every generated page and figure under ``docs``; returns the pages written."""
    manifest = Manifest.load(out / "manifest.json")
    sources = [entry for _, entry in sorted(manifest.entries(prefix="sources/"))]
    if not sources:
        raise PatchAtlasError(f"{out}: nothing has been extracted yet; run `patchatlas extract --out {out}` first")
    env = template_env()
    pages, dataset_pages, contexts = [], [], {}
    writer = PngWriter()
    try:
        for src in tqdm(sources, disable=not options.progress, desc="figures", unit="dataset"):
            context = _source_context(out, docs, src, manifest, options, writer)
            context.update(legend=_legend(docs, src["name"], src["classes"], writer),
                           dataset_dir=recorded_hub_repo(manifest, src["name"]), page_depth="../",
                           notes=source_reference_notes(context))
            contexts[src["name"]] = context
    finally:
        writer.close()
    for src in sources:
        context = contexts[src["name"]]
        page_rel = Path("datasets") / f"{src['name']}.md"
        _write_page(docs / page_rel, env.get_template("dataset.md.j2").render(**context))
        pages.append(docs / page_rel)
        dataset_pages.append({"name": src["name"], "page": page_rel.as_posix(), "num_images": src["num_images"],
                              "num_classes": len(src["classes"]), "license": src["license"],
                              "description": src["description"]})
    _write_page(docs / "positional-artifacts.md",
                env.get_template("artifacts.md.j2").render(contexts=contexts, page_depth=""))
    pages.append(docs / "positional-artifacts.md")
    probe_contexts = {}
    for src in sources:
        probe = _probe_context(out, docs, src, contexts[src["name"]]["families"])
        if probe:
            probe["notes"] = metric_references(
                [{**p, "family": probe["families"].get(p["model"])} for p in probe["last"]], PROBE_METRICS)
            probe_contexts[src["name"]] = probe
    _write_page(docs / "probe-metrics.md", env.get_template("probes.md.j2").render(
        contexts=probe_contexts, overlaps=_top_variance_overlaps(probe_contexts), page_depth=""))
    pages.append(docs / "probe-metrics.md")
    _write_page(docs / "downloads.md", env.get_template("downloads.md.j2").render(
        datasets=_downloads(out, manifest), page_depth=""))
    pages.append(docs / "downloads.md")
    models = _model_rows(manifest)
    for model in models:
        if model.status != "done":
            continue
        entry = get_model_entry(model.name)
        per_source = {name: ctx for name, ctx in contexts.items() if model.name in ctx["families"]}
        page = env.get_template("model.md.j2").render(model=model, entry=entry, contexts=per_source, page_depth="../")
        _write_page(docs / "models" / f"{model.name}.md", page)
        pages.append(docs / "models" / f"{model.name}.md")
    home = env.get_template("index.md.j2").render(
        models=models, datasets=dataset_pages, out=str(out), headline=_headline_figures(docs, contexts),
        leaderboards=leaderboard_tables(_leaderboards(contexts), {n: c["ranked"] for n, c in contexts.items()}),
        strip=gallery_strip(contexts))
    _write_page(docs / "index.md", home)
    pages.append(docs / "index.md")
    return pages


# Chart axes name the metric in words; mIoU charts keep its whole 0–1 scale.
METRIC_LABELS = {"knn_miou": "k-NN mIoU", "linear_miou": "Linear-probe mIoU"}
MIOU_SCALE = (0.0, 1.0)
DEGRADATION_LABELS = {"blur": "Box blur kernel (px)", "noise": "Gaussian noise std (0–255 scale)",
                      "frequency_band": "Noise frequency band (0 = lowest)"}


def _interval_band(rows: list[dict], key: str) -> dict:
    """``y_lo``/``y_hi`` of a chart series from the rows' ``<key>_ci`` intervals, when all have one."""
    intervals = [r.get(f"{key}_ci") for r in rows]
    if not rows or any(not ci or None in ci for ci in intervals):
        return {}
    return {"y_lo": [ci[0] for ci in intervals], "y_hi": [ci[1] for ci in intervals]}


def _probe_context(out: Path, docs: Path, src: dict, families: dict[str, str]) -> dict | None:
    """Tables and charts of the few-shot probes of one source (analyses 6–10)."""
    name = src["name"]
    probes = _load_json((out / "results" / name).glob("*/*/probes.json"))
    if not probes:
        return None
    assets = Path("assets") / name / "charts"
    layer_rows = sorted(probes, key=lambda p: (families.get(p["model"], "?"), p["model"], p["layer"], p["norm"]))
    last = {}
    for p in probes:
        if p["norm"] == "postnorm" and p["layer"] >= last.get(p["model"], {}).get("layer", -1):
            last[p["model"]] = p
    charts = {}

    def series(model_rows, x_key, y_key):
        order = model_order(families)
        return [{"label": model, "family": families.get(model, ""), "reference": is_reference(families.get(model)),
                 "x": [r[x_key] for r in rows], "y": [r[y_key] for r in rows], **_interval_band(rows, y_key)}
                for model, rows in sorted(model_rows.items(), key=lambda item: order(item[0]))]

    by_model: dict[str, list[dict]] = {}
    for p in layer_rows:
        if p["norm"] == "postnorm":
            by_model.setdefault(p["model"], []).append(p)
    # Layers that were not published: their curves were streamed while extracting (generator/stream.py).
    # They join a model's published curve only when both were scored by the same k-NN protocol;
    # otherwise they are drawn as a series of their own, named by their protocol.
    streamed, mismatched = [], []
    knn_by_model = {m: list(rows) for m, rows in by_model.items()}
    for record in _load_json((out / "results" / name).glob("*/layerwise.json")):
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
    for metric in ("knn_miou", "linear_miou"):
        rel = assets / f"layers-{metric}.png"
        rows_by_model = knn_by_model if metric == "knn_miou" else by_model
        label = METRIC_LABELS[metric]
        line_chart_png(series(rows_by_model, "layer", metric), docs / rel, xlabel="Layer", ylabel=label,
                       title=f"{label} by layer on {name}", ylim=MIOU_SCALE)
        charts[f"layers_{metric}"] = rel.as_posix()
    with_variance = {m: p for m, p in last.items() if "variance" in p}
    if with_variance:
        rel = assets / "variance-spectrum.png"
        line_chart_png([{"label": m, "family": families.get(m, ""), "reference": is_reference(families.get(m)),
                         "x": list(range(1, len(p["variance"]["spectrum"]) + 1)),
                         "y": p["variance"]["spectrum"]} for m, p in with_variance.items()], docs / rel,
                       xlabel="Dimension (sorted by train variance)", ylabel="Variance",
                       title=f"Feature variance spectrum on {name}", log_y=True)
        charts["spectrum"] = rel.as_posix()
        rel = assets / "variance-removal.png"
        line_chart_png(series({m: p["variance"]["removal"] for m, p in with_variance.items()}, "n_removed",
                              "knn_miou"), docs / rel, xlabel="Top-variance dimensions removed",
                       ylabel="k-NN mIoU", title=f"Removing high-variance dimensions on {name}", ylim=MIOU_SCALE)
        charts["removal"] = rel.as_posix()
        for degradation in ("blur", "noise", "frequency_band"):
            rows = {m: [r for r in p.get("robustness", []) if r["degradation"] == degradation]
                    for m, p in with_variance.items()}
            if any(rows.values()):
                rel = assets / f"robustness-{degradation}.png"
                line_chart_png(series(rows, "level", "knn_miou"), docs / rel, xlabel=DEGRADATION_LABELS[degradation],
                               ylabel="k-NN mIoU", title=f"Robustness to {degradation.replace('_', ' ')} on {name}",
                               ylim=MIOU_SCALE)
                charts[f"robustness_{degradation}"] = rel.as_posix()
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
        outcomes = ("same_patch", "same_fine", "same_super", "background", "wrong")
        bars = [r for r in strongest.values() if not r["exclude_same_image"]]
        bars.sort(key=lambda r: (r["transform"], model_order(families)(r["model"])))
        rel = assets / "retrieval.png"
        stacked_bars_png([_column_label(r["model"], r["family"]) + f" · {r['transform']} {r['level']:g}" for r in bars],
                         {o.replace("_", " "): [r["shares"][o] for r in bars] for o in outcomes}, docs / rel,
                         xlabel="Share of query patches", title=f"Nearest original patch on {name} (strongest level)",
                         value_lim=(0, 1))
        charts["retrieval"] = rel.as_posix()
    return {"last": sorted(last.values(), key=lambda p: (families.get(p["model"], "?"), p["model"])),
            "layers": layer_rows, "charts": charts, "families": families,
            "protocols": _recorded_protocols(probes, streamed), "protocol_mismatch": mismatched,
            "streamed": sorted(streamed, key=lambda r: (r["model"], r["layer"])),
            "knn_by_layer": {m: [(r["layer"], r["knn_miou"]) for r in rows] for m, rows in knn_by_model.items()},
            "retrieval": sorted(retrieval_rows, key=lambda r: (r["model"], r["transform"], r["level"],
                                                               r["exclude_same_image"]))}


def _knn_protocol_key(protocol: dict | None) -> tuple | None:
    """What a k-NN number depends on (``ProbeProtocol.KNN_FIELDS``), hashable; None if not recorded."""
    if not protocol:
        return None
    return tuple((field, protocol.get(field)) for field in ProbeProtocol.KNN_FIELDS)


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


def _leaderboards(contexts: dict[str, dict]) -> dict[str, list[dict]]:
    """Per dataset, one row per model: its best layer by k-means mIoU and its last-layer artifacts."""
    boards = {}
    for name, ctx in contexts.items():
        rows = {}
        for r in ctx["positional_rows"]:
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
        for model, att in ctx["attention"].items():
            if model in rows:
                rows[model]["attention"] = att.get("best")
        boards[name] = sorted(rows.values(), key=lambda r: -(r["best_miou"] or 0))
    return boards


def _headline_figures(docs: Path, contexts: dict[str, dict]) -> list[dict]:
    """Small comparison charts for the home page: the locality chart of each dataset."""
    return [{"title": f"Locality on {name}", "path": ctx["charts"]["locality"]}
            for name, ctx in contexts.items() if "locality" in ctx["charts"]]


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
    fmt = {"pct": _fmt_pct, "num": _fmt_num}
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


def source_reference_notes(ctx: dict) -> dict[str, list[dict]]:
    """The references under a dataset's tables: the positional/artifact columns and the k-means
    scores (at the gallery's k, with the shuffled-cluster chance of every row)."""
    rows = ctx["positional_rows"]
    return {"positional": metric_references(rows, POSITIONAL_METRICS, chance={"miou": "chance"}, per_layer=True),
            "scores": metric_references(rows, (("miou", f"mIoU (k = {ctx['gallery']['k']})", "pct"),
                                               ("stability", "Stability", "num")),
                                        chance={"miou": "chance"}, per_layer=True)}


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


def _published_source(src: dict) -> dict:
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


def _downloads(out: Path, manifest: Manifest) -> list[dict]:
    """Every published config of every dataset repository, with size and schema."""
    datasets_ = []
    for _, src in sorted(manifest.entries(prefix="sources/")):
        configs = [{"name": IMAGES_CONFIG, "rows": src["num_images"], "bytes": None, "schema": "images"}]
        for key, unit in sorted(manifest.entries(prefix=f"extract/{src['name']}/")):
            if unit.get("status") != "done" or "configs" not in unit:
                continue
            for cfg in unit["configs"]:
                configs.append({"name": cfg["name"], "rows": cfg["num_rows"], "bytes": cfg["num_bytes"],
                                "schema": f"patches, embedding {cfg['dtype']}[{cfg['dim']}]"})
            for path_key, suffix, schema in (("prefix_paths", "-prefix", "prefix tokens"),
                                             ("attention_paths", "-attention", "CLS attention")):
                if unit.get(path_key):
                    size = sum((out / "datasets" / src["name"] / rel).stat().st_size for rel in unit[path_key])
                    configs.append({"name": f"{unit['model']}{suffix}", "rows": None, "bytes": size, "schema": schema})
        repo_id = recorded_hub_repo(manifest, src["name"])
        for c in configs:
            c["url"] = hub_viewer_url(repo_id, c["name"])
        datasets_.append({"name": src["name"], "license": src["license"], "configs": configs,
                          "repo_id": repo_id, "published": not is_placeholder(repo_id),
                          "url": hub_viewer_url(repo_id)})
    return datasets_


def _write_page(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _swap_in(staged: Path, final: Path) -> None:
    """Replace ``final`` by ``staged``; the old tree is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    if old.exists():
        shutil.rmtree(old)


def run_render(out: Path, options: RenderOptions) -> Path:
    """The stage: ``<out>/docs`` (Markdown + figures) and, unless disabled, ``<out>/site`` (HTML)."""
    out = Path(out)
    # A killed render's staging folder is removed by the next lock holder (store/lock.py).
    staging = Path(tempfile.mkdtemp(prefix=RENDER_STAGING_PREFIX, dir=out))
    try:
        docs = staging / "docs"
        shutil.copytree(site_skeleton_dir(), docs, ignore=shutil.ignore_patterns("generated", ".gitignore"))
        render_docs(out, docs, options)
        if options.build_html:
            build_site(docs, staging / "site")
        _swap_in(docs, out / "docs")
        if options.build_html:
            _swap_in(staging / "site", out / "site")
    except OSError as err:
        # The swaps are renames, which a full disk does not stop: the write that failed came
        # before them, so the previous docs/ and site/ are intact.
        if is_disk_full(err):
            raise disk_full_error(out / ("site" if options.build_html else "docs"), err) from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "site" if options.build_html else out / "docs"


def build_site(docs: Path, site: Path) -> None:
    """``mkdocs build`` of the project's mkdocs.yml over a given docs folder."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    # Strict: a broken link or a missing image fails the render instead of shipping.
    config = load_config(config_file=str(mkdocs_config()), docs_dir=str(docs), site_dir=str(site), strict=True)
    build(config)
