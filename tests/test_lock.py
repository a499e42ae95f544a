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
