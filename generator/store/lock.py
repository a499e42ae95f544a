"""One build at a time per output folder (or the workers of one distributed extract).

``filelock`` locks ``<out>/.patchatlas.lock``; on Linux and macOS that is an advisory
``flock``, which the kernel releases when the holder exits, even on SIGKILL, so a crashed
build never leaves a stale lock behind. The holder writes its PID and command beside it
(``.patchatlas.lock.holder``: the lock file itself is truncated by whoever tries it), so a
second build can say who holds the folder.

The workers of a distributed extract run together but never beside a build: each holds an
exclusive lock of its own rank (``.patchatlas.lock.rank-R-of-N``) and then checks that no build
holds the folder's lock; a build takes the folder's lock and then checks that no rank lock is
held. Whichever comes second sees the first. (Only exclusive locks: filelock's shared locks are
not in every release this project admits.)

Whoever holds the lock exclusively owns every temporary file and staging folder under the
folder (their names are declared below, in one place): those a killed run of any stage left
are removed on entry (``remove_stale_staging``), so an interrupted build resumed leaves the
same files as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from generator.errors import PatchAtlasError
from generator.hashing import file_sha256
from generator.store.layout import (  # noqa: F401 (the names are re-exported)
    HOLDER_NAME,
    LOCK_NAME,
    MANIFEST_FILE,
    RANK_GLOB,
    RENDER_STAGING_GLOB,
    RENDER_STAGING_PREFIX,
    RUN_DEPENDENT,
    SWAP_LEFTOVER_GLOB,
    TEMPORARY_GLOB,
    holder_path,
    lock_path,
    manifest_path,
    rank_lock_path,
)
from generator.store.manifest import set_aside_unreadable

# A worker's check of the folder's lock holds it for microseconds; another worker checking at
# the same moment waits this long rather than taking the other's check for a build.
WORKER_CHECK_S = 2.0


def _prepare(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(lock_path(out), "a"):
            pass
    except OSError as err:
        raise PatchAtlasError(f"output folder {out}: cannot be written ({err.strerror}); "
                              f"choose another --out or fix its permissions") from err


def _in_use(out: Path, holder: str | None = None) -> PatchAtlasError:
    if holder is None:
        try:
            holder = holder_path(out).read_text().strip()
        except OSError:
            holder = ""
    return PatchAtlasError(f"output folder {out} is in use by {holder or 'another patchatlas process'} (it holds "
                           f"{out / LOCK_NAME}); wait for it to finish or use another --out")


def remove_stale_staging(out: Path) -> list[Path]:
    """Undo what a killed run of any stage left half-done under ``out``; returns what was removed.

    Temporary files (``TEMPORARY_GLOB``, anywhere: tables, shards, variants, layer-wise curves,
    results, manifests of workers and of the folder) and render staging folders
    (``RENDER_STAGING_GLOB``) are deleted. A swap's previous tree (``SWAP_LEFTOVER_GLOB``) is
    put back when the kill came between moving it aside and placing the new one, and deleted
    otherwise, so the folder holds the last complete docs/ and site/.
    """
    stale = [p for p in out.rglob(TEMPORARY_GLOB) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    for folder in sorted(out.glob(RENDER_STAGING_GLOB)):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder)
    for old in sorted(out.glob(SWAP_LEFTOVER_GLOB)):
        final = old.with_name(old.name[1:].removesuffix(".old"))
        if old.is_dir() and not final.exists():
            old.rename(final)
        elif old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            stale.append(old)
    return stale


def comparable_digests(out: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file under ``out`` (relative path → digest), ``RUN_DEPENDENT`` masked:
    the holder file is left out, the manifest is hashed without its run-dependent fields."""
    out = Path(out)
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel == HOLDER_NAME:
            continue
        if rel == MANIFEST_FILE:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                for field in RUN_DEPENDENT[MANIFEST_FILE]:
                    data.pop(field, None)
                body = json.dumps(data, sort_keys=True).encode()
            except (ValueError, TypeError, AttributeError):
                body = path.read_bytes()  # unreadable: compared as it is
            digests[rel] = hashlib.sha256(body).hexdigest()
        else:
            digests[rel] = file_sha256(path)
    return digests


def _running_worker(out: Path) -> str | None:
    """The rank lock some worker holds now, if any (each is tried and let go at once)."""
    for path in sorted(out.glob(RANK_GLOB)):
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return path.name.removeprefix(f"{LOCK_NAME}.")
        lock.release()
    return None


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, worker: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold ``out`` for this process; ``worker=(rank, world_size)`` for a distributed extract's worker."""
    out = Path(out)
    _prepare(out)
    folder_lock = FileLock(lock_path(out), timeout=0)
    if worker:
        rank, world_size = worker
        rank_lock = FileLock(rank_lock_path(out, rank, world_size), timeout=0)
        try:
            rank_lock.acquire()
        except Timeout:
            raise PatchAtlasError(f"output folder {out}: worker {rank} of {world_size} is already running; "
                                  f"give each worker its own RANK") from None
        try:
            try:
                folder_lock.acquire(timeout=WORKER_CHECK_S)
            except Timeout:
                raise _in_use(out) from None
            folder_lock.release()
            yield lock_path(out)
        finally:
            rank_lock.release()
        return
    try:
        folder_lock.acquire()
    except Timeout:
        raise _in_use(out) from None
    try:
        running = _running_worker(out)
        if running:
            raise _in_use(out, f"the workers of a distributed extract ({running} is running)")
        holder_path(out).write_text(f"PID {os.getpid()} ({' '.join(sys.argv[:3])})")
        remove_stale_staging(out)
        set_aside_unreadable(manifest_path(out))
        yield lock_path(out)
    finally:
        folder_lock.release()
