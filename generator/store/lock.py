"""One build at a time per output folder (or the workers of one distributed extract).

An advisory ``flock`` on ``<out>/.patchatlas.lock``: the kernel releases it when the holder
exits, even on SIGKILL, so a crashed build never leaves a stale lock behind. A build holds it
exclusively and writes its PID and command into the file, so a second build can say who holds
it. The workers of a distributed extract share it (each also holds an exclusive lock of its
own rank), so they run together but never beside a build.

Whoever holds the lock exclusively owns every temporary file under the folder: those left by a
killed run are removed on entry, so an interrupted build resumed leaves the same files as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

from generator.errors import PatchAtlasError

LOCK_NAME = ".patchatlas.lock"
# The names generator.store.atomic gives its temporary files: ".<final name>.<random>.tmp".
TEMPORARY_GLOB = ".*.tmp"


def _open(path: Path, out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as err:
        raise PatchAtlasError(f"output folder {out}: cannot be written ({err.strerror}); "
                              f"choose another --out or fix its permissions") from err


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files a killed run left under ``out``; returns what was removed."""
    stale = [p for p in out.rglob(TEMPORARY_GLOB) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, worker: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold ``out`` for this process; ``worker=(rank, world_size)`` for a distributed extract's worker."""
    out = Path(out)
    handle = _open(out / LOCK_NAME, out)
    rank_handle = None
    try:
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if worker else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "the workers of a distributed extract"
            raise PatchAtlasError(f"output folder {out} is in use by {holder}; wait for it to finish "
                                  f"or use another --out") from None
        if worker:
            rank, world_size = worker
            rank_handle = _open(out / f"{LOCK_NAME}.rank-{rank}-of-{world_size}", out)
            try:
                fcntl.flock(rank_handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PatchAtlasError(f"output folder {out}: worker {rank} of {world_size} is already running; "
                                      f"give each worker its own RANK") from None
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} ({' '.join(sys.argv[:3])})")
            handle.flush()
            remove_stale_temporaries(out)
        yield out / LOCK_NAME
    finally:
        if rank_handle is not None:
            rank_handle.close()
        handle.close()  # closing the descriptor releases the lock
