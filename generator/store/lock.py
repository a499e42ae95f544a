"""One build at a time per output folder.

An advisory ``flock`` on ``<out>/.patchatlas.lock``: the kernel releases it when the holder
exits, even on SIGKILL, so a crashed build never leaves a stale lock behind. The holder's PID
and command are written into the file so the second build can say who holds it.
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


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+")
    except OSError as err:
        raise PatchAtlasError(f"output folder {out}: cannot be written ({err.strerror}); "
                              f"choose another --out or fix its permissions") from err
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PatchAtlasError(f"output folder {out} is in use by {holder}; wait for it to finish "
                                  f"or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} ({' '.join(sys.argv[:3])})")
        handle.flush()
        yield out / LOCK_NAME
    finally:
        handle.close()  # closing the descriptor releases the lock
