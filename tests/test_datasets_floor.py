"""Published folders load with the oldest ``datasets`` that pyproject.toml admits (3.0).

``datasets`` 4 writes ``List`` in the features metadata, a name 3.x does not know; the folder
must be written in the form both read. The check needs a second environment with that old
release: ``make datasets-floor`` creates it under ``.venv-ds3`` (``make test`` does first), or
point ``PATCHATLAS_DATASETS_FLOOR_PYTHON`` at its Python. Without one the test is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from generator.cli import main

from conftest import offline_tiny_zoo

ROOT = Path(__file__).resolve().parents[1]
FLOOR_PYTHON = Path(os.environ.get("PATCHATLAS_DATASETS_FLOOR_PYTHON") or ROOT / ".venv-ds3" / "bin" / "python")


@pytest.fixture(scope="module")
def floor_python():
    if not FLOOR_PYTHON.is_file():
        pytest.skip(f"no environment with the oldest supported datasets at {FLOOR_PYTHON}; "
                    f"run `make datasets-floor` to create it")
    version = subprocess.run([str(FLOOR_PYTHON), "-c", "import datasets; print(datasets.__version__)"],
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.startswith("3.0."), f"{FLOOR_PYTHON} has datasets {version.stdout.strip()}, not 3.0"
    return FLOOR_PYTHON


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    # Its own build, not conftest's shared tiny_builds: extract only, two images at the default table
    # dtype: the smallest folder the oldest datasets release has to load.
    mp = offline_tiny_zoo(tmp_path_factory)
    out = tmp_path_factory.mktemp("floor") / "out"
    code = main(["extract", "--out", str(out), "--models", "tiny_random", "--layers", "last",
                 "--source", "synthetic-scenes", "--source-option", "n_images=2", "--source-option", "size=64",
                 "--device", "cpu", "--quiet"])
    yield out / "datasets" / "synthetic-scenes", code
    mp.undo()


def test_every_config_loads_with_the_oldest_supported_datasets(floor_python, extracted, tmp_path):
    folder, code = extracted
    assert code == 0
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([str(floor_python), str(ROOT / ".ci" / "load_every_config.py"), str(folder)],
                            capture_output=True, text=True, env=env, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (lines[-1:], result.stderr[-3000:])
    header, loaded = lines[0], {line["config"]: line for line in lines[1:]}
    assert header["datasets"].startswith("3.0.") and len(loaded) == header["configs"] >= 5
    patches = loaded["tiny_random-L02-postnorm"]
    # The old release sees the same schema: a class label with names and fixed-length tokens.
    assert patches["features"]["label"].startswith("ClassLabel(") and "sky" in patches["features"]["label"]
    assert "length=" in patches["features"]["embedding"] and patches["rows"] == 2 * 4 * 4
