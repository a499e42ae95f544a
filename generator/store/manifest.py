"""The build manifest: which units are done, with what parameters, producing which files.

A unit (e.g. ``extract/<source>/<model>``) is recorded only after all its files are in place,
and the manifest itself is written atomically, so it never claims more than exists. A unit is
reusable when its parameters hash the same and every file it lists still has its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from generator.errors import PatchAtlasError
from generator.store.atomic import atomic_write_json

MANIFEST_VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def params_hash(params: dict) -> str:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Manifest:
    def __init__(self, path: Path, entries: dict | None = None):
        self.path = Path(path)
        self._entries: dict[str, dict] = entries or {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            entries = data["entries"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PatchAtlasError(
                f"{path}: the manifest is unreadable ({err}). Move it aside and rerun: "
                f"finished units will be recomputed."
            ) from err
        return cls(path, entries)

    def save(self) -> None:
        atomic_write_json(self.path, {"version": MANIFEST_VERSION, "entries": self._entries})

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def set(self, key: str, entry: dict) -> None:
        self._entries[key] = {**entry, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def entries(self, prefix: str = "") -> Iterator[tuple[str, dict]]:
        return ((k, v) for k, v in list(self._entries.items()) if k.startswith(prefix))

    def is_done(self, key: str, params: dict, root: str | os.PathLike) -> bool:
        entry = self._entries.get(key)
        if not entry or entry.get("status") != "done" or entry.get("params_hash") != params_hash(params):
            return False
        root = Path(root)
        for rel, digest in entry.get("files", {}).items():
            path = root / rel
            if not path.is_file() or file_sha256(path) != digest:
                return False
        return True
