"""Two builds on one output folder: the second is refused with the first one's PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from generator.cli import main
from generator.errors import PatchAtlasError
from generator.store.lock import LOCK_NAME, output_lock


def test_second_build_is_refused_and_names_the_holder(tmp_path, capsys):
    with output_lock(tmp_path):
        assert main(["analyze", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getpid()}" in err and "in use" in err


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from generator.store.lock import output_lock\n"
        "with output_lock(sys.argv[2]):\n"
        "    print('locked', flush=True); time.sleep(60)"), os.getcwd(), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PatchAtlasError, match=f"PID {holder.pid}"):
            with output_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(tmp_path) as lock_file:  # no stale lock after SIGKILL
        assert lock_file.name == LOCK_NAME


def test_unwritable_output_folder_is_named(tmp_path):
    target = tmp_path / "file-not-folder"
    target.write_text("x")
    with pytest.raises(PatchAtlasError, match="file-not-folder"):
        with output_lock(target / "out"):
            pass


def test_the_holder_is_recorded_beside_the_lock(tmp_path):
    from generator.store.lock import HOLDER_NAME

    with output_lock(tmp_path):
        assert (tmp_path / HOLDER_NAME).read_text().startswith(f"PID {os.getpid()} (")


def test_workers_run_together_but_never_beside_a_build(tmp_path):
    with output_lock(tmp_path, worker=(0, 2)):
        with output_lock(tmp_path, worker=(1, 2)):  # another rank: together
            pass
        with pytest.raises(PatchAtlasError, match="worker 0 of 2 is already running"):
            with output_lock(tmp_path, worker=(0, 2)):
                pass
        with pytest.raises(PatchAtlasError, match="in use by the workers of a distributed extract"):
            with output_lock(tmp_path):
                pass
    with output_lock(tmp_path):
        with pytest.raises(PatchAtlasError, match=f"in use by PID {os.getpid()}"):
            with output_lock(tmp_path, worker=(0, 2)):
                pass
    with output_lock(tmp_path, worker=(0, 2)):  # every lock let go
        pass


def test_the_holder_removes_what_a_killed_run_of_any_stage_left(tmp_path):
    from generator.store.layout import RENDER_STAGING_PREFIX

    kept = {"datasets/s/m/L01-prenorm/train-00000-of-00001.parquet": b"PAR1", "docs/index.md": b"# old",
            "manifest.d/rank-0000-of-0002.json": b"{}"}
    for rel, data in kept.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    left = [tmp_path / "datasets/s/m/L01-prenorm/.train-00000-of-00001.parquet.ab12.tmp",  # extract
            tmp_path / "variants/s/m/.degraded-blur-2.npz.x.tmp", tmp_path / "results/s/m/.layerwise.json.y.tmp",
            tmp_path / "manifest.d/.rank-0001-of-0002.json.z.tmp", tmp_path / ".manifest.json.q.tmp",
            tmp_path / f"{RENDER_STAGING_PREFIX}k3j9/docs/index.md", tmp_path / ".docs.old/index.md"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    # A swap killed between moving the previous site aside and placing the new one.
    (tmp_path / ".site.old").mkdir()
    (tmp_path / ".site.old/index.html").write_bytes(b"<html>previous</html>")

    with output_lock(tmp_path):
        pass

    files = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
             and not p.name.startswith(LOCK_NAME)}
    assert files == {**kept, "site/index.html": b"<html>previous</html>"}
    assert not list(tmp_path.glob(f"{RENDER_STAGING_PREFIX}*")) and not list(tmp_path.glob(".*.old"))


def test_a_second_build_is_told_which_lock_file_is_held(tmp_path):
    with output_lock(tmp_path):
        with pytest.raises(PatchAtlasError, match=f"holds {tmp_path / LOCK_NAME}"):
            with output_lock(tmp_path):
                pass


def test_an_unreadable_manifest_is_moved_aside_and_named(tmp_path, caplog):
    from generator.store.manifest import UNREADABLE_SUFFIX, Manifest

    (tmp_path / "manifest.json").write_text('{"version": 1, "entries": {"extract/s/m": {"status": "do')
    with output_lock(tmp_path):
        assert Manifest.load(tmp_path / "manifest.json").get("extract/s/m") is None
    assert (tmp_path / f"manifest.json{UNREADABLE_SUFFIX}").read_text().endswith('"do')
    assert f"{tmp_path / 'manifest.json'}: the manifest is unreadable" in caplog.text
    assert "moved aside" in caplog.text
