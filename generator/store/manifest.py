"""The build manifest: which units are done, with what parameters, producing which files.

A unit (``extract/<source>/<model>``, ``analyze/...``) is recorded only after all its files are
in place, and the manifest itself is written atomically, so it never claims more than exists.
A unit is reusable when its parameters hash the same and every file it lists still has its
hash.

On disk (JSON)::

    {"version": 1,
     "entries": {"<key>": {"status": "done" | "skipped", "params": {...}, "params_hash": "...",
                           "files": {"<path relative to the unit's root>": "<sha256>"},
                           "reason": "<why, for skips>", ...}},
     "updated_at": {"<key>": "<ISO time>"},
     "file_stats": {"<path relative to the manifest's folder>": [size, mtime_ns, inode, "<sha256>"]}}

Entries hold only what a rerun reproduces; when they were written lives apart, under
``updated_at``, so two builds of the same inputs record the same entries. ``file_stats`` is a
cache of file hashes: a file whose size, modification time and inode are those recorded when it
was hashed is not read again, so a rerun over finished units reads no table. Any rewrite (the
atomic writes replace the inode; an edit in place moves mtime) makes it hash the file again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from generator.errors import PatchAtlasError
from generator.hashing import file_sha256
from generator.store.atomic import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Where an unreadable manifest is moved by the run that finds it (``set_aside_unreadable``).
UNREADABLE_SUFFIX = ".unreadable"
STATUSES = ("done", "skipped")


def to_json_value(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data: numpy scalars and arrays, tuples and paths converted.

    Anything else that JSON cannot hold is refused rather than stringified, so a value never
    silently changes type between a run and the manifest it leaves.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist(), where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise PatchAtlasError(f"{where}: key {k!r} is not a string; manifest keys must be strings")
            out[k] = to_json_value(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise PatchAtlasError(f"{where}: {type(value).__name__} {value!r} cannot be recorded in the manifest; "
                          f"pass plain numbers, strings, lists or dicts")


def params_hash(params: dict) -> str:
    """SHA-256 of the canonical JSON of ``params`` (sorted keys, no spaces)."""
    canonical = json.dumps(to_json_value(params, "params"), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_entry(key: str, entry: dict) -> dict:
    entry = to_json_value(entry, key)
    status = entry.get("status")
    if status is not None and status not in STATUSES:
        raise PatchAtlasError(f"manifest entry {key!r}: status {status!r} is not one of {STATUSES}")
    if status == "skipped" and not entry.get("reason"):
        raise PatchAtlasError(f"manifest entry {key!r}: a skipped unit needs a reason")
    if "params" in entry:
        expected = params_hash(entry["params"])
        if entry.setdefault("params_hash", expected) != expected:
            raise PatchAtlasError(f"manifest entry {key!r}: params_hash does not match its params")
    files = entry.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise PatchAtlasError(f"manifest entry {key!r}: files must map relative paths to sha256 strings")
    return entry


class Manifest:
    """The manifest of one output folder, loaded into memory; ``save()`` writes it back."""

    def __init__(self, path: str | os.PathLike, entries: dict | None = None, updated_at: dict | None = None,
                 file_stats: dict | None = None):
        self.path = Path(path)
        self._entries: dict[str, dict] = dict(entries or {})
        self._updated_at: dict[str, str] = dict(updated_at or {})
        self._file_stats: dict[str, list] = dict(file_stats or {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """The manifest at ``path``; an empty one when the file does not exist yet."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries, updated_at = data["entries"], data.get("updated_at", {})
            if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                raise TypeError("entries must be an object of objects")
            if not isinstance(updated_at, dict):
                raise TypeError("updated_at must be an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise PatchAtlasError(
                f"{path}: the manifest is unreadable ({err}). Delete it (or move it aside) and rerun; "
                f"finished units will then be recomputed."
            ) from err
        # Manifests that kept the time inside each entry: move it out.
        for key, entry in entries.items():
            if "updated_at" in entry:
                updated_at.setdefault(key, entry.pop("updated_at"))
        # A damaged cache costs only rehashing; it never makes the manifest unreadable.
        file_stats = data.get("file_stats")
        return cls(path, entries, updated_at, file_stats if isinstance(file_stats, dict) else None)

    def save(self) -> Path:
        return atomic_write_json(self.path, {"version": MANIFEST_VERSION, "entries": self._entries,
                                             "updated_at": self._updated_at, "file_stats": self._file_stats})

    def sha256(self, path: str | os.PathLike) -> str:
        """``file_sha256(path)``, read from the cache while the file's size, mtime and inode are
        those it had when hashed (``save()`` keeps the cache)."""
        path = Path(path)
        stat = path.stat()
        name = self._cache_name(path)
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        cached = self._file_stats.get(name)
        if isinstance(cached, list) and len(cached) == 4 and cached[:3] == signature:
            return cached[3]
        return self.remember_sha256(path, file_sha256(path))

    def remember_sha256(self, path: str | os.PathLike, digest: str) -> str:
        """Cache ``digest`` as the hash of ``path`` as it is now: for a file just written and
        hashed by its writer, so that no later step reads it again to hash it."""
        stat = os.stat(path)
        self._file_stats[self._cache_name(Path(path))] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, digest]
        return digest

    def _cache_name(self, path: Path) -> str:
        """A file's name in the cache: relative to the manifest's folder when inside it (so the
        folder can move), else absolute (a checkpoint elsewhere)."""
        absolute = os.path.abspath(path)
        root = os.path.abspath(self.path.parent)
        if absolute.startswith(root + os.sep):
            return Path(os.path.relpath(absolute, root)).as_posix()
        return absolute

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def set(self, key: str, entry: dict) -> None:
        """Record ``entry`` under ``key`` (in memory; ``save()`` writes it).

        Call it only once every file the entry lists is written. ``params_hash`` is filled in
        from ``params`` when absent.
        """
        self._entries[key] = _check_entry(key, entry)
        self._updated_at[key] = datetime.now(UTC).isoformat(timespec="seconds")

    def remove(self, key: str) -> None:
        self._entries.pop(key, None)
        self._updated_at.pop(key, None)

    def merge(self, other: Manifest) -> None:
        """Take ``other``'s entries that this manifest lacks or holds in an older state.

        Used to fold the manifests of a distributed run's workers into the main one: workers
        record disjoint shards, so an entry is new, or the same as here, or newer than here.
        """
        for key, entry in other._entries.items():
            theirs, ours = other._updated_at.get(key, ""), self._updated_at.get(key, "")
            if key not in self._entries or theirs >= ours:
                self._entries[key] = entry
                if theirs:
                    self._updated_at[key] = theirs

    def updated_at(self, key: str) -> str | None:
        return self._updated_at.get(key)

    def entries(self, prefix: str = "") -> Iterator[tuple[str, dict]]:
        return ((k, v) for k, v in list(self._entries.items()) if k.startswith(prefix))

    def is_done(self, key: str, params: dict, root: str | os.PathLike) -> bool:
        """True when ``key`` is done with these params and every file it lists is unchanged under ``root``."""
        entry = self._entries.get(key)
        if not entry or entry.get("status") != "done" or entry.get("params_hash") != params_hash(params):
            return False
        root = Path(root)
        for rel, digest in entry.get("files", {}).items():
            path = root / rel
            # Only a unit recorded with these very parameters gets here, so a file that is gone
            # or has other bytes was changed behind the build's back: say so, then recompute.
            if not path.is_file():
                log.warning("%s: recorded in %s but missing; %s is recomputed", path, self.path.name, key)
                return False
            if self.sha256(path) != digest:
                log.warning("%s: changed since it was written (its sha256 is not the one %s recorded); "
                            "%s is recomputed", path, self.path.name, key)
                return False
        return True


def set_aside_unreadable(path: str | os.PathLike) -> Path | None:
    """Move an unreadable (corrupted, truncated) manifest to ``<name>.unreadable``, so the run
    rebuilds what it recorded rather than trusting it; returns where it went, or None."""
    path = Path(path)
    try:
        Manifest.load(path)
        return None
    except PatchAtlasError as err:
        aside = path.with_name(path.name + UNREADABLE_SUFFIX)
        os.replace(path, aside)
        log.warning("%s: the manifest is unreadable (%s); moved aside to %s, and everything it recorded is "
                    "checked and rebuilt", path, err.__cause__ or err, aside.name)
        return aside
