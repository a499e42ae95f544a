"""Publishing a dataset repository folder to the Hugging Face Hub.

The folder (``<out>/datasets/<source>/``, see ``generator.store.repo``) is published with
``HfApi.upload_folder``: the library asks the Hub which files it already holds (by git blob id
or LFS sha256) and sends only the others, and ``delete_patterns`` removes the remote files gone
from the folder (the Hub's ``.gitattributes`` and hidden files stay). A small folder goes up
in one commit, all or nothing; with ``hf_xet`` installed a very large one may be split by the
library into several commits, and running the push again resumes it, sending only what is
still missing.

Before writing, the folder is checked (a card whose every ``data_files`` pattern matches) and
the remote is listed once to report what will be added, changed and deleted (``PushPlan``,
also the whole of a dry run); that comparison is computed locally in one read of each file.

The token comes only from Hugging Face's own mechanisms (``HF_TOKEN``, ``hf auth login`` /
``huggingface-cli login``, or the ``token`` of the ``HfApi`` passed in). It is never printed,
logged or returned, and is scrubbed from the message of every error re-raised from the Hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from generator.errors import PatchAtlasError
from generator.store.repo import CARD_FILE, check_repo_id

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
DEFAULT_BRANCH = "main"
_READ_BLOCK = 1 << 20
# Hub access tokens look like this; scrubbed even when the token in use is not known here.
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
# upload_folder's patterns (fnmatch: "*" crosses "/"): hidden files and folders are never
# uploaded, and only remote files outside hidden folders are candidates for deletion.
HIDDEN_PATTERNS = (".*", "*/.*")
DELETE_PATTERNS = ("[!.]*",)


@dataclass(frozen=True)
class LocalFile:
    """One file of the folder, as the Hub would identify it."""

    path: str  # relative, POSIX separators
    size: int
    sha256: str
    git_blob_id: str


@dataclass(frozen=True)
class PushPlan:
    """What a push would do; each field is a sorted tuple of repository paths."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    deleted: tuple[str, ...]
    remote_exists: bool = True

    @property
    def to_upload(self) -> tuple[str, ...]:
        return tuple(sorted(self.added + self.changed))

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.changed or self.deleted)

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.changed)} changed, {len(self.deleted)} deleted, "
                f"{len(self.unchanged)} unchanged")


@dataclass(frozen=True)
class PushResult:
    """The outcome of ``push_folder``; carries no credentials."""

    repo_id: str
    revision: str
    plan: PushPlan
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    uploaded_bytes: int = 0
    files: dict[str, int] = field(default_factory=dict)  # uploaded path -> size


# --- local side -------------------------------------------------------------------------------

def _is_hidden(relative: PurePosixPath) -> bool:
    # Lock files, half-written temporaries (".name.xxx.tmp") and tool folders (.git, .cache) are
    # never part of the repository; neither is the Hub's own .gitattributes.
    return any(part.startswith(".") for part in relative.parts)


def hash_file(path: str | os.PathLike) -> tuple[int, str, str]:
    """``(size, sha256, git blob id)`` of a file, read once in blocks."""
    size = os.path.getsize(path)
    sha256 = hashlib.sha256()
    blob = hashlib.sha1()
    blob.update(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_READ_BLOCK), b""):
            sha256.update(block)
            blob.update(block)
    return size, sha256.hexdigest(), blob.hexdigest()


def local_files(folder: str | os.PathLike) -> dict[str, LocalFile]:
    """Every file the repository holds, keyed by its path relative to ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise PatchAtlasError(f"{root}: not a folder; pass the dataset repository folder "
                              f"(<out>/datasets/<source>), written by `patchatlas extract`")
    files: dict[str, LocalFile] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = base / name
            relative = PurePosixPath(full.relative_to(root).as_posix())
            if _is_hidden(relative) or not full.is_file():
                continue
            size, sha256, blob_id = hash_file(full)
            files[str(relative)] = LocalFile(str(relative), size, sha256, blob_id)
    return files


def _front_matter(card_text: str, card: Path) -> dict:
    lines = card_text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise PatchAtlasError(f"{card}: the card has no YAML front matter (a block between '---' lines); "
                              f"rerun `patchatlas extract` to write it")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise PatchAtlasError(f"{card}: the YAML front matter is not closed by a '---' line") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as err:
        raise PatchAtlasError(f"{card}: the YAML front matter does not parse ({err})") from None
    if not isinstance(meta, dict):
        raise PatchAtlasError(f"{card}: the YAML front matter is not a mapping")
    return meta


def _data_file_patterns(config: Any, card: Path) -> tuple[str, list[str]]:
    if not isinstance(config, dict) or not config.get("config_name"):
        raise PatchAtlasError(f"{card}: every entry of `configs` needs a config_name; found {config!r}")
    name = str(config["config_name"])
    spec = config.get("data_files")
    if spec is None:
        raise PatchAtlasError(f"{card}: config {name!r} has no data_files")
    entries = spec if isinstance(spec, list) else [spec]
    patterns: list[str] = []
    for entry in entries:
        paths = entry.get("path") if isinstance(entry, dict) else entry
        for path in paths if isinstance(paths, list) else [paths]:
            if not isinstance(path, str) or not path:
                raise PatchAtlasError(f"{card}: config {name!r} has a data_files entry without a path: {entry!r}")
            patterns.append(path)
    return name, patterns


def _glob_regex(pattern: str) -> re.Pattern:
    # The Hub's globs: "*" and "?" stay within one folder, "**" crosses folders.
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def validate_folder(folder: str | os.PathLike, files: dict[str, LocalFile] | None = None) -> dict[str, list[str]]:
    """Check the folder is a publishable dataset repository; return each config's data files.

    It must hold a ``README.md`` card whose YAML lists ``configs``, and every ``data_files``
    pattern of every config must match at least one file of the folder.
    """
    root = Path(folder)
    files = local_files(root) if files is None else files
    card = root / CARD_FILE
    if CARD_FILE not in files:
        raise PatchAtlasError(f"{root}: no {CARD_FILE} dataset card; run `patchatlas extract` for this source "
                              f"first, it writes the card next to the Parquet files")
    meta = _front_matter(card.read_text(encoding="utf-8"), card)
    configs = meta.get("configs")
    if not isinstance(configs, list) or not configs:
        raise PatchAtlasError(f"{card}: the card lists no `configs` in its YAML; rerun `patchatlas extract`")
    matched: dict[str, list[str]] = {}
    for config in configs:
        name, patterns = _data_file_patterns(config, card)
        matched[name] = []
        for pattern in patterns:
            parts = PurePosixPath(pattern).parts
            if pattern.startswith("/") or ".." in parts or "\\" in pattern:
                raise PatchAtlasError(f"{card}: config {name!r}: data_files {pattern!r} must be a relative path "
                                      f"inside the repository")
            regex = _glob_regex(pattern)
            hits = sorted(p for p in files if regex.match(p))
            if not hits:
                raise PatchAtlasError(f"{card}: config {name!r}: no file matches data_files {pattern!r} in {root}; "
                                      f"rerun `patchatlas extract` to write it, or remove the config from the card")
            matched[name].extend(hits)
    return matched


# --- remote side ------------------------------------------------------------------------------

def _secrets(api) -> list[str]:
    found = []
    token = getattr(api, "token", None)
    if isinstance(token, str) and token:
        found.append(token)
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # a broken token file must not hide the error being reported
        stored = None
    if stored:
        found.append(stored)
    return sorted(set(found), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and anything shaped like a Hub token, replaced by ``<token>``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<token>")
    return _TOKEN_PATTERN.sub("<token>", text)


def _hub_error(what: str, repo_id: str, err: BaseException, secrets: list[str]) -> PatchAtlasError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is None and (isinstance(err, OSError) or type(err).__name__ in ("ConnectError", "ConnectTimeout")):
        hint = "the Hub cannot be reached: check the network (and HF_ENDPOINT if set), then run it again"
    else:
        hint = {401: "check your token: `hf auth login` or HF_TOKEN",
                403: "your token cannot write there: use a token with write access to the namespace",
                }.get(status, "run the same command again: only what is still different is uploaded")
    message = scrub(f"{type(err).__name__}: {err}", secrets)
    return PatchAtlasError(f"{repo_id}: {what} failed ({message}); {hint}")


def _check_repo_id(repo_id: str) -> str:
    return check_repo_id(repo_id, "--repo")


def _make_api(api):
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi()


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise PatchAtlasError("the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1); a push needs it: "
                              "unset HF_HUB_OFFLINE")


def remote_files(repo_id: str, *, api, revision: str | None = None) -> dict[str, Any] | None:
    """The remote repository's files (path -> ``RepoFile``), or None when the repo or branch does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        entries = list(api.list_repo_tree(repo_id, repo_type=REPO_TYPE, revision=revision, recursive=True,
                                          expand=True))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
    # Folders come back as entries of their own; only files carry content.
    return {entry.path: entry for entry in entries if hasattr(entry, "blob_id")}


def _same(local: LocalFile, remote) -> bool:
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == local.sha256
    return remote.blob_id == local.git_blob_id


def compare(local: dict[str, LocalFile], remote: dict[str, Any] | None) -> PushPlan:
    """The plan that makes ``remote`` hold exactly ``local`` (hidden remote files are kept)."""
    if remote is None:
        return PushPlan(added=tuple(sorted(local)), changed=(), unchanged=(), deleted=(), remote_exists=False)
    added = sorted(p for p in local if p not in remote)
    changed = sorted(p for p in local if p in remote and not _same(local[p], remote[p]))
    unchanged = sorted(p for p in local if p in remote and _same(local[p], remote[p]))
    deleted = sorted(p for p in remote if p not in local and not _is_hidden(PurePosixPath(p)))
    return PushPlan(tuple(added), tuple(changed), tuple(unchanged), tuple(deleted))


def plan_push(folder: str | os.PathLike, repo_id: str, *, api, revision: str | None = None,
              files: dict[str, LocalFile] | None = None) -> PushPlan:
    """Compare the folder with the remote repository; a missing repo or branch means all is added."""
    _check_repo_id(repo_id)
    files = local_files(folder) if files is None else files
    secrets = _secrets(api)
    try:
        remote = remote_files(repo_id, api=api, revision=revision)
    except Exception as err:
        raise _hub_error("listing the remote files", repo_id, err, secrets) from None
    return compare(files, remote)


def _default_message(plan: PushPlan) -> str:
    return f"PatchAtlas: {plan.summary()}"


def push_folder(folder: str | os.PathLike, repo_id: str, *, api=None, dry_run: bool = False, private: bool = False,
                revision: str | None = None, commit_message: str | None = None) -> PushResult:
    """Publish ``folder`` as the dataset repository ``repo_id`` in one commit of only what differs.

    ``dry_run`` lists the remote and returns the plan without writing anything. ``private``
    applies when the repository is created. ``revision``: the branch to commit to (created from
    ``main`` when missing); default ``main``.
    """
    _check_repo_id(repo_id)
    _check_online()
    files = local_files(folder)
    validate_folder(folder, files)
    api = _make_api(api)
    secrets = _secrets(api)
    if not dry_run and not secrets:
        raise PatchAtlasError("no Hugging Face token found: run `hf auth login` (or `huggingface-cli login`) "
                              "or set HF_TOKEN to a token with write access")
    plan = plan_push(folder, repo_id, api=api, revision=revision, files=files)
    branch = revision or DEFAULT_BRANCH
    log.info("push %s -> %s@%s: %s", folder, repo_id, branch, plan.summary())
    if dry_run or plan.is_empty:
        return PushResult(repo_id, branch, plan, dry_run)

    try:
        if not plan.remote_exists:
            api.create_repo(repo_id, repo_type=REPO_TYPE, exist_ok=True, private=private)
            if branch != DEFAULT_BRANCH:
                api.create_branch(repo_id, branch=branch, repo_type=REPO_TYPE, exist_ok=True)
        # The library uploads what the Hub does not already hold (it drops unchanged files after
        # asking the Hub for their ids) and deletes the remote files gone from the folder.
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=REPO_TYPE, revision=revision,
                                 commit_message=commit_message or _default_message(plan),
                                 ignore_patterns=list(HIDDEN_PATTERNS), delete_patterns=list(DELETE_PATTERNS))
    except Exception as err:
        raise _hub_error("the push", repo_id, err, secrets) from None
    uploaded = {p: files[p].size for p in plan.to_upload}
    return PushResult(repo_id, branch, plan, dry_run, commit_url=str(info.commit_url), commit_oid=info.oid,
                      uploaded_bytes=sum(uploaded.values()), files=uploaded)
