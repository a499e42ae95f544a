"""`patchatlas build` killed with SIGKILL at random moments, then rerun, ends with the same bytes.

An uninterrupted reference build is timed; then, for seeded moments drawn uniformly over its
duration (stratified: one in each of N equal slices), the same build is started in a process
group of its own, killed (the whole group, SIGKILL) at that moment and rerun with the same
command to completion. Every file is compared by sha256 with the reference, masking only what
``generator.store.layout.RUN_DEPENDENT`` declares. The resume of the first kill is itself killed once before it is rerun.

Each build runs at the same path (the reference is moved aside), so nothing path-dependent
needs masking. The phase a kill hit is read from what the killed run left: the manifest's
entries and the render's staging folder.

The normal suite runs ``REDUCED_KILLS`` kills of a build without ``mkdocs build``;
``PATCHATLAS_CRASH_KILLS=12`` (``make crash-test``) runs that many, with the HTML site.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from generator.store.layout import LOCK_NAME, RENDER_STAGING_GLOB, SWAP_LEFTOVER_GLOB
from generator.store.lock import comparable_digests
from generator.store.manifest import UNREADABLE_SUFFIX

from test_push import PLANTED_TOKEN, hub  # noqa: F401  (the local stand-in for the Hub, a fixture)

TESTS = Path(__file__).resolve().parent
REDUCED_KILLS = 3
PUSH_REPO = "atlas-org/patchatlas-crash"
KILLS = int(os.environ.get("PATCHATLAS_CRASH_KILLS", "0") or 0)
SEED = int(os.environ.get("PATCHATLAS_CRASH_SEED", "0"))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # Single-threaded: CPU results are then the same in every process.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0",
               PYTHONPATH=str(TESTS.parent))
    return env


def build_command(out: Path, html: bool) -> list[str]:
    """Extract (3 shards of 2 images, batches of 3 so the layer-wise pass's batches differ from
    the shards'), degraded variants, the streamed curves of layer 1, analyze and render."""
    return [sys.executable, str(TESTS / "tiny_cli.py"), "build", "--out", str(out), "--models", "tiny_random",
            "--source", "synthetic-scenes", "--source-option", "n_images=6", "--source-option", "size=64",
            "--layers", "last", "--curve-layers", "all", "--batch-size", "3", "--shard-mb", "0.013",
            "--device", "cpu", "--k", "2", "--quiet", *([] if html else ["--no-html"])]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _finish(command: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - started


def _kill_at(command: list[str], moment: float) -> bool:
    """Run ``command`` and SIGKILL its process group ``moment`` seconds in; False if it ended first."""
    proc = _start(command)
    try:
        proc.wait(timeout=moment)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return True
    finally:
        proc.stderr.close()


def phase_left(out: Path, reference_keys: set[str]) -> str:
    """The stage a killed build was in, from what it left: the first kind of manifest entry
    still missing, or the render's staging and swap folders."""
    try:
        keys = set(json.loads((out / "manifest.json").read_text())["entries"])
    except (OSError, ValueError, KeyError):
        keys = set()
    for prefix, phase in (("sources/", "start"), ("shards/", "extract"), ("extract/", "extract"),
                          ("variants/", "variants"), ("stream/", "streaming"), ("analyze/", "analyze")):
        if {k for k in reference_keys if k.startswith(prefix)} - keys:
            return phase
    if list(out.glob(RENDER_STAGING_GLOB)):
        return "render (swap)" if list(out.glob(SWAP_LEFTOVER_GLOB)) else "render"
    return "summarize, render outside staging, or exiting"


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def run_random_kills(ref: Reference, kills: int, html: bool, seed: int = SEED) -> list[dict]:
    """Kill the build at ``ref.out`` at ``kills`` seeded moments within the reference's duration,
    rerun it to completion each time, and compare every file with the reference."""
    out, expected, duration = ref.out, ref.digests, ref.duration
    command = build_command(out, html)
    reference_keys = _manifest_keys(ref.folder)
    rng = np.random.default_rng(seed)
    rows = []
    for trial in range(kills):
        # Stratified: the i-th kill falls uniformly within the i-th of ``kills`` equal slices of
        # the duration, so even three kills reach start-up, extraction and the later stages.
        moment = float(rng.uniform(trial * duration / kills, (trial + 1) * duration / kills))
        killed = _kill_at(command, moment)
        phase = phase_left(out, reference_keys) if killed else "finished before the kill"
        if trial == 0:  # the resume itself is killed once
            resume_moment = float(rng.uniform(0, duration))
            if _kill_at(command, resume_moment):
                phase += f"; resume killed at {resume_moment:.1f}s in {phase_left(out, reference_keys)}"
        _finish(command)
        differing = _differing(comparable_digests(out), expected)
        rows.append({"moment": moment, "phase": phase, "identical": not differing, "differing": differing})
        shutil.rmtree(out)
    print(f"\nreference build: {duration:.1f} s ({'with' if html else 'without'} mkdocs build), seed {seed}")
    print(f"{'kill at':>8}  {'identical':9}  phase / differing files")
    for row in rows:
        print(f"{row['moment']:7.1f}s  {'yes' if row['identical'] else 'NO':9}  {row['phase']}"
              + (f"  ->  {', '.join(row['differing'][:6])}" if row["differing"] else ""))
    print(f"{sum(r['identical'] for r in rows)} of {len(rows)} kills byte-identical after the rerun")
    return rows


def _manifest_keys(folder: Path) -> set[str]:
    return set(json.loads((folder / "manifest.json").read_text())["entries"])


def _assert_identical(rows: list[dict]) -> None:
    failed = [f"kill at {r['moment']:.1f}s ({r['phase']}): {', '.join(r['differing'])}"
              for r in rows if not r["identical"]]
    assert not failed, "resumed builds differ from the uninterrupted one:\n" + "\n".join(failed)


@dataclass
class Reference:
    """An uninterrupted build, moved aside to ``folder``; every test builds again at ``out``."""

    out: Path
    folder: Path
    digests: dict[str, str]
    duration: float


def _reference(root: Path, html: bool) -> Reference:
    out = root / "out"
    duration = _finish(build_command(out, html))
    out.rename(root / "reference")
    return Reference(out, root / "reference", comparable_digests(root / "reference"), duration)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return _reference(tmp_path_factory.mktemp("crash"), html=False)


@pytest.fixture
def work(reference):
    """The build folder, empty before and after each test."""
    shutil.rmtree(reference.out, ignore_errors=True)
    yield reference.out
    shutil.rmtree(reference.out, ignore_errors=True)


def test_random_kills_resume_to_the_same_bytes(reference, work):
    _assert_identical(run_random_kills(reference, REDUCED_KILLS, html=False))


@pytest.mark.slow
@pytest.mark.skipif(KILLS < 1, reason="the full form: PATCHATLAS_CRASH_KILLS=12 (make crash-test)")
def test_random_kills_of_the_full_build_resume_to_the_same_bytes(tmp_path):
    full = _reference(tmp_path, html=True)
    _assert_identical(run_random_kills(full, KILLS, html=True))


# --- operator cases ---------------------------------------------------------------------------

def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)


def test_two_builds_started_together_make_one_build(reference, work):
    command = build_command(work, html=False)
    procs = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(proc.wait(timeout=900), proc.communicate()[1]) for proc in procs]
    assert sorted(code for code, _ in results)[0] == 0, results
    for code, err in results:
        if code != 0:  # the one that came second is refused, naming the lock and who holds it
            assert code == 2 and f"{work / LOCK_NAME}" in err and "in use by" in err, err
    assert comparable_digests(work) == reference.digests


def test_a_full_disk_while_rendering_keeps_the_previous_site(reference, work, tmp_path):
    shutil.copytree(reference.folder, work, symlinks=True)
    docs_inode = (work / "docs").stat().st_ino
    # The fourth page written hits a full disk.
    inject = tmp_path / "full_disk.py"
    inject.write_text(textwrap.dedent(f"""
        import errno, runpy, sys
        sys.path.insert(0, {str(TESTS)!r})
        import generator.site.build as site
        real, calls = site._write_page, []
        def write_page(path, text):
            calls.append(path)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, text)
        site._write_page = write_page
        sys.argv = [{str(TESTS / "tiny_cli.py")!r}, *sys.argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    failed = _run([sys.executable, str(inject), "render", "--out", str(work), "--no-html", "--quiet"])
    assert failed.returncode == 2, failed.stderr
    assert f"{work / 'docs'}: the disk is full" in failed.stderr and "free some space" in failed.stderr
    assert "rerun" in failed.stderr
    assert (work / "docs").stat().st_ino == docs_inode  # the previous pages were not touched
    assert not list(work.glob(RENDER_STAGING_GLOB)) and comparable_digests(work) == reference.digests

    rerun = _run(build_command(work, html=False))
    assert rerun.returncode == 0, rerun.stderr
    assert comparable_digests(work) == reference.digests


@pytest.mark.parametrize("damage", ["truncated", "not json"])
def test_a_damaged_manifest_is_set_aside_and_rebuilt(reference, work, damage):
    shutil.copytree(reference.folder, work, symlinks=True)
    manifest = work / "manifest.json"
    bad = manifest.read_bytes()[: manifest.stat().st_size // 2] if damage == "truncated" else b"\x00garbage"
    manifest.write_bytes(bad)

    rerun = _run(build_command(work, html=False))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{manifest}: the manifest is unreadable" in rerun.stderr and "moved aside" in rerun.stderr
    aside = work / f"manifest.json{UNREADABLE_SUFFIX}"
    assert aside.read_bytes() == bad
    aside.unlink()
    assert comparable_digests(work) == reference.digests


def test_a_results_file_edited_by_hand_is_named_and_recomputed(reference, work):
    shutil.copytree(reference.folder, work, symlinks=True)
    edited = sorted((work / "results").rglob("*.json"))[0]
    edited.write_text(edited.read_text().replace("0", "1", 1))
    rerun = _run(build_command(work, html=False))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{edited}: changed since it was written" in rerun.stderr and "recomputed" in rerun.stderr
    assert comparable_digests(work) == reference.digests


# --- push -------------------------------------------------------------------------------------

# tests/tiny_cli.py keeps the Hub offline; a push goes online, to the local stand-in.
PUSH_CLI = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import conftest
from huggingface_hub import constants
from generator.cli import main
from generator.models.registry import MODELS
os.environ["HF_HUB_OFFLINE"] = "0"
constants.HF_HUB_OFFLINE = False
MODELS.update({{entry.name: entry for entry in conftest.TINY_ENTRIES}})
sys.exit(main(sys.argv[1:]))
"""


def _push_command(out: Path) -> list[str]:
    return [sys.executable, "-c", PUSH_CLI, "push", "--out", str(out), "--dataset", "synthetic-scenes",
            "--repo", PUSH_REPO]


def _push_env(hub) -> dict:
    env = _env()
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=PLANTED_TOKEN, HF_HUB_OFFLINE="0",
               NO_PROXY="127.0.0.1,localhost")
    return env


def _remote(hub) -> dict:
    return {branch: dict(files) for branch, files in hub.repos.get(PUSH_REPO, {}).items()}


def _forget(hub) -> None:
    hub.repos.clear(), hub.heads.clear(), hub.requests.clear(), hub.private.clear()


@pytest.mark.parametrize("kill_when", ["first request", "preupload", "commit", "random"])
def test_a_killed_push_resumed_ends_with_the_same_remote(reference, work, hub, kill_when):
    """Killed at its first request to the Hub, while asking which files to upload, with the commit on
    the wire (the Hub applies it after the client died) or at a random moment: the same
    command again leaves the remote and the folder as one uninterrupted push does."""
    shutil.copytree(reference.folder, work, symlinks=True)
    command, env = _push_command(work), _push_env(hub)
    started = time.monotonic()
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    duration = time.monotonic() - started
    expected_remote, expected_local = _remote(hub), comparable_digests(work)
    assert expected_remote["main"]

    shutil.rmtree(work)
    shutil.copytree(reference.folder, work, symlinks=True)
    _forget(hub)
    seen = {"first request": lambda: bool(hub.requests),
            "preupload": lambda: bool(hub.posts("preupload")), "commit": lambda: bool(hub.posts("commit"))}
    deadline = time.monotonic() + (float(np.random.default_rng(SEED).uniform(0, duration))
                                   if kill_when == "random" else 300)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and time.monotonic() < deadline and not (kill_when in seen and seen[kill_when]()):
        time.sleep(0.001)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if kill_when != "random":
        assert proc.returncode == -signal.SIGKILL, f"the push ended before the {kill_when} step"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _remote(hub) == expected_remote
    assert comparable_digests(work) == expected_local
