"""Data flows one way: each module imports only from the layers the table below allows.

Imports are read from the source (ast), function-local ones included: a lazy import is still
a dependency. Output paths and manifest keys are spelt only in generator/store/layout.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "generator"

# Which group each module (or package) of generator/ belongs to.
GROUP_OF = {
    "__init__": "base", "errors": "base", "assets": "base", "concurrency": "base", "options": "base",
    "png": "base", "hashing": "base", "templating": "base",
    "analyses": "analyses", "figures": "figures", "sources": "sources", "store": "store",
    "models": "models",
    "batches": "extract", "stream": "extract", "extract": "extract",
    "analyze": "analyze",
    "summarize": "summarize", "explorer": "summarize",
    "site": "site",
    "cli": "commands", "cli_reference": "commands", "doctor": "commands", "config_file": "commands",
}

# What each group may import. Analyses are pure: no files, so no store. The analyze stage reads
# what extract stored (store) and runs the analyses, without models or the extract stage; the
# render stage reads the output folder and draws, without models, torch or any stage below it.
ALLOWED = {
    "base": {"base"},
    "analyses": {"base", "analyses"},
    "sources": {"base", "sources"},
    "figures": {"base", "figures", "store"},
    "store": {"base", "store", "sources"},
    "models": {"base", "sources", "models"},
    "extract": {"base", "analyses", "figures", "sources", "store", "models", "extract"},
    "analyze": {"base", "analyses", "sources", "store"},
    "summarize": {"base", "analyses", "figures", "store", "summarize"},
    "site": {"base", "analyses", "figures", "store", "summarize", "site"},
    "commands": set(GROUP_OF.values()),
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _group(module_path: Path) -> str:
    first = module_path.relative_to(PACKAGE).with_suffix("").parts[0]
    return GROUP_OF[first]


def _imported_groups(path: Path) -> dict[str, int]:
    """Group of every generator module ``path`` imports → the line of the first such import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "generator":
                continue
            group = GROUP_OF[parts[1]] if len(parts) > 1 else "base"  # `from generator import __version__`
            found.setdefault(group, node.lineno)
    return found


def test_every_module_is_in_the_table():
    unknown = {p.relative_to(PACKAGE).parts[0] for p in _modules()} - {f"{name}.py" for name in GROUP_OF} - set(GROUP_OF)
    assert not unknown, f"add {sorted(unknown)} to GROUP_OF"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    group = _group(path)
    wrong = {g: line for g, line in _imported_groups(path).items() if g not in ALLOWED[group]}
    assert not wrong, f"{path.name} ({group}) imports {wrong} (group: line); allowed: {sorted(ALLOWED[group])}"


def test_render_and_analyze_import_no_stage_below_them():
    for path in sorted((PACKAGE / "site").rglob("*.py")):
        site = _imported_groups(path)
        assert not {"extract", "models", "analyze", "commands"} & set(site), path
    analyze = _imported_groups(PACKAGE / "analyze.py")
    assert not {"extract", "models", "site", "commands"} & set(analyze)


# String literals that name output paths or manifest keys; they belong in layout.py alone. The
# exceptions are other things of the same name: a results dict key, a docs page folder, the
# packaged site skeleton, a CLI command.
LAYOUT_NAMES = {"manifest.json", "manifest.d", "results", "variants", "datasets", "docs", "site",
                ".patchatlas.lock", ".render-", "kmeans.json", "maps.json", "maps.npz", "probes.json",
                "attention.json", "attention.npz", "layerwise.json", "summary", "site.json"}
KEY_PREFIXES = ("extract/", "sources/", "analyze/", "variants/", "stream/", "shards/", "hub/", "summarize")
NOT_LAYOUT = {("analyze.py", "variants"), ("site/build.py", "datasets"), ("assets.py", "site"), ("cli.py", "datasets"),
              ("cli.py", "summary"), ("config_file.py", "summarize")}  # an options record, a command


def test_paths_and_keys_are_spelt_only_in_the_layout_module():
    spelt = []
    for path in _modules():
        if path == PACKAGE / "store" / "layout.py":
            continue
        module = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                value = node.value
                if (value in LAYOUT_NAMES or value.startswith(KEY_PREFIXES)) and (module, value) not in NOT_LAYOUT:
                    spelt.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {value!r}")
    assert not spelt, "use generator.store.layout instead: " + ", ".join(spelt)


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The reader finds lazy imports too, so the table is not vacuous."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from generator.models.registry import MODELS\n    import generator.extract\n")
    assert _imported_groups(probe) == {"models": 2, "extract": 3}
