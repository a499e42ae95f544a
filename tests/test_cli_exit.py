"""The CLI tells the truth: an unreachable Hub is said at once, named models that did not run
fail the run, and the light commands stay light."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from generator.cli import main
from generator.models import registry
from generator.sources import hub

from conftest import TINY_SUPERVISED, save_untrained_weights

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ["--source", "synthetic-scenes", "--source-option", "n_images=2", "--layers", "last",
          "--curve-layers", "last", "--device", "cpu", "--quiet"]


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_online(monkeypatch):
    """Online mode (conftest forces offline), a fresh probe cache, and the env restored after."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_PROBES", {})

    def point_at(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    return point_at


def test_unreachable_hub_with_online_fails_at_once_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "generator.cli", "extract", "--out", str(tmp_path / "out"),
                           "--models", "dino_vits16", "--online", *SOURCE],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Hugging Face Hub unreachable" in lines[0], done.stderr
    assert "127.0.0.1" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unreachable_hub_by_default_reads_the_cache_with_one_warning(tmp_path, tiny_models, hub_online, capsys):
    hub_online(f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    code = main(["extract", "--out", str(tmp_path), "--models", "tiny_vit,tiny_random", *SOURCE])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "Hub unreachable" in line] == [err.splitlines()[0]]
    assert "local cache only" in err and "skipped tiny_vit" in err
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert code == 3  # tiny_vit was named and did not run
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_reachable_hub_is_left_online(tmp_path, tiny_models, hub_online, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub_online(f"http://127.0.0.1:{server.getsockname()[1]}")
        probe = hub.probe_hub()
    assert probe.reachable and probe.error == "" and probe.latency_s < 3
    assert hub.probe_hub() is probe  # one probe per run


def test_doctor_reports_what_the_probe_measured(tmp_path, hub_online, capsys):
    closed = f"http://127.0.0.1:{_closed_port()}"
    hub_online(closed)
    assert main(["doctor", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "hub endpoint" in line]
    assert line.startswith("[warn") and f"unreachable at {closed}" in line and "hub mode" in out
    assert "online" in [line for line in out.splitlines() if "hub mode" in line][0]
    assert main(["doctor", "--out", str(tmp_path), "--online"]) == 1  # required, and not there
    capsys.readouterr()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub_online(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert main(["doctor", "--out", str(tmp_path), "--online"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "hub endpoint" in line]
    assert line.startswith("[ok") and "reachable at" in line and " ms)" in line


# --- exit codes ------------------------------------------------------------------------------------

def test_named_model_skipped_fails_unless_allowed(tmp_path, tiny_models, capsys):
    assert main(["extract", "--out", str(tmp_path), "--models", "tiny_vit,tiny_random", *SOURCE]) == 3
    err = capsys.readouterr().err
    assert "tiny_vit" in err.splitlines()[-1] and "--allow-skipped" in err.splitlines()[-1]
    assert main(["extract", "--out", str(tmp_path), "--models", "tiny_vit,tiny_random", "--allow-skipped",
                 *SOURCE]) == 0
    assert "skipped tiny_vit" in capsys.readouterr().err


def test_default_models_skipped_offline_keep_exit_0(tmp_path, tiny_models, monkeypatch, capsys):
    monkeypatch.setattr(registry, "DEFAULT_MODELS", ("tiny_vit", "tiny_random"))
    assert main(["extract", "--out", str(tmp_path), *SOURCE]) == 0
    assert "skipped tiny_vit" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "manifest.json").read_text())["entries"]
    assert manifest["extract/synthetic-scenes/tiny_vit"]["status"] == "skipped"


def test_require_pretrained_fails_when_only_baselines_ran(tmp_path, tiny_models, capsys):
    assert main(["extract", "--out", str(tmp_path), "--models", "tiny_vit,tiny_random", "--allow-skipped",
                 "--require-pretrained", *SOURCE]) == 3
    assert "no pretrained model ran" in capsys.readouterr().err
    weights = tmp_path / "tiny.safetensors"
    save_untrained_weights(TINY_SUPERVISED, weights, seed=0)
    assert main(["extract", "--out", str(tmp_path), "--models", "tiny_vit,tiny_random", "--require-pretrained",
                 "--weights", f"tiny_vit={weights}", *SOURCE]) == 0


def test_mistyped_weights_path_is_named_before_any_work(tmp_path, tiny_models, capsys):
    missing = tmp_path / "ckpt" / "tiny.pht"
    code = main(["build", "--out", str(tmp_path / "out"), "--models", "tiny_vit", "--no-html",
                 "--weights", f"tiny_vit={missing}", *SOURCE])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- packaging: the light commands stay light -------------------------------------------------

FULL_ONLY = ("torch", "torchvision", "timm", "sklearn", "scipy", "jinja2", "mkdocs", "material", "matplotlib")
WITHOUT_FULL_INSTALL = f"""
import sys
# As in an environment with only the base install: None in sys.modules makes an import fail
# with ModuleNotFoundError and importlib.util.find_spec answer None.
sys.modules.update(dict.fromkeys({FULL_ONLY!r}))
from generator.cli import main
import generator.store.parquet, generator.store.manifest
codes = [main(["models"]), main(["datasets"]), main(["render", "--out", sys.argv[1], "--no-html"])]
print("codes", codes)
"""


def test_models_datasets_and_reading_need_no_full_install(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_FULL_INSTALL, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "codes [0, 0, 2]" in done.stdout, done.stdout + done.stderr
    assert "dino_vits16" in done.stdout and "synthetic-scenes" in done.stdout
    assert "pip install 'patchatlas[full]'" in done.stderr  # render does need it, and says so


def test_pyproject_says_what_the_code_needs():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib
    assert {"Homepage", "Documentation", "Repository"} <= set(project["urls"])
    base = {re.split(r"[<>=!\[ ;]", d)[0].lower() for d in project["dependencies"]}
    assert not base & {"torch", "torchvision", "timm", "scikit-learn", "scipy", "matplotlib"}
    extras = project["optional-dependencies"]
    assert "read" in extras and "patchatlas[full]" in extras["test"]
    full = {re.split(r"[<>=!\[ ;]", d)[0].lower() for d in extras["full"]}
    assert {"torch", "timm", "mkdocs"} <= full


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_every_row_has_written_facts_for_its_current_timm_id(name):
    # Else `models` pays for timm on this row.
    assert registry.written_facts(registry.MODELS[name]) is not None, \
        "facts.json is stale: run `python -m generator.models.registry`"


def test_written_model_facts_match_timm():
    # What timm computes: checked on the default rows, the others share the code.
    defaults = [registry.MODELS[name] for name in registry.DEFAULT_MODELS]
    fresh = registry.computed_facts(defaults)
    assert {name: registry.written_facts(registry.MODELS[name]) for name in fresh} == fresh


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, tiny_models, capsys):
    assert main(["extract", "--out", str(tmp_path), "--models", "tiny_random",
                 *[a for a in SOURCE if a != "--quiet"]]) == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "%|" not in err, err


def test_verbose_flag_logs_the_hub_probe(tmp_path, hub_online, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub_online(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert main(["-v", "extract", "--out", str(tmp_path), "--models", "nonexistent_model", *SOURCE]) == 2
    err = capsys.readouterr().err
    assert "info: Hugging Face Hub reachable at http://127.0.0.1:" in err


def test_encoder_says_the_hub_is_unreachable_rather_than_a_file_missing(hub_online, monkeypatch):
    from generator.errors import WeightsUnavailable
    from generator.models import encoder

    closed = f"http://127.0.0.1:{_closed_port()}"
    hub_online(closed)

    def no_network(*args, **kwargs):
        raise OSError("connection refused")  # what timm's download raises after its retries

    monkeypatch.setattr(encoder.timm, "create_model", no_network)
    with pytest.raises(WeightsUnavailable, match=f"Hub is unreachable \\({closed}"):
        encoder.load_encoder(TINY_SUPERVISED)
