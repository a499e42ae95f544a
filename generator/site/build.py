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
import markupsafe
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from generator.assets import mkdocs_config, site_skeleton_dir, templates_dir
from generator.errors import PatchAtlasError
from generator.explorer import write_explorer_assets
from generator.figures.maps import thumbnail, to_png_bytes, upsample_nearest
from generator.figures.palette import PALETTE, colorize
from generator.figures.plots import heatmap_rgb, histogram_png, line_chart_png, stacked_bars_png
from generator.store.atomic import disk_full_error, is_disk_full
from generator.store.layout import (
    ATTENTION_ARRAYS_FILE,
    IMAGES_CONFIG,
    MAPS_ARRAYS_FILE,
    RENDER_STAGING_PREFIX,
    SOURCES_PREFIX,
    dataset_repo_dir,
    docs_dir,
    explorer_summary_dir,
    extract_prefix,
    kmeans_maps_path,
    manifest_path,
    position_modes_name,
    results_dir,
    site_dir,
    summary_file,
)
from generator.store.manifest import Manifest
from generator.store.parquet import read_first_images
from generator.store.records import extract_records, recorded_hub_repo, source_records
from generator.store.repo import hub_viewer_url, is_placeholder
from generator.summarize import (
    RETRIEVAL_OUTCOMES,
    SummarizeOptions,
    fmt_num,
    fmt_pct,
    is_reference,
    load_site_summary,
    model_order,
    recorded_models,
    reference_tag,
)

# Characters that would start Markdown or HTML syntax when they come from data (names, labels).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_escape(value) -> markupsafe.Markup:
    """Escape result-derived text for a Markdown page: HTML first, then Markdown syntax."""
    html_safe = str(markupsafe.escape(str(value)))
    return markupsafe.Markup(_MD_SPECIAL.sub(r"\\\1", html_safe))


def with_interval(row: dict, key: str, as_percent: bool = True) -> str:
    """``row[key]`` with its interval ``row[key + "_ci"]`` (``[lo, hi]``) when the result has one:
    "53.0 (49.0–57.0)"."""
    fmt = fmt_pct if as_percent else fmt_num
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
    env.filters["pct"] = fmt_pct
    env.filters["with_interval"] = with_interval
    env.filters["reference_tag"] = reference_tag
    env.tests["reference"] = is_reference
    env.filters["reference_models"] = lambda families: [m for m, f in families.items() if is_reference(f)]
    env.filters["mib"] = lambda v: "—" if v is None else f"{v / 2**20:.2f} MiB"
    return env


@dataclass
class RenderOptions(SummarizeOptions):
    """The summary's options (which images, k and view the galleries show) and how pages are drawn."""

    thumb_side: int = 224  # stored size; pages show them smaller and open them full size on click
    build_html: bool = True
    progress: bool = True

    def validate(self) -> RenderOptions:
        """Raise a PatchAtlasError naming the first option with a bad value; changes nothing."""
        super().validate()
        if isinstance(self.thumb_side, bool) or not isinstance(self.thumb_side, int) or self.thumb_side < 16:
            raise PatchAtlasError(f"thumb_side {self.thumb_side!r}: expected a whole number of pixels, at least 16")
        return self


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


def _model_rows(manifest: Manifest, source: str | None = None) -> list[ModelRow]:
    rows: dict[str, ModelRow] = {}
    for name, unit in extract_records(manifest, source):
        facts = unit.model_facts
        if facts is None or (name in rows and rows[name].status == "done"):
            continue
        rows[name] = ModelRow(name, facts.family, facts.description, facts.patch_size, unit.input_size,
                              facts.license, facts.weights_label, unit.status, unit.reason, unit.weights or {},
                              unit.resize)
    return list(rows.values())


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


class SourceFigures:
    """Writes the figures of one source under ``docs/assets/<source>`` and returns their paths.

    Paths are relative to the docs root; templates prefix them for the page's depth.
    """

    def __init__(self, out: Path, docs: Path, source: dict, options: RenderOptions, writer: PngWriter):
        self.out, self.docs, self.source, self.options, self.writer = out, docs, source, options, writer
        self.name = source["name"]
        self.assets = Path("assets") / self.name
        self.ignore_index = source["ignore_index"]
        repo = dataset_repo_dir(out, self.name)
        self.images = read_first_images(repo / IMAGES_CONFIG, options.gallery_images)
        self.ids = [img["image_id"] for img in self.images]
        self.base_rows = []
        self.sizes = {}
        for img in self.images:
            rgb = _decode_png(img["image_png"])
            rgb = thumbnail(rgb.reshape(img["height"], img["width"], -1)[..., :3], options.thumb_side)
            self.sizes[img["image_id"]] = rgb.shape[:2]
            image_rel = self._save_rgb(rgb, "images", img["image_id"])
            # The stored original opens on click; galleries show the thumbnail.
            full_rel = (self.assets / "full" / f"{img['image_id']}.png").as_posix()
            self.writer.submit_bytes(img["image_png"], self.docs / full_rel)
            mask = upsample_nearest(colorize(_decode_png(img["mask_png"]), self.ignore_index), rgb.shape[:2])
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

    def cluster_maps(self, model: str, config: str, k: int, display: np.ndarray, ids: list[str]) -> dict[str, str]:
        return self._per_image(ids, display, lambda m: colorize(m, self.ignore_index), model, config, f"clusters-k{k}")

    def pca_maps(self, model: str, config: str, maps: dict) -> dict[str, str]:
        return self._per_image(maps["ids"], maps["pca_rgb"], lambda a: a, model, config, "pca")

    def norm_maps(self, model: str, config: str, maps: dict) -> dict[str, str]:
        norms = maps["norm_maps"]
        top = float(norms.max()) if norms.size else 1.0  # one scale per config: images compare
        return self._per_image(maps["ids"], norms, lambda a: heatmap_rgb(a, 0.0, top, "magma"), model, config, "norms")

    def position_mode_map(self, model: str, config: str, k: int, mode: np.ndarray) -> str:
        """The most frequent cluster at each position over all images (positional bias made visible)."""
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


class NpzCache:
    """The arrays a render reads from ``.npz`` files: each file is opened (and its members
    decompressed) once, on first use, however many figures draw from it. One cache per source
    keeps only that source's arrays in memory; no file belongs to two sources."""

    def __init__(self):
        self._arrays: dict[Path, dict[str, np.ndarray]] = {}

    def arrays(self, path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """``keys`` of ``path`` (all of them when None); later calls must ask for no more."""
        path = Path(path)
        if path not in self._arrays:
            with np.load(path) as npz:
                self._arrays[path] = {key: npz[key] for key in (keys or npz.files)}
        return self._arrays[path]


def _column_label(model: str, family: str) -> str:
    """A gallery column's heading: a reference model says it is one."""
    return f"{model} ({reference_tag(family)})" if is_reference(family) else model


def _load_maps(npz: NpzCache, out: Path, source: str, model: str, config: str) -> dict:
    maps = dict(npz.arrays(results_dir(out, source, model, config) / MAPS_ARRAYS_FILE))
    maps["ids"] = [str(v) for v in maps.pop("image_ids")]
    return maps


def _source_context(out: Path, docs: Path, src: dict, summary: dict, manifest: Manifest, options: RenderOptions,
                    writer: PngWriter) -> dict:
    """Figures and tables of one source from its summary: galleries, positional and artifact
    maps, attention, charts."""
    name = src["name"]
    figures = SourceFigures(out, docs, src, options, writer)
    npz = NpzCache()
    families, models, layers = summary["families"], summary["models"], summary["layers"]

    def maps_of(model: str, config: str) -> dict:
        return _load_maps(npz, out, name, model, config)

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
        "source": _published_source(src), "models": _model_rows(manifest, name), "families": families,
        "images": figures.base_rows,
        "ranked": summary["ranked"],
        "gallery": {"k": options.gallery_k, "norm": gallery_norm, "by_layer": by_layer, "by_model": by_model,
                    "pca": pca, "norms": norms, "attention": attention_grids},
        "metrics": summary["metrics"], "attention": attention, "positional_rows": summary["positional_rows"],
        "charts": charts, "notes": summary["notes"],
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
    manifest = Manifest.load(manifest_path(out))
    # The pages take a source's entry as recorded (dict form); reading it as a record checks it first.
    sources = [record.to_entry() for record in source_records(manifest)]
    if not sources:
        raise PatchAtlasError(f"{out}: nothing has been extracted yet; run `patchatlas extract --out {out}` first")
    summary = load_site_summary(out, options, [src["name"] for src in sources])
    env = template_env()
    pages, dataset_pages, contexts = [], [], {}
    writer = PngWriter()
    try:
        for src in tqdm(sources, disable=not options.progress, desc="figures", unit="dataset"):
            context = _source_context(out, docs, src, summary["by_source"][src["name"]], manifest, options, writer)
            context.update(legend=_legend(docs, src["name"], src["classes"], writer),
                           dataset_dir=recorded_hub_repo(manifest, src["name"]), page_depth="../")
            contexts[src["name"]] = context
    finally:
        writer.close()
    for src in sources:
        context = contexts[src["name"]]
        context["explorer"] = write_explorer_assets(
            docs, src["name"], summary["by_source"][src["name"]].get("explorer"), explorer_summary_dir(out, src["name"]),
            context["images"], options.gallery_norm, context["dataset_dir"], model_order(context["families"]))
        if context["explorer"]:
            _write_page(docs / "explorer" / f"{src['name']}.md", env.get_template("explorer.md.j2").render(**context))
            pages.append(docs / "explorer" / f"{src['name']}.md")
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
        probes = summary["by_source"][src["name"]]["probes"]
        if probes:
            probe_contexts[src["name"]] = _probe_context(docs, src["name"], probes)
    _write_page(docs / "probe-metrics.md", env.get_template("probes.md.j2").render(
        contexts=probe_contexts, overlaps=summary["overlaps"], page_depth=""))
    pages.append(docs / "probe-metrics.md")
    _write_page(docs / "downloads.md", env.get_template("downloads.md.j2").render(
        datasets=_downloads(out, manifest), page_depth=""))
    pages.append(docs / "downloads.md")
    models = _model_rows(manifest)
    for model in models:
        if model.status != "done":
            continue
        entry = recorded_models(manifest)[model.name]
        per_source = {name: ctx for name, ctx in contexts.items() if model.name in ctx["families"]}
        page = env.get_template("model.md.j2").render(model=model, entry=entry, contexts=per_source, page_depth="../")
        _write_page(docs / "models" / f"{model.name}.md", page)
        pages.append(docs / "models" / f"{model.name}.md")
    home = env.get_template("index.md.j2").render(
        models=models, datasets=dataset_pages, out=str(out), headline=_headline_figures(docs, contexts),
        leaderboards=summary["leaderboards"], strip=gallery_strip(contexts))
    _write_page(docs / "index.md", home)
    pages.append(docs / "index.md")
    return pages


# Chart axes name the metric in words; mIoU charts keep its whole 0–1 scale.
METRIC_LABELS = {"knn_miou": "k-NN mIoU", "linear_miou": "Linear-probe mIoU"}
MIOU_SCALE = (0.0, 1.0)
DEGRADATION_LABELS = {"blur": "Box blur kernel (px)", "noise": "Gaussian noise std (0–255 scale)",
                      "frequency_band": "Noise frequency band (0 = lowest)"}


def _probe_context(docs: Path, name: str, probes: dict) -> dict:
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


def _headline_figures(docs: Path, contexts: dict[str, dict]) -> list[dict]:
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
    options.validate()
    # A killed render's staging folder is removed by the next lock holder (store/lock.py).
    staging = Path(tempfile.mkdtemp(prefix=RENDER_STAGING_PREFIX, dir=out))
    try:
        docs = docs_dir(staging)
        shutil.copytree(site_skeleton_dir(), docs, ignore=shutil.ignore_patterns("generated", ".gitignore"))
        render_docs(out, docs, options)
        if options.build_html:
            build_site(docs, site_dir(staging))
        _swap_in(docs, docs_dir(out))
        if options.build_html:
            _swap_in(site_dir(staging), site_dir(out))
    except OSError as err:
        # The swaps are renames, which a full disk does not stop: the write that failed came
        # before them, so the previous docs/ and site/ are intact.
        if is_disk_full(err):
            raise disk_full_error(site_dir(out) if options.build_html else docs_dir(out), err) from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return site_dir(out) if options.build_html else docs_dir(out)


def build_site(docs: Path, site: Path) -> None:
    """``mkdocs build`` of the project's mkdocs.yml over a given docs folder."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    # Strict: a broken link or a missing image fails the render instead of shipping.
    config = load_config(config_file=str(mkdocs_config()), docs_dir=str(docs), site_dir=str(site), strict=True)
    build(config)
