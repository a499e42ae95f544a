"""The documents stay true to what they describe.

The README stays a newcomer's page (small, its links resolve, its two commands are the
Makefile's); benchmarks/README.md's tables are what benchmarks/report.py writes from the
recorded results; site/guide/cli.md is what generator/cli_reference.py writes from the commands; and
the hand-written site pages build with MkDocs in strict mode.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import click
import pytest

from generator.cli import cli
from generator.cli_reference import CLI_PAGE, REGENERATE, cli_reference, options_table
from generator.errors import PatchAtlasError

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 10_000


def _load_report():
    """benchmarks/report.py as a module, loaded from its path (benchmarks/ is not installed)."""
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


# --- README.md ------------------------------------------------------------------------------

def test_readme_fits_the_limit():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (f"README.md is {size} bytes, over {README_LIMIT}: move detail to a page "
                                  f"under site/ and link it")


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+://", t)]
    assert "site/images/headline.png" in local and "benchmarks/README.md" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_two_commands_are_the_makefile_targets():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Two commands\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = re.findall(r"^(make \w+)", block, re.M)
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


# --- benchmarks/README.md --------------------------------------------------------------------

def test_benchmarks_readme_is_what_report_writes():
    committed = report.README.read_text(encoding="utf-8")
    generated = report.render_readme(committed, report.load_results(report.RESULTS))
    assert committed == generated, "benchmarks/README.md differs from its results: run `python -m benchmarks.report`"


def test_every_recorded_result_has_a_table_with_its_machine_and_command():
    committed = report.README.read_text(encoding="utf-8")
    for path in sorted(report.RESULTS.glob("*.json")):
        machine = json.loads(path.read_text())["machine"]
        assert f"*`results/{path.name}`*" in committed
        assert f"`{machine['command']}`" in committed
        assert machine["date"][:10] in committed


@pytest.fixture
def pipeline_result():
    path = report.RESULTS / "pipeline-cpu.json"
    return path, json.loads(path.read_text())


def test_a_changed_number_changes_the_table(pipeline_result):
    path, data = pipeline_result
    readme = report.README.read_text(encoding="utf-8")
    changed = copy.deepcopy(data)
    changed["end_to_end"]["naive"]["img_s"] = 1234.5
    before = report.render_readme(readme, {"pipeline": [(path, data)]})
    after = report.render_readme(readme, {"pipeline": [(path, changed)]})
    assert "| naive | fp32, batch 32 | float32, 48 files | 1 234 |" in after
    assert "1 234" not in before.split("<!-- report:pipeline -->")[1].split("<!-- /report:pipeline -->")[0]


def test_a_kind_without_results_says_so_and_results_without_a_block_fail(pipeline_result):
    path, data = pipeline_result
    readme = "# x\n\n<!-- report:probes -->\nold\n<!-- /report:probes -->\n"
    assert report.render_readme(readme, {}) == "# x\n\n<!-- report:probes -->\nNo recorded result yet.\n<!-- /report:probes -->\n"
    with pytest.raises(PatchAtlasError, match=r"no '<!-- report:pipeline -->' block for pipeline-cpu\.json"):
        report.render_readme(readme, {"pipeline": [(path, data)]})


def test_a_result_without_its_command_or_of_no_known_kind_is_named(tmp_path, pipeline_result):
    _, data = pipeline_result
    del data["machine"]["command"]
    bare = tmp_path / "pipeline-gpu.json"
    bare.write_text(json.dumps(data))
    readme = "<!-- report:pipeline -->\n<!-- /report:pipeline -->\n"
    with pytest.raises(PatchAtlasError, match=r"pipeline-gpu\.json: no 'machine\.command' recorded"):
        report.render_readme(readme, report.load_results(tmp_path))
    (tmp_path / "speed-cpu.json").write_text("{}")
    with pytest.raises(PatchAtlasError, match=r"speed-cpu\.json: no table for results of kind 'speed'"):
        report.load_results(tmp_path)


# --- site/guide/cli.md ------------------------------------------------------------------------

def test_cli_page_is_what_the_commands_say():
    assert CLI_PAGE == ROOT / "site" / "guide" / "cli.md"
    assert CLI_PAGE.read_text(encoding="utf-8") == cli_reference(), f"site/guide/cli.md is stale: run `{REGENERATE}`"


def test_cli_page_lists_every_option_of_every_command():
    page = cli_reference()
    for name, command in cli.commands.items():
        section = page.split(f"## `patchatlas {name}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            for opt in param.opts:
                assert f"<code>{opt}" in section or f", {opt}" in section or f"/ {opt}" in section, \
                    f"{name}: {opt} missing from the CLI reference"


def test_cli_table_cells_never_split_or_turn_into_markup():
    @click.command()
    @click.option("--mode", type=click.Choice(["a", "b"]), default="a", show_default=True,
                  help="Pick `a|b` for <dataset>; see [x] and *stars* or n_images.")
    def tool(mode):
        pass

    table = options_table(tool, click.Context(tool, info_name="tool"))
    row = next(line for line in table.splitlines() if "--mode" in line)
    assert row.count("|") == 3  # the row's own three separators, none from the text
    assert "<code>--mode [a&#124;b]</code>" in row
    assert "<code>a&#124;b</code> for &lt;dataset&gt;; see \\[x\\] and \\*stars\\* or n\\_images." in row
    assert "\\[default: a\\]" in row


# --- the hand-written site pages --------------------------------------------------------------

def test_site_pages_build_strictly_and_appear_in_the_nav(tmp_path):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path / "site"
    config = load_config(config_file=str(ROOT / "mkdocs.yml"), docs_dir=str(ROOT / "site"), site_dir=str(site),
                         strict=True)
    build(config)
    nav = (site / "methods" / "index.html").read_text(encoding="utf-8")
    for page, title in (("guide", "Running PatchAtlas"), ("guide/cli", "CLI reference"),
                        ("guide/scale-out", "Scale-out"), ("guide/streaming", "Streaming"),
                        ("developers/architecture", "Architecture")):
        html = (site / page / "index.html").read_text(encoding="utf-8")
        assert re.search(rf"<h1 id=[^>]*>{re.escape(title)}", html), f"{page}: no heading '{title}'"
        assert f'href="../{page}/"' in nav, f"{page} is not in the site's navigation"
