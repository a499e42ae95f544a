"""The one file-hash helper: every recorded file hash (manifest entries, checkpoints, a local
folder's revision) is the SHA-256 of the file's bytes. At the base of the package so that every
layer can use it."""

from __future__ import annotations

import hashlib
import os

_READ_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks so large tables never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
