"""Every number with its scale: reference rows apart, leaderboards of pretrained models on
datasets with regions to segment, references under each table, a picture first.

One small site is built (a "pretrained" tiny model from a local checkpoint, the untrained tiny
model and a tiny stand-in of a calibration control) and read back as HTML.
"""

from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from generator.cli import main
from generator.models.registry import MODELS
from generator.site import contexts as site_contexts
from generator.site import gallery_strip, with_interval
from generator.sources.content_free import content_free_source
from generator.sources.synthetic import synthetic_scenes
from generator.summarize import labelled_class_count, leaderboard_tables, metric_references, ranks_by_segmentation

from conftest import TINY_RANDOM, TINY_REGISTERS, offline_tiny_zoo, save_untrained_weights

# A stand-in for the calibration controls: the same untrained network, registered as a control.
TINY_CONTROL = dataclasses.replace(TINY_RANDOM, name="tiny_control", family="control",
                                   description="stand-in calibration control for tests")
REAL, REFERENCES = "tiny_reg", ("tiny_random", "tiny_control")


# --- reading built pages -------------------------------------------------------------------------

class _Page(HTMLParser):
    """The article of a built page: its top-level elements, and every table row as cells + classes."""

    VOID = {"img", "br", "hr", "input", "meta", "link", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.depth = None  # depth inside the article, None outside it
        self.top: list[tuple[str, dict]] = []
        self.tables: list[list[dict]] = []
        self._row = None
        self._cell = None
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if tag == "article" and self.depth is None:
            self.depth = 0
            return
        if self.depth is None:
            return
        if self.depth == 0 and tag not in ("a",) and not (tag == "div" and "md-source-file" in attrs.get("class", "")):
            self.top.append((tag, attrs))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = {"cells": [], "spans": set()}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "span" and self._row is not None:
            self._row["spans"].update(attrs.get("class", "").split())
        if tag not in self.VOID:
            self._stack.append(tag)
            self.depth += 1

    def handle_endtag(self, tag):
        if self.depth is None or tag in self.VOID:
            return
        if tag == "article" and self.depth == 0:
            self.depth = None
            return
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row["cells"].append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        if self._stack:
            self._stack.pop()
            self.depth -= 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def read_page(site: Path, page: str) -> tuple[_Page, str]:
    html = (site / page / "index.html").read_text()
    parser = _Page()
    parser.feed(html)
    return parser, html


def model_rows(table: list[dict], names) -> list[tuple[int, dict]]:
    """Rows (with index) whose first cell names one of ``names``."""
    return [(i, r) for i, r in enumerate(table) if r["cells"] and r["cells"][0].split(" ")[0] in names]


def divider_index(table: list[dict]) -> int | None:
    return next((i for i, r in enumerate(table) if "reference-divider" in r["spans"]), None)


# --- the build ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = offline_tiny_zoo(tmp_path_factory)
    # Its own build, not conftest's shared tiny_builds: reference rows and a recorder around the site's charts.
    mp.setitem(MODELS, TINY_CONTROL.name, TINY_CONTROL)
    charts = []
    real_line_chart = site_contexts.line_chart_png

    def recording_line_chart(series, path, **kwargs):
        charts.append({"series": series, **kwargs})
        return real_line_chart(series, path, **kwargs)

    mp.setattr(site_contexts, "line_chart_png", recording_line_chart)
    root = tmp_path_factory.mktemp("reference-build")
    ckpt = root / "tiny_reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, ckpt, seed=3)
    out = root / "out"
    code = main(["build", "--out", str(out), "--models", ",".join((REAL, *REFERENCES)), "--layers", "last",
                 "--source-option", "n_images=4", "--source-option", "size=64", "--weights", f"{REAL}={ckpt}",
                 "--k", "2,4", "--gallery-k", "4", "--linear-max-steps", "50", "--batch-size", "4",
                 "--device", "cpu", "--quiet"])
    mp.undo()
    assert code == 0
    return {"out": out, "site": out / "site", "charts": charts}


def test_leaderboard_ranks_pretrained_models_and_keeps_references_apart(built):
    page, html = read_page(built["site"], "")
    # Tabs: the first leaderboard table is synthetic-scenes (content-free is not ranked).
    board = page.tables[0]
    divider = divider_index(board)
    assert divider is not None, "no reference divider in the leaderboard"
    ranked = model_rows(board[:divider], (REAL, *REFERENCES))
    assert [r["cells"][0] for _, r in ranked] == [REAL]
    below = model_rows(board[divider:], REFERENCES)
    assert sorted(r["cells"][0].split(" ")[0] for _, r in below) == sorted(REFERENCES)
    assert all("reference-row" in r["spans"] for _, r in below)
    assert "Not ranked: every image of this dataset is a single ground-truth class" in html


def test_every_table_puts_reference_rows_after_the_models(built):
    pages = ["", "datasets/synthetic-scenes/", "datasets/content-free/", "positional-artifacts/", "probe-metrics/"]
    checked = 0
    for page_name in pages:
        page, html = read_page(built["site"], page_name)
        # A table broken by a stray blank line leaks its rows as text.
        assert not re.search(r"<p>\s*\|", html), f"{page_name}: table rows rendered as a paragraph"
        for table in page.tables:
            refs = model_rows(table, REFERENCES)
            reals = model_rows(table, (REAL,))
            if not refs:
                continue
            divider = divider_index(table)
            assert divider is not None, f"{page_name}: reference rows without a divider: {table[0]['cells']}"
            assert all(i > divider and "reference-row" in r["spans"] for i, r in refs), page_name
            assert all(i < divider and "reference-row" not in r["spans"] for i, r in reals), page_name
            checked += 1
    assert checked >= 6  # leaderboard, models, scores ×2, artifacts ×2, probes ×2
    # The scores table holds one row per model, layer, view and k: none lost, none merged.
    page, _ = read_page(built["site"], "datasets/synthetic-scenes/")
    scores = next(t for t in page.tables if t[0]["cells"][:5] == ["Model", "Family", "Layer", "Tokens", "k"])
    records = [json.loads(p.read_text()) for p in (built["out"] / "results" / "synthetic-scenes").glob("*/*/kmeans.json")]
    assert len(model_rows(scores, (REAL, *REFERENCES))) == sum(len(r["kmeans"]) for r in records)


def test_reference_notes_carry_chance_and_the_controls_values(built):
    out = built["out"]
    page, html = read_page(built["site"], "positional-artifacts/")
    maps = json.loads(next((out / "results" / "synthetic-scenes" / "tiny_control").glob("*postnorm/maps.json")).read_text())
    section = html[html.index('id="synthetic-scenes"'):]
    notes = re.findall(r'<p class="reference-note">(.*?)</p>', section, flags=re.S)
    assert notes, "no reference line under the artifacts tables"
    text = re.sub(r"<[^>]+>", "", notes[0])
    assert f"tiny_control (control) {maps['border_score']:.2f}" in text
    assert "0 = no position information" in text
    # Chance: the shuffled-cluster mIoU of every row of the table (all models, both views, k = 4).
    chances = [r["chance_miou"] for p in (out / "results" / "synthetic-scenes").glob("*/*/kmeans.json")
               for r in json.loads(p.read_text())["kmeans"] if r["k"] == 4]
    _, dataset_html = read_page(built["site"], "datasets/synthetic-scenes/")
    score_note = re.sub(r"<[^>]+>", "", re.findall(r'<p class="reference-note">(.*?)</p>', dataset_html, flags=re.S)[0])
    assert f"chance {100 * min(chances):.1f}–{100 * max(chances):.1f}" in score_note


def test_home_page_opens_with_the_gallery_strip(built):
    page, html = read_page(built["site"], "")
    tags = [t for t, _ in page.top]
    first_after_title = page.top[tags.index("h1") + 1]
    assert first_after_title[0] == "div" and "gallery-strip" in first_after_title[1].get("class", "")
    assert tags.index("table") > tags.index("h1") + 1
    strip = html[html.index('class="gallery-strip"'):]
    strip = strip[:strip.index("</div>")]
    heads = re.findall(r'<span class="strip-head[^"]*">(.*?)</span>', strip)
    assert heads[:3] == ["Image", "Ground truth", REAL]
    assert sorted(heads[3:]) == ["tiny_control · control", "tiny_random · baseline"]
    assert len(re.findall(r"<img ", strip)) == 3 * (2 + 3)  # 3 images × (image, mask, 3 models)


def test_line_charts_keep_the_metric_scale_and_name_axes_in_words(built):
    charts = built["charts"]
    assert len(charts) >= 4
    for chart in charts:
        for label in (chart["xlabel"], chart["ylabel"]):
            assert "_" not in label and (label[0].isupper() or label.startswith("k-NN")), label
        if "mIoU" in chart["ylabel"]:
            assert chart.get("ylim") == (0.0, 1.0), chart["title"]
        for s in chart["series"]:
            assert s["reference"] == (s["label"].split(" ")[0] in REFERENCES), s["label"]


def test_reference_model_page_says_it_is_not_a_result(built):
    _, html = read_page(built["site"], "models/tiny_control/")
    assert "A reference model, not a result" in html
    _, real = read_page(built["site"], f"models/{REAL}/")
    assert "A reference model, not a result" not in real
    # A model's own table carries the references' values too.
    assert re.search(r'<p class="reference-note">.*tiny_control \(control\)', real, flags=re.S)


# --- the pure helpers --------------------------------------------------------------------------

def _board_row(model, family, miou, chance=0.2, border=0.1):
    return {"model": model, "family": family, "best_miou": miou, "best_layer": 2, "border": border,
            "outliers": 0.0, "chance": chance, "last_layer": 2}


def test_leaderboard_never_ranks_an_untrained_or_control_model():
    # The untrained network tops the raw scores (as it did at 94.6 on constant colours).
    rows = [_board_row("random", "random", 0.946), _board_row("control-content", "control", 0.82),
            _board_row("dino", "CL", 0.53), _board_row("mae", "MIM", 0.31)]
    table = leaderboard_tables({"scenes": rows}, {"scenes": True})["scenes"]
    assert [r["model"] for r in table["models"]] == ["dino", "mae"]
    assert {r["model"] for r in table["reference"]} == {"random", "control-content"}
    only_refs = leaderboard_tables({"scenes": rows[:2]}, {"scenes": True})["scenes"]
    assert only_refs["models"] == [] and len(only_refs["reference"]) == 2
    assert leaderboard_tables({"cf": rows}, {"cf": False})["cf"]["ranked"] is False


def test_content_free_masks_do_not_rank_and_scene_masks_do():
    cf = content_free_source(size=32, noise_images=1)
    counts = [labelled_class_count(np.asarray(row["mask"]), 255) for row in cf.dataset]
    assert counts == [1] * len(cf.dataset) and not ranks_by_segmentation(counts)
    scenes = synthetic_scenes(n_images=3, size=64, seed=0)
    counts = [labelled_class_count(np.asarray(row["mask"]), scenes.ignore_index) for row in scenes.dataset]
    assert ranks_by_segmentation(counts)
    # Ignored pixels are no class: one class plus "ignore" is still one region.
    assert labelled_class_count(np.array([[3, 255], [3, 3]]), 255) == 1


def test_metric_references_report_chance_range_and_each_reference_value():
    rows = [_board_row("dino", "CL", 0.53, chance=0.15, border=0.4),
            _board_row("random", "random", 0.9, chance=0.2, border=0.05),
            _board_row("control-border", "control", 0.1, chance=0.15, border=3.0)]
    notes = {n["label"]: n for n in metric_references(rows, (("best_miou", "mIoU", "pct"), ("border", "Border", "num")),
                                                     chance={"best_miou": "chance"})}
    assert notes["mIoU"]["chance"] == "15.0–20.0"
    assert notes["Border"]["chance"] is None and notes["Border"]["scale"] == "0 = no boundary artifact"
    assert [(c["model"], c["tag"], c["value"]) for c in notes["Border"]["controls"]] == [
        ("random", "baseline", "0.05"), ("control-border", "control", "3.00")]
    # Per-layer tables: a reference's value is the one at its deepest layer.
    layered = [{"model": "random", "family": "random", "layer": 1, "norm": "postnorm", "border_score": 9.0},
               {"model": "random", "family": "random", "layer": 4, "norm": "postnorm", "border_score": 0.5}]
    note = metric_references(layered, (("border_score", "Border", "num"),), per_layer=True)[0]
    assert note["controls"][0]["value"] == "0.50"


def test_intervals_are_shown_beside_the_value():
    assert with_interval({"miou": 0.53, "miou_ci": [0.49, 0.57]}, "miou") == "53.0 (49.0–57.0)"
    assert with_interval({"miou": 0.53}, "miou") == "53.0"
    assert with_interval({"miou": None, "miou_ci": [0.1, 0.2]}, "miou") == "—"


def test_strip_prefers_a_dataset_with_regions_and_puts_references_last():
    from generator.site import Grid

    def ctx(ranked):
        rows = [{"image_id": f"i{n}", "image": f"img{n}", "mask": f"m{n}", "cells": [f"c{n}-l1", f"c{n}-l2"]}
                for n in range(5)]
        grids = [Grid(model, ["layer 1", "layer 2"], rows) for model in ("dino", "random")]
        return {"ranked": ranked, "families": {"dino": "CL", "random": "random"},
                "gallery": {"by_model": grids, "k": 8, "norm": "postnorm"}}

    strip = gallery_strip({"content-free": ctx(False), "scenes": ctx(True)}, n_images=2)
    assert strip["source"] == "scenes"
    assert [(c["model"], c["tag"]) for c in strip["columns"]] == [("dino", ""), ("random", "baseline")]
    assert [r["cells"] for r in strip["rows"]] == [["c0-l2", "c0-l2"], ["c1-l2", "c1-l2"]]
    assert gallery_strip({}) is None
