"""Publishing a dataset repository to the Hub, against a local stand-in for the Hub's HTTP API.

The stand-in implements what huggingface_hub calls for a push: repo creation, the recursive
tree listing, branch creation, README metadata validation, preupload (answering "regular" for
every file, so content travels base64-encoded inside the commit and no LFS / Xet transfer is
needed) and the NDJSON commit; and what ``datasets.load_dataset`` calls to read a repository:
its info at a revision, paths-info, and file downloads (``resolve``). It keeps each repository's files in memory and records every
request; the Authorization header is kept apart so the test can show the token reached the
server and nowhere else.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from generator.errors import PatchAtlasError
from generator.store.parquet import PatchTableWriter, write_images_shards
from generator.store.push import compare, local_files, plan_push, push_folder, scrub, validate_folder
from generator.store.repo import ConfigCardInfo, write_dataset_card

# Not shaped like a Hub token, so only scrubbing the token in use (not the pattern) can hide it.
PLANTED_TOKEN = "hf_Planted-Secret-Token-0123456789"
REPO = "atlas-org/patchatlas-test"

CARD = """---
license: "cc-by-4.0"
configs:
  - config_name: "tiny-L01-postnorm"
    data_files:
      - split: train
        path: "tiny/L01-postnorm/*.parquet"
---

# A tiny dataset repository
"""


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHub:
    """In-memory repositories: repo id -> branch -> path -> bytes."""

    repos: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    private: dict[str, bool] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    fail_commits: int = 0
    commits: int = 0
    heads: dict[tuple[str, str], str] = field(default_factory=dict)  # (repo, branch) -> last commit
    lock: threading.Lock = field(default_factory=threading.Lock)

    def posts(self, kind: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and f"/{kind}" in r.path]


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _make_handler(hub: FakeHub, endpoint: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output quiet
            pass

        def _reply(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self, code: str, what: str) -> None:
            self._reply(404, {"error": what}, {"X-Error-Code": code, "X-Error-Message": what})

        def _handle(self) -> None:
            body = _read_body(self) if self.command == "POST" else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            with hub.lock:
                hub.requests.append(Recorded(self.command, self.path, headers, body))
                hub.authorizations.append(self.headers.get("Authorization", ""))
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.split("/")[1:]]
                route = self._route(parts, body)
            route()

        def _route(self, parts: list[str], body: bytes):
            # /api/repos/create
            if parts[:3] == ["api", "repos", "create"] and self.command == "POST":
                return lambda: self._create_repo(json.loads(body))
            if parts[:2] == ["api", "validate-yaml"]:
                return lambda: self._reply(200, {"errors": [], "warnings": []})
            # /datasets/{org}/{name}/resolve/{rev}/{path...}: a file's bytes, as downloads get them
            if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                repo_id, rev, path = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
                files, sha = _at(hub, repo_id, rev)
                if files is None or path not in files:
                    return lambda: self._not_found("EntryNotFound", f"{path} not found")
                return lambda: self._send_file(files[path], sha)
            # /api/datasets/{org}/{name}/{action}/{rev}[/{path...}]
            if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] in ("revision", "paths-info", "tree"):
                repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                files, sha = _at(hub, repo_id, rev)
                if repo_id not in hub.repos:
                    return lambda: self._not_found("RepoNotFound", f"Repository {repo_id} not found")
                if files is None:
                    return lambda: self._not_found("RevisionNotFound", f"Invalid rev id: {rev}")
                if action == "revision":
                    return lambda: self._reply(200, {"id": repo_id, "sha": sha, "private": False,
                                                     "siblings": [{"rfilename": p} for p in sorted(files)]})
                if action == "tree":
                    return lambda: self._reply(200, _tree(files, "/".join(parts[6:])))
                wanted = set(parse_qs(body.decode()).get("paths", [])) if body else set()
                if body and body.lstrip().startswith(b"{"):
                    wanted = set(json.loads(body).get("paths", []))
                return lambda: self._reply(200, [e for e in _tree(files, "") if e["path"] in wanted])
            if parts[:2] == ["api", "datasets"] and len(parts) >= 6:
                repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                if repo_id not in hub.repos:
                    return lambda: self._not_found("RepoNotFound", f"Repository {repo_id} not found")
                branches = hub.repos[repo_id]
                if action == "branch" and self.command == "POST":
                    return lambda: self._create_branch(branches, rev, json.loads(body or b"{}"))
                if rev not in branches:
                    return lambda: self._not_found("RevisionNotFound", f"Invalid rev id: {rev}")
                files = branches[rev]
                if action == "preupload" and self.command == "POST":
                    return lambda: self._preupload(files, json.loads(body))
                if action == "commit" and self.command == "POST":
                    return lambda: self._commit(repo_id, files, rev, body)
            return lambda: self._reply(404, {"error": f"not implemented here: {self.command} {self.path}"})

        def _send_file(self, data: bytes, sha: str) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{_git_blob_id(data)}"')
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _create_repo(self, payload: dict) -> None:
            assert payload["type"] == "dataset"
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                self._reply(409, {"error": "You already created this dataset repo", "url": repo_id})
                return
            # The Hub starts every repository with a .gitattributes of its own.
            hub.repos[repo_id] = {"main": {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"}}
            hub.private[repo_id] = payload.get("visibility") == "private"
            self._reply(200, {"url": f"{endpoint}/datasets/{repo_id}"})

        def _create_branch(self, branches: dict, branch: str, payload: dict) -> None:
            if branch in branches:
                self._reply(409, {"error": f"Reference already exists: {branch}"})
                return
            branches[branch] = dict(branches[payload.get("startingPoint") or "main"])
            self._reply(200, {})

        def _preupload(self, files: dict[str, bytes], payload: dict) -> None:
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                       "oid": _git_blob_id(files[f["path"]]) if f["path"] in files else None}
                      for f in payload["files"]]
            self._reply(200, {"files": answer, "commitOid": "0" * 40})

        def _commit(self, repo_id: str, files: dict[str, bytes], rev: str, body: bytes) -> None:
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                # A careless server error that echoes the credentials it was sent.
                self._reply(500, {"error": f"storage failure while handling {self.headers.get('Authorization')}"})
                return
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            assert lines[0]["key"] == "header"
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    assert value["encoding"] == "base64"
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    if value["path"] not in files:
                        self._not_found("EntryNotFound", "A file with this name doesn't exist")
                        return
                    del files[value["path"]]
                else:
                    self._reply(400, {"error": f"operation {line['key']} is not supported here"})
                    return
            hub.commits += 1
            oid = hashlib.sha1(f"{repo_id}@{hub.commits}".encode()).hexdigest()
            hub.heads[(repo_id, rev)] = oid
            self._reply(200, {"commitUrl": f"{endpoint}/datasets/{repo_id}/commit/{oid}", "commitOid": oid,
                              "pullRequestUrl": None})

        do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _handle

    return Handler


def _at(hub: FakeHub, repo_id: str, rev: str) -> tuple[dict[str, bytes] | None, str]:
    """A repository's files at a branch or at the commit a branch points to, and that commit."""
    branches = hub.repos.get(repo_id, {})
    for (repo, branch), oid in hub.heads.items():
        if repo == repo_id and rev == oid:
            return branches.get(branch), oid
    return branches.get(rev), hub.heads.get((repo_id, rev), "0" * 40)


def _tree(files: dict[str, bytes], under: str) -> list[dict]:
    prefix = f"{under}/" if under else ""
    entries, folders = [], set()
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parents = path.split("/")[:-1]
        folders.update("/".join(parents[:i + 1]) for i in range(len(parents)))
        entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_id(data)}
        if path.endswith(".parquet"):
            # As on the Hub, binary data lives in LFS: its blob id is that of the pointer file.
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            entry["oid"] = _git_blob_id(pointer.encode())
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
        entries.append(entry)
    entries += [{"type": "directory", "path": f, "oid": "1" * 40, "size": 0} for f in sorted(folders)]
    return entries


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    server.RequestHandlerClass = _make_handler(fake, endpoint)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.endpoint = endpoint
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=PLANTED_TOKEN)


def _write_repo(root, seed: int = 0):
    """A small dataset repository: the card and one tiny Parquet table of patch tokens."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(CARD, encoding="utf-8")
    rng = np.random.default_rng(seed)
    with PatchTableWriter(root / "tiny/L01-postnorm/train-00000-of-00001.parquet", dim=8) as writer:
        writer.write_batch(["img0", "img1"], rng.standard_normal((2, 2, 2, 8)).astype(np.float32),
                           rng.integers(0, 3, size=(2, 2, 2)).astype(np.int16))
    return root


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _commit_lines(request) -> list[dict]:
    return [json.loads(line) for line in request.body.splitlines() if line.strip()]


def _committed(request) -> tuple[dict[str, bytes], list[str]]:
    lines = _commit_lines(request)
    added = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines if ln["key"] == "file"}
    deleted = [ln["value"]["path"] for ln in lines if ln["key"].startswith("deleted")]
    return added, deleted


def _folder_bytes(root) -> dict[str, bytes]:
    return {p: (root / p).read_bytes() for p in local_files(root)}


def _assert_no_token(*texts: str) -> None:
    for text in texts:
        assert PLANTED_TOKEN not in text


def test_first_push_commits_every_file_once_and_token_stays_secret(hub, api, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    root = _write_repo(tmp_path / "repo")
    (root / ".lock").write_text("pid 1")  # hidden files are not part of the repository

    result = push_folder(root, REPO, api=api, private=True)

    commits = hub.posts("commit")
    assert len(commits) == 1
    added, deleted = _committed(commits[0])
    expected = _folder_bytes(root)
    assert set(expected) == {"README.md", "tiny/L01-postnorm/train-00000-of-00001.parquet"}
    assert added == expected and deleted == []
    assert hub.repos[REPO]["main"] == {**expected, ".gitattributes": hub.repos[REPO]["main"][".gitattributes"]}
    assert hub.private[REPO] is True
    assert result.plan.added == tuple(sorted(expected)) and not result.plan.remote_exists
    assert result.files == {p: len(b) for p, b in expected.items()} and result.commit_oid
    # The token reached the server, and only there.
    assert all(a == f"Bearer {PLANTED_TOKEN}" for a in hub.authorizations) and hub.authorizations
    out, err = capfd.readouterr()
    _assert_no_token(repr(result), caplog.text, out, err,
                     *(json.dumps(r.headers) + r.body.decode("latin-1") for r in hub.requests))
    assert any("push" in m for m in caplog.messages)  # the capture did see the push's own log


def test_second_push_sends_only_the_changed_file(hub, api, tmp_path):
    root = _write_repo(tmp_path / "repo")
    push_folder(root, REPO, api=api)
    hub.requests.clear()
    _write_repo(root, seed=1)  # new tokens, same card
    plan = plan_push(root, REPO, api=api)
    assert plan.changed == ("tiny/L01-postnorm/train-00000-of-00001.parquet",)
    assert plan.unchanged == ("README.md",) and plan.added == plan.deleted == ()

    push_folder(root, REPO, api=api)

    commits = hub.posts("commit")
    assert len(commits) == 1
    added, deleted = _committed(commits[0])
    parquet = "tiny/L01-postnorm/train-00000-of-00001.parquet"
    assert added == {parquet: (root / parquet).read_bytes()} and deleted == []
    # upload_folder offers every file and drops those the Hub already holds (same id), so the
    # unchanged card was asked about but not sent.
    offered = {f["path"] for r in hub.posts("preupload") for f in json.loads(r.body)["files"]}
    assert offered == {parquet, "README.md"}
    assert hub.posts("repos/create") == []  # the repository existed: nothing to create

    hub.requests.clear()
    again = push_folder(root, REPO, api=api)
    assert again.plan.is_empty and again.commit_oid is None and hub.posts("commit") == []


def test_a_file_deleted_locally_is_deleted_remotely_but_hub_files_stay(hub, api, tmp_path):
    root = _write_repo(tmp_path / "repo")
    extra = root / "tiny/L02-postnorm/train-00000-of-00001.parquet"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(b"PAR1 not really parquet")
    push_folder(root, REPO, api=api)
    assert "tiny/L02-postnorm/train-00000-of-00001.parquet" in hub.repos[REPO]["main"]
    hub.requests.clear()
    extra.unlink()

    result = push_folder(root, REPO, api=api)

    assert result.plan.deleted == ("tiny/L02-postnorm/train-00000-of-00001.parquet",)
    (commit,) = hub.posts("commit")
    added, deleted = _committed(commit)
    assert added == {} and deleted == ["tiny/L02-postnorm/train-00000-of-00001.parquet"]
    assert set(hub.repos[REPO]["main"]) == {".gitattributes", *local_files(root)}


def test_dry_run_plans_without_writing(hub, api, tmp_path):
    root = _write_repo(tmp_path / "repo")
    result = push_folder(root, REPO, api=api, dry_run=True)
    assert result.dry_run and result.commit_url is None
    assert result.plan.added == tuple(sorted(local_files(root))) and not result.plan.remote_exists
    assert [r.method for r in hub.requests if r.method != "GET"] == []
    assert REPO not in hub.repos

    push_folder(root, REPO, api=api)
    (root / "README.md").write_text(CARD + "\nMore text.\n", encoding="utf-8")
    hub.requests.clear()
    result = push_folder(root, REPO, api=api, dry_run=True)
    assert result.plan.changed == ("README.md",) and result.plan.unchanged
    assert all(r.method == "GET" for r in hub.requests) and hub.requests


def test_push_to_a_new_branch_creates_it(hub, api, tmp_path):
    root = _write_repo(tmp_path / "repo")
    push_folder(root, REPO, api=api)
    (root / "README.md").write_text(CARD + "\nDraft.\n", encoding="utf-8")
    result = push_folder(root, REPO, api=api, revision="draft")
    assert result.revision == "draft"
    assert hub.repos[REPO]["draft"]["README.md"] == (root / "README.md").read_bytes()
    assert hub.repos[REPO]["main"]["README.md"] == CARD.encode()


def test_interrupted_push_raises_without_token_and_rerun_completes(hub, api, tmp_path, caplog, capfd,
                                                                    monkeypatch):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    root = _write_repo(tmp_path / "repo")
    # huggingface_hub retries a server error a few times: the commit fails every time here,
    # and the retries do not wait.
    hub.fail_commits = 1000
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)

    with pytest.raises(PatchAtlasError) as caught:
        push_folder(root, REPO, api=api)
    hub.fail_commits = 0

    message = str(caught.value)
    assert REPO in message and "500" in message and "<token>" in message  # the echoed token was scrubbed
    formatted = "".join(traceback.format_exception(caught.value))
    out, err = capfd.readouterr()
    _assert_no_token(message, formatted, caplog.text, out, err)
    assert set(hub.repos[REPO]["main"]) == {".gitattributes"}  # nothing landed

    hub.requests.clear()
    push_folder(root, REPO, api=api)
    (commit,) = hub.posts("commit")
    added, _ = _committed(commit)
    assert added == _folder_bytes(root)


def test_folder_without_card_is_rejected_before_any_request(hub, api, tmp_path):
    root = _write_repo(tmp_path / "repo")
    (root / "README.md").unlink()
    with pytest.raises(PatchAtlasError, match="README.md"):
        push_folder(root, REPO, api=api)
    assert hub.requests == []


def test_card_whose_data_files_are_missing_is_rejected(tmp_path):
    root = _write_repo(tmp_path / "repo")
    validate_folder(root)  # the complete folder passes
    (root / "tiny/L01-postnorm/train-00000-of-00001.parquet").unlink()
    with pytest.raises(PatchAtlasError, match=r"tiny-L01-postnorm.*tiny/L01-postnorm/\*\.parquet"):
        validate_folder(root)
    (root / "README.md").write_text("# no front matter\n", encoding="utf-8")
    with pytest.raises(PatchAtlasError, match="front matter"):
        validate_folder(root)


def test_offline_mode_and_missing_token_are_reported(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    root = _write_repo(tmp_path / "repo")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PatchAtlasError, match="no Hugging Face token"):
        push_folder(root, REPO, api=HfApi(endpoint=hub.endpoint, token=False))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PatchAtlasError, match="HF_HUB_OFFLINE"):
        push_folder(root, REPO, api=HfApi(endpoint=hub.endpoint, token=PLANTED_TOKEN))
    assert hub.requests == []
    with pytest.raises(PatchAtlasError, match="ORG/NAME"):
        push_folder(root, "no-namespace", api=None)


def test_compare_uses_lfs_sha256_or_git_blob_id(tmp_path):
    from huggingface_hub.hf_api import RepoFile

    (tmp_path / "a.txt").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    local = local_files(tmp_path)
    remote = {
        "a.txt": RepoFile(path="a.txt", size=5, oid=_git_blob_id(b"alpha")),
        "b.bin": RepoFile(path="b.bin", size=4, oid="f" * 40,
                          lfs={"oid": hashlib.sha256(b"BETA").hexdigest(), "size": 4, "pointerSize": 1}),
        "gone.txt": RepoFile(path="gone.txt", size=1, oid="e" * 40),
        ".gitattributes": RepoFile(path=".gitattributes", size=1, oid="d" * 40),
    }
    plan = compare(local, remote)
    assert plan.unchanged == ("a.txt",) and plan.changed == ("b.bin",)
    assert plan.deleted == ("gone.txt",) and plan.added == ()
    remote["b.bin"].lfs = type(remote["b.bin"].lfs)(size=4, sha256=hashlib.sha256(b"beta").hexdigest(),
                                                     pointer_size=1)
    assert compare(local, remote).unchanged == ("a.txt", "b.bin")
    assert _git_blob_id(b"alpha") == local["a.txt"].git_blob_id


def test_scrub_removes_known_and_token_shaped_secrets():
    text = f"failed for Bearer {PLANTED_TOKEN} and hf_OtherTokenABCDEFGH12"
    cleaned = scrub(text, [PLANTED_TOKEN])
    assert PLANTED_TOKEN not in cleaned and "hf_Other" not in cleaned and cleaned.count("<token>") == 2
    assert scrub(text, []) == f"failed for Bearer {PLANTED_TOKEN} and <token>"


def test_a_pushed_dataset_loads_with_the_card_example_unchanged(hub, api, tmp_path):
    """The card's own example, run as a user would, loads the pushed copy from the (fake) Hub.

    The example is run as written in a fresh process whose HF_ENDPOINT is the stand-in Hub:
    the same calls as against huggingface.co (repository info, file listing, downloads), with
    an empty datasets cache, so nothing local can answer for the Hub.
    """
    root = _write_repo(tmp_path / "repo")
    png = _png(np.zeros((4, 4), np.uint8))
    write_images_shards(root / "images", [{"image_id": "img0", "image_png": png, "mask_png": png,
                                            "width": 4, "height": 4}], shard_bytes=1 << 20)
    card = ConfigCardInfo(name="tiny-L01-postnorm", data_files="tiny/L01-postnorm/*.parquet", model="tiny",
                          model_id="random", revision="", layer=1, norm="postnorm", input_size=32, patch_size=16,
                          label_rule="majority", dim=8, num_rows=8, num_bytes=1, license="apache-2.0")
    write_dataset_card(root, {"name": "patchatlas-test", "license": "CC0-1.0", "repo_id": REPO}, [card])
    push_folder(root, REPO, api=api)

    code = re.search(r"```python\n(.*?)```", (root / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    assert f'load_dataset("{REPO}", "tiny-L01-postnorm", split="train")' in code
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_ENDPOINT": hub.endpoint,
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_CACHE": str(tmp_path / "ds-cache"),
           "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "NO_PROXY": "127.0.0.1,localhost"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_rows: 8" in result.stdout and "embedding" in result.stdout
    downloads = [r.path for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    assert any(p.endswith("tiny/L01-postnorm/train-00000-of-00001.parquet") for p in downloads)
