"""The summarize stage: the site's numbers come from OUT/summary, which is recomputed only when
its inputs change, and render draws from it alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from generator.cli import main
from generator.errors import PatchAtlasError
from generator.site import RenderOptions, run_render
from generator.store.layout import SITE_SUMMARY, summary_dir, summary_file
from generator.summarize import fmt_num, fmt_pct, read_source_summary, run_summarize

from conftest import offline_tiny_zoo

GALLERY_K = 4
SOURCE = "synthetic-scenes"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = offline_tiny_zoo(tmp_path_factory)
    out = tmp_path_factory.mktemp("summarize") / "out"
    code = main(["build", "--out", str(out), "--models", "tiny_random", "--layers", "all", "--source-option",
                 "n_images=3", "--source-option", "size=64", "--k", "2,4", "--gallery-k", str(GALLERY_K),
                 "--linear-max-steps", "20", "--batch-size", "4", "--device", "cpu", "--no-html", "--quiet"])
    yield out
    mp.undo()
    assert code == 0


def _options(**overrides) -> RenderOptions:
    return RenderOptions(**{"gallery_k": GALLERY_K, "build_html": False, "progress": False, **overrides})


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_out(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("docs", "site", ".lock*"))
    return dest


def test_summary_holds_what_the_site_shows(built):
    # Recomputed from the raw results: each model's best post-norm mIoU at the gallery's k.
    best = {}
    for path in (built / "results" / SOURCE).glob("*/*/kmeans.json"):
        record = json.loads(path.read_text())
        if record["norm"] != "postnorm":
            continue
        chosen = next(r for r in record["kmeans"] if r["k"] == GALLERY_K)
        best[record["model"]] = max(best.get(record["model"], 0.0), chosen["miou"])
    site = json.loads(summary_file(built, SITE_SUMMARY).read_text())
    board = site["leaderboards"][SOURCE]
    rows = board["models"] + board["reference"]
    assert {r["model"]: r["best_miou"] for r in rows} == best
    home = (built / "docs" / "index.md").read_text()
    for model, miou in best.items():
        assert fmt_pct(miou) in home, model
    # The positional table has one line per summary row, with the summary's border score.
    summary = read_source_summary(built, SOURCE)
    artifacts = (built / "docs" / "positional-artifacts.md").read_text()
    for row in summary["positional_rows"]:
        line = next(line for line in artifacts.splitlines()
                    if f"| {row['layer']} | {row['norm']} | {fmt_num(row['border_score'])} |" in line)
        assert fmt_pct(row["miou"]) in line
    assert summary["probes"]["knn_by_layer"]["tiny_random"]


def test_render_reads_no_result_record_the_summary_aggregated(built, tmp_path):
    copy = _copy_out(built, tmp_path / "out")
    removed = list((copy / "results").rglob("*.json"))
    assert removed
    for path in removed:
        path.unlink()
    run_render(copy, _options())
    assert _tree(copy / "docs") == _tree(built / "docs")


def test_render_without_a_summary_says_to_summarize(built, tmp_path):
    copy = _copy_out(built, tmp_path / "out")
    shutil.rmtree(summary_dir(copy))
    with pytest.raises(PatchAtlasError, match=r"run `patchatlas summarize --out .*out`"):
        run_render(copy, _options())
    assert not (copy / "docs").exists()
    # A summary made for other gallery options is not shown as this render's.
    run_summarize(copy, _options(gallery_k=2))
    with pytest.raises(PatchAtlasError, match=r"gallery_k=2.*gallery_k=4.*patchatlas summarize"):
        run_render(copy, _options())


def test_summarize_skips_an_unchanged_rerun_and_redoes_a_changed_result(built, tmp_path):
    copy = _copy_out(built, tmp_path / "out")
    before = _tree(summary_dir(copy))
    manifest = (copy / "manifest.json").read_bytes()
    assert run_summarize(copy, _options()) is False
    assert _tree(summary_dir(copy)) == before and (copy / "manifest.json").read_bytes() == manifest

    path = next((copy / "results" / SOURCE / "tiny_random").glob("*-postnorm/kmeans.json"))
    record = json.loads(path.read_text())
    next(r for r in record["kmeans"] if r["k"] == GALLERY_K)["miou"] = 0.987654
    path.write_text(json.dumps(record))
    assert run_summarize(copy, _options()) is True
    rows = read_source_summary(copy, SOURCE)["positional_rows"]
    changed = next(r for r in rows if r["layer"] == record["layer"] and r["norm"] == "postnorm")
    assert changed["miou"] == 0.987654
    assert run_summarize(copy, _options()) is False


def test_render_opens_each_npz_once(built, tmp_path, monkeypatch):
    copy = _copy_out(built, tmp_path / "out")
    opened = []
    real_load = np.load

    def counting_load(path, *args, **kwargs):
        opened.append(Path(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    run_render(copy, _options())
    assert opened and len(opened) == len(set(opened)), sorted(p for p in opened if opened.count(p) > 1)
    assert any(p.parent == summary_dir(copy) for p in opened)
    assert all(p.suffix == ".npz" for p in opened)


def test_summarize_command_reports_an_up_to_date_summary(built, tmp_path, capsys):
    copy = _copy_out(built, tmp_path / "out")
    assert main(["summarize", "--out", str(copy), "--gallery-k", str(GALLERY_K)]) == 0
    assert capsys.readouterr().out.strip().endswith("(up to date)")
    assert main(["summarize", "--out", str(copy), "--gallery-k", "2"]) == 0
    assert "up to date" not in capsys.readouterr().out
