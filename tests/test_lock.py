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
