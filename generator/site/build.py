"""Rendering the pages into ``<out>/docs``, swapping them in whole, and ``mkdocs build``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jinja2
from tqdm.auto import tqdm

from generator.assets import mkdocs_config, site_skeleton_dir, templates_dir
from generator.errors import PatchAtlasError
from generator.explorer import write_explorer_assets
from generator.site.contexts import (
    downloads_context,
    gallery_strip,
    headline_figures,
    model_rows,
    probe_context,
    source_context,
    with_interval,
)
from generator.site.figures import PngWriter, class_legend
from generator.site.options import RenderOptions
from generator.store.atomic import disk_full_error, is_disk_full
from generator.store.layout import (
    RENDER_STAGING_PREFIX,
    docs_dir,
    explorer_summary_dir,
    manifest_path,
    site_dir,
)
from generator.store.manifest import Manifest
from generator.store.records import recorded_hub_repo, source_records
from generator.summarize import (
    fmt_pct,
    is_reference,
    load_site_summary,
    model_order,
    recorded_models,
    reference_tag,
)
from generator.templating import environment


def template_env() -> jinja2.Environment:
    # Autoescape is on so any value that skips the `md` filter is still HTML-escaped.
    env = environment(templates_dir(), autoescape=True)
    env.filters["pct"] = fmt_pct
    env.filters["with_interval"] = with_interval
    env.filters["reference_tag"] = reference_tag
    env.tests["reference"] = is_reference
    env.filters["reference_models"] = lambda families: [m for m, f in families.items() if is_reference(f)]
    env.filters["mib"] = lambda v: "—" if v is None else f"{v / 2**20:.2f} MiB"
    return env


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
            context = source_context(out, docs, src, summary["by_source"][src["name"]], manifest, options, writer)
            context.update(legend=class_legend(docs, src["name"], src["classes"], writer),
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
            probe_contexts[src["name"]] = probe_context(docs, src["name"], probes)
    _write_page(docs / "probe-metrics.md", env.get_template("probes.md.j2").render(
        contexts=probe_contexts, overlaps=summary["overlaps"], page_depth=""))
    pages.append(docs / "probe-metrics.md")
    _write_page(docs / "downloads.md", env.get_template("downloads.md.j2").render(
        datasets=downloads_context(out, manifest), page_depth=""))
    pages.append(docs / "downloads.md")
    models = model_rows(manifest)
    facts = recorded_models(manifest)  # every extract record read once, not once per model page
    for model in models:
        if model.status != "done":
            continue
        entry = facts[model.name]
        per_source = {name: ctx for name, ctx in contexts.items() if model.name in ctx["families"]}
        page = env.get_template("model.md.j2").render(model=model, entry=entry, contexts=per_source, page_depth="../")
        _write_page(docs / "models" / f"{model.name}.md", page)
        pages.append(docs / "models" / f"{model.name}.md")
    home = env.get_template("index.md.j2").render(
        models=models, datasets=dataset_pages, out=str(out), headline=headline_figures(docs, contexts),
        leaderboards=summary["leaderboards"], strip=gallery_strip(contexts))
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
