"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file PatchAtlas writes goes through here: write to a temporary sibling, flush and fsync,
then ``os.replace`` onto the final name (atomic on POSIX within one filesystem).

A full disk or a folder that cannot be written is reported as a ``PatchAtlasError`` naming the
file or folder and what to do; the temporary file is removed and whatever the final path held
before is left as it was, so finished results survive the failed write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from generator.errors import PatchAtlasError
from generator.store.layout import TEMPORARY_SUFFIX, temporary_prefix

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Writers that wrap the system call (Arrow's Parquet writer) keep only its message, not its errno.
_DISK_FULL_MESSAGES = ("no space left on device", "disk quota exceeded")
_NOT_WRITABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# The process's umask, read once at import: reading it means setting it, which is not safe
# while other threads create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_disk_full(err: BaseException) -> bool:
    if not isinstance(err, OSError):
        return False
    return err.errno in _DISK_FULL_ERRNOS or any(m in str(err).lower() for m in _DISK_FULL_MESSAGES)


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB free there now"
    except OSError:
        return "free space unknown"


def disk_full_error(final: Path, err: OSError) -> PatchAtlasError:
    return PatchAtlasError(
        f"{final}: the disk is full ({err.strerror or err}; {_free_space(final.parent)}); free some space on "
        f"that disk or choose another --out, then rerun: {final.name} keeps its previous content and finished "
        f"results are kept")


def not_writable_error(final: Path, err: OSError) -> PatchAtlasError:
    folder = Path(err.filename) if getattr(err, "filename", None) else final.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent  # what could not be created: its folder refused it
    return PatchAtlasError(
        f"{folder}: folder is not writable ({err.strerror or err}), so {final.name} cannot be written there; "
        f"make it writable (chmod u+w) or choose another --out")


def _describe(final: Path, err: OSError) -> PatchAtlasError | None:
    if is_disk_full(err):
        return disk_full_error(final, err)
    if isinstance(err, PermissionError) or err.errno in _NOT_WRITABLE_ERRNOS:
        return not_writable_error(final, err)
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(final), suffix=TEMPORARY_SUFFIX, dir=final.parent)
    except OSError as err:
        raise (_describe(final, err) or err) from err
    os.close(fd)
    # mkstemp makes the file private (0600); a published file gets the mode any new file would.
    os.chmod(tmp_name, 0o666 & ~_UMASK)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as err:
        # Only a full disk is translated when the error comes from the caller's own writing: a
        # permission error there may concern another file than this one.
        if is_disk_full(err):
            raise disk_full_error(final, err) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
