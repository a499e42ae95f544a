"""The render stage: results folder → figures and Markdown pages → ``mkdocs build``.

The site is a pure function of ``<out>`` (manifest, dataset repos, results): pages are rendered
from ``templates/`` into ``<out>/docs`` on top of the hand-written skeleton in ``site/``, and
MkDocs builds ``<out>/site``. Both folders are rebuilt whole and swapped in, so a failed render
never leaves half a site behind.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import markupsafe
import numpy as np
from PIL import Image

from generator.assets import mkdocs_config, site_skeleton_dir, templates_dir
from generator.errors import PatchAtlasError
from generator.figures.maps import label_map_png, save_png, thumbnail
from generator.figures.palette import PALETTE
from generator.models.registry import MODELS, get_model_entry
from generator.store.manifest import Manifest
from generator.store.parquet import read_images_table
from generator.store.repo import IMAGES_CONFIG, shard_name

# Characters that would start Markdown or HTML syntax when they come from data (names, labels).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_escape(value) -> markupsafe.Markup:
    """Escape result-derived text for a Markdown page: HTML first, then Markdown syntax."""
    html_safe = str(markupsafe.escape(str(value)))
    return markupsafe.Markup(_MD_SPECIAL.sub(r"\\\1", html_safe))


def template_env() -> jinja2.Environment:
    # Autoescape is on so any value that skips the `md` filter is still HTML-escaped.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters["md"] = md_escape
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f}"
    return env


@dataclass
class RenderOptions:
    gallery_images: int = 8
    gallery_k: int = 8
    gallery_norm: str = "postnorm"
    thumb_side: int = 160
    build_html: bool = True


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
        rows[name] = ModelRow(name, entry.family, entry.description, entry.patch_size, entry.input_size,
                              entry.license, entry.timm_id if entry.pretrained else "untrained",
                              status, unit.get("reason", ""), unit.get("weights", {}))
    return list(rows.values())


def _load_metrics(out: Path, source: str) -> list[dict]:
    metrics = []
    for path in sorted((out / "results" / source).glob("*/*/kmeans.json")):
        metrics.append(json.loads(path.read_text()))
    return metrics


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _gallery(out: Path, docs: Path, source: str, metrics: list[dict], options: RenderOptions,
             num_classes: int, ignore_index: int) -> dict:
    """Write the gallery figures of one source; returns the page context."""
    repo = out / "datasets" / source
    images = read_images_table(repo / IMAGES_CONFIG / shard_name())[: options.gallery_images]
    asset_rel = Path("assets") / source
    rows = []
    for img in images:
        rgb = thumbnail(_decode_png(img["image_png"]).reshape(img["height"], img["width"], -1)[..., :3],
                        options.thumb_side)
        side_hw = rgb.shape[:2]
        image_rel = asset_rel / "images" / f"{img['image_id']}.png"
        mask_rel = asset_rel / "masks" / f"{img['image_id']}.png"
        save_png(rgb, docs / image_rel)
        label_map_png(_decode_png(img["mask_png"]), docs / mask_rel, size_hw=side_hw, ignore_index=ignore_index)
        rows.append({"image_id": img["image_id"], "image": image_rel.as_posix(), "mask": mask_rel.as_posix(),
                     "size": side_hw, "maps": {}})
    by_id = {r["image_id"]: r for r in rows}
    layers: dict[int, list[str]] = {}
    for m in metrics:
        if m["norm"] != options.gallery_norm:
            continue
        ks = [r["k"] for r in m["kmeans"]]
        if not ks:
            continue
        k = min(ks, key=lambda v: (abs(v - options.gallery_k), v))
        maps_file = out / "results" / source / m["model"] / m["config"] / f"kmeans-k{k}.npz"
        with np.load(maps_file) as npz:
            display = npz["display_maps"]
            ids = [str(v) for v in npz["image_ids"]]
        for image_id, dmap in zip(ids, display):
            if image_id not in by_id:
                continue
            rel = asset_rel / "clusters" / m["model"] / m["config"] / f"k{k}" / f"{image_id}.png"
            label_map_png(dmap, docs / rel, size_hw=by_id[image_id]["size"], ignore_index=ignore_index)
            by_id[image_id]["maps"][(m["layer"], m["model"])] = rel.as_posix()
        layers.setdefault(m["layer"], [])
        if m["model"] not in layers[m["layer"]]:
            layers[m["layer"]].append(m["model"])
    return {"rows": rows, "layers": {layer: sorted(models) for layer, models in sorted(layers.items())},
            "k": options.gallery_k, "norm": options.gallery_norm}


def _legend(docs: Path, source: str, classes: list[dict]) -> list[dict]:
    legend = []
    for c in classes:
        swatch = np.full((12, 12, 3), PALETTE[c["id"] % len(PALETTE)], dtype=np.uint8)
        rel = Path("assets") / source / "legend" / f"class-{c['id']}.png"
        save_png(swatch, docs / rel)
        legend.append({**c, "swatch": rel.as_posix()})
    return legend


def render_docs(out: Path, docs: Path, options: RenderOptions) -> list[Path]:
    """Write every generated page and figure under ``docs``; returns the pages written."""
    manifest = Manifest.load(out / "manifest.json")
    sources = [entry for key, entry in sorted(manifest.entries(prefix="sources/"))]
    if not sources:
        raise PatchAtlasError(f"{out}: nothing has been extracted yet; run `patchatlas extract --out {out}` first")
    env = template_env()
    pages = []
    dataset_pages = []
    for src in sources:
        metrics = _load_metrics(out, src["name"])
        gallery = _gallery(out, docs, src["name"], metrics, options, len(src["classes"]), src["ignore_index"])
        page_rel = Path("datasets") / f"{src['name']}.md"
        context = {
            "source": src, "gallery": gallery, "legend": _legend(docs, src["name"], src["classes"]),
            "models": _model_rows(manifest, src["name"]),
            "metrics": sorted(metrics, key=lambda m: (m["model"], m["layer"], m["norm"])),
            "dataset_dir": f"datasets/{src['name']}", "page_depth": "../",
        }
        _write_page(docs / page_rel, env.get_template("dataset.md.j2").render(**context))
        pages.append(docs / page_rel)
        dataset_pages.append({"name": src["name"], "page": page_rel.as_posix(), "num_images": src["num_images"],
                              "num_classes": len(src["classes"]), "license": src["license"],
                              "description": src["description"]})
    home = env.get_template("index.md.j2").render(
        models=_model_rows(manifest), datasets=dataset_pages, out=str(out),
    )
    _write_page(docs / "index.md", home)
    pages.append(docs / "index.md")
    return pages


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
    staging = Path(tempfile.mkdtemp(prefix=".render-", dir=out))
    try:
        docs = staging / "docs"
        shutil.copytree(site_skeleton_dir(), docs, ignore=shutil.ignore_patterns("generated", ".gitignore"))
        render_docs(out, docs, options)
        if options.build_html:
            build_site(docs, staging / "site")
        _swap_in(docs, out / "docs")
        if options.build_html:
            _swap_in(staging / "site", out / "site")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "site" if options.build_html else out / "docs"


def build_site(docs: Path, site: Path) -> None:
    """``mkdocs build`` of the project's mkdocs.yml over a given docs folder."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(config_file=str(mkdocs_config()), docs_dir=str(docs), site_dir=str(site))
    build(config)
