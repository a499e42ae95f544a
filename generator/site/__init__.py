"""The render stage: results folder → figures and Markdown pages → ``mkdocs build``.

The site is a pure function of ``<out>`` (manifest, dataset repos, results): pages are rendered
from ``templates/`` into ``<out>/docs`` on top of the hand-written skeleton in ``site/``, and
MkDocs builds ``<out>/site``. Both folders are rebuilt whole and swapped in, so a failed render
never leaves half a site behind.

``options`` says what a render draws, ``figures`` writes the PNGs, ``contexts`` turns the
summary into what each template shows, and ``build`` renders, swaps in and runs MkDocs.
"""

from generator.site.build import build_site, render_docs, run_render, template_env
from generator.site.contexts import (
    DEGRADATION_LABELS,
    METRIC_LABELS,
    MIOU_SCALE,
    ModelRow,
    downloads_context,
    gallery_strip,
    headline_figures,
    model_rows,
    probe_context,
    published_source,
    source_context,
    with_interval,
)
from generator.site.figures import Grid, NpzCache, PngWriter, SourceFigures, class_legend, load_maps
from generator.site.options import RenderOptions

# Page text from data is escaped as the dataset card escapes it (generator/templating.py).
from generator.templating import md as md_escape

__all__ = [
    "DEGRADATION_LABELS", "METRIC_LABELS", "MIOU_SCALE", "Grid", "ModelRow", "NpzCache", "PngWriter", "RenderOptions",
    "SourceFigures", "build_site", "class_legend", "downloads_context", "gallery_strip", "headline_figures",
    "load_maps", "md_escape", "model_rows", "probe_context", "published_source", "render_docs", "run_render",
    "source_context", "template_env", "with_interval",
]
