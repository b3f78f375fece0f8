"""A local Hugging Face Hub for tests: real `huggingface_hub`/`transformers` clients push to it and load from it.

It serves the endpoints huggingface_hub 2.x calls for `create_repo`, `whoami`, `repo_info`/`model_info`,
`create_branch`, `list_repo_tree`/`list_repo_files`, `get_paths_info`, `preupload` + `commit` (what `upload_folder`,
`create_commit` and `push_to_hub` use), README metadata validation, and `resolve` (GET and HEAD, what
`hf_hub_download`/`from_pretrained` use). Preupload answers "regular" for every file, so all content travels inline
in the commit (base64) and no LFS/Xet transfer is needed; fine for test checkpoints of a few MB.

Storage is plain files under `root`: one folder per repo (`root/models/<namespace>/<name>/`) holding `repo.json`
(privacy, branches, and every commit as a full `path -> blob id` map) and `blobs/<git blob sha1>`. Revisions are
branch names or 40-hex commit ids. Any `Authorization: Bearer ...` token is accepted; writes need one.

    with LocalHub(tmp_path / "hub") as hub:
        run_python("from huggingface_hub import create_repo; create_repo('me/x')", hub.env(tmp_path / "hf_home"))

Standalone: `python tests/hub_server.py --port 0 --root DIR` prints the URL and serves until interrupted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

logger = logging.getLogger("nlip.hub_server")

DEFAULT_USER = "nlip-tester"
REPO_TYPES = ("model", "dataset", "space")
# What the Hub puts in a new repo's first commit (abridged): LFS patterns for binary weights.
INITIAL_GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
REPO_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
YAML_BLOCK = re.compile(r"^\s*---(?:\r\n|\r|\n)([\S\s]*?)(?:\r\n|\r|\n)---[ \t]*(?:\r\n|\n|$)")
# Environment variables a client subprocess must not inherit: they would make it offline or look elsewhere.
_CLIENT_ENV_DROP = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH")


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON `{"error": message}` plus `X-Error-Code` when set."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_oid(content: bytes) -> str:
    """The git blob id of `content`: what the Hub reports as a regular file's `oid`/`blobId`/`ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a README (`{}` when there is none); ValueError when it is not a mapping."""
    match = YAML_BLOCK.match(text)
    if match is None:
        return {}
    metadata = yaml.safe_load(match.group(1))
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"README metadata must be a YAML mapping, got {type(metadata).__name__}.")
    return metadata


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid file path {path!r}.")
    return path


class HubStore:
    """Repos, branches and commits kept on disk under `root`; every method raises `HubError` for what the Hub refuses."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock = threading.Lock()

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if not REPO_ID.fullmatch(repo_id):
            raise HubError(400, f"Invalid repo id {repo_id!r}; expected 'namespace/name' of letters, digits, '-', '_', '.'.")
        return self.root / f"{repo_type}s" / repo_id

    def load(self, repo_type: str, repo_id: str) -> dict:
        """The repo's state (`private`, `createdAt`, `refs`: branch -> commit id, `commits`: id -> commit)."""
        state_file = self._repo_dir(repo_type, repo_id) / "repo.json"
        if not state_file.is_file():
            raise HubError(404, f"Repository {repo_id!r} not found.", "RepoNotFound")
        return json.loads(state_file.read_text())

    def _save(self, repo_type: str, repo_id: str, state: dict) -> None:
        state_file = self._repo_dir(repo_type, repo_id) / "repo.json"
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_file)

    @staticmethod
    def resolve(state: dict, revision: str) -> str:
        """The commit id a branch name or full commit id points to."""
        if revision in state["refs"]:
            return state["refs"][revision]
        if revision in state["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def read_blob(self, repo_type: str, repo_id: str, oid: str) -> bytes:
        return (self._repo_dir(repo_type, repo_id) / "blobs" / oid).read_bytes()

    def blob_size(self, repo_type: str, repo_id: str, oid: str) -> int:
        return (self._repo_dir(repo_type, repo_id) / "blobs" / oid).stat().st_size

    def _write_blob(self, repo_type: str, repo_id: str, content: bytes) -> str:
        oid = git_blob_oid(content)
        blob = self._repo_dir(repo_type, repo_id) / "blobs" / oid
        if not blob.exists():
            blob.write_bytes(content)
        return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> None:
        """A new repo whose `main` branch has one commit with `.gitattributes`; 409 when it exists."""
        with self._lock:
            repo_dir = self._repo_dir(repo_type, repo_id)
            if (repo_dir / "repo.json").exists():
                raise HubError(409, "You already created this repo.")
            (repo_dir / "blobs").mkdir(parents=True)
            state = {"private": private, "createdAt": _now(), "refs": {}, "commits": {}}
            gitattributes = self._write_blob(repo_type, repo_id, INITIAL_GITATTRIBUTES.encode())
            self._add_commit(state, "main", {".gitattributes": gitattributes}, "initial commit", "")
            self._save(repo_type, repo_id, state)

    @staticmethod
    def _add_commit(state: dict, branch: str, files: dict[str, str], summary: str, description: str) -> str:
        parent = state["refs"].get(branch)
        # A counter in the hashed record keeps ids unique even for identical trees and messages.
        record = {"parent": parent, "files": files, "summary": summary, "description": description,
                  "number": len(state["commits"]) + 1}
        oid = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        state["commits"][oid] = {**record, "date": _now()}
        state["refs"][branch] = oid
        return oid

    def commit(self, repo_type: str, repo_id: str, branch: str, header: dict, operations: list[dict]) -> str:
        """Apply NDJSON commit `operations` (inline `file`, `deletedFile`, `deletedFolder`) on top of `branch`."""
        with self._lock:
            state = self.load(repo_type, repo_id)
            if branch not in state["refs"]:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch).", "RevisionNotFound")
            head = state["refs"][branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(412, f"Parent commit {parent} is not the head of {branch!r} ({head}).")
            files = dict(state["commits"][head]["files"])
            for operation in operations:
                kind, value = operation.get("key"), operation.get("value", {})
                path = str(value.get("path", ""))
                path = _check_path(path.rstrip("/") if kind == "deletedFolder" else path)
                if kind == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path!r}; expected base64.")
                    files[path] = self._write_blob(repo_type, repo_id, base64.b64decode(value["content"]))
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path!r}.", "EntryNotFound")
                elif kind == "deletedFolder":
                    inside = [name for name in files if name.startswith(path + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path!r}.", "EntryNotFound")
                    for name in inside:
                        del files[name]
                elif kind == "lfsFile":
                    raise HubError(400, f"{path!r} was sent as an LFS pointer; this server only stores inline files "
                                        "(its preupload endpoint always answers 'regular').")
                else:
                    raise HubError(400, f"Unknown commit operation {kind!r}.")
            oid = self._add_commit(state, branch, files, header.get("summary", ""), header.get("description", ""))
            self._save(repo_type, repo_id, state)
            return oid

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self._lock:
            state = self.load(repo_type, repo_id)
            if branch in state["refs"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists.")
            state["refs"][branch] = self.resolve(state, starting_point or "main")
            self._save(repo_type, repo_id, state)


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub API and `resolve` requests to the server's `HubStore`."""

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        # Split before unquoting: the client quotes revisions and tree paths with safe="" ("refs%2Fpr%2F1").
        segments = [unquote(part) for part in url.path.strip("/").split("/")]
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self._route(method, segments)
        except HubError as error:
            payload = json.dumps({"error": error.message}).encode()
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send(error.status, payload, "application/json", headers, head_only=method == "HEAD")

    def _send(self, status: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None,
              head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(payload)

    def _json(self, data, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}.") from None

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")

    def _readable_state(self, repo_type: str, repo_id: str) -> dict:
        state = self.server.store.load(repo_type, repo_id)
        if state["private"] and not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(404, f"Repository {repo_id!r} not found.", "RepoNotFound")
        return state

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.server.url}/{prefix}{repo_id}"

    # -- routes -------------------------------------------------------------------------------------------------
    def _route(self, method: str, segments: list[str]) -> None:
        if segments[0] == "api":
            return self._route_api(method, segments[1:])
        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type, segments = segments[0][:-1], segments[1:]
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, repo_type, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        raise HubError(404, f"No route for {method} {self.path}.")

    def _route_api(self, method: str, segments: list[str]) -> None:
        if method == "GET" and segments == ["whoami-v2"]:
            self._require_token()
            user = self.server.user
            return self._json({"type": "user", "name": user, "fullname": user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if method == "POST" and segments == ["repos", "create"]:
            return self._create_repo()
        if method == "POST" and segments == ["validate-yaml"]:
            return self._validate_yaml()
        if len(segments) >= 3 and segments[0] in {f"{t}s" for t in REPO_TYPES}:
            repo_type, repo_id, rest = segments[0][:-1], "/".join(segments[1:3]), segments[3:]
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                return self._repo_info(repo_type, repo_id, rest[1] if rest else "main")
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]))
            if method == "POST" and len(rest) == 2:
                action, revision = rest
                if action == "paths-info":
                    return self._paths_info(repo_type, repo_id, revision)
                if action == "preupload":
                    return self._preupload(repo_type, repo_id, revision)
                if action == "commit":
                    return self._commit(repo_type, repo_id, revision)
                if action == "branch":
                    return self._create_branch(repo_type, repo_id, revision)
        raise HubError(404, f"No route for {method} {self.path}.")

    def _create_repo(self) -> None:
        self._require_token()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}; expected one of {REPO_TYPES}.")
        repo_id = f"{payload.get('organization') or self.server.user}/{payload.get('name') or ''}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        url = self._repo_url(repo_type, repo_id)
        try:
            self.server.store.create_repo(repo_type, repo_id, private)
        except HubError as error:
            if error.status == 409:  # the client reads the URL from the 409 body when exist_ok=True
                return self._json({"error": error.message, "url": url}, status=409)
            raise
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        try:
            front_matter(self._json_body().get("content", ""))
        except (yaml.YAMLError, ValueError) as error:
            return self._json({"error": "Invalid metadata", "errors": [{"message": str(error)}]}, status=400)
        self._json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        state = self._readable_state(repo_type, repo_id)
        oid = self.server.store.resolve(state, revision)
        commit = state["commits"][oid]
        card = {}
        if "README.md" in commit["files"]:
            try:
                card = front_matter(self.server.store.read_blob(repo_type, repo_id, commit["files"]["README.md"]).decode())
            except (yaml.YAMLError, ValueError, UnicodeDecodeError):
                card = {}
        siblings = [{"rfilename": path, "blobId": blob, "size": self.server.store.blob_size(repo_type, repo_id, blob)}
                    for path, blob in sorted(commit["files"].items())]
        self._json({
            "_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0], "sha": oid, "private": state["private"],
            "gated": False, "disabled": False, "createdAt": state["createdAt"], "lastModified": commit["date"],
            "downloads": 0, "likes": 0, "tags": card.get("tags") or [], "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"), "cardData": card or None, "siblings": siblings,
        })

    def _entries(self, repo_type: str, repo_id: str, files: dict[str, str], paths: set[str] | None = None,
                 under: str = "", recursive: bool = True) -> list[dict]:
        """Tree entries (`type` file/directory, `oid`, `path`, `size`) below `under`, or exactly `paths`."""
        folders: dict[str, list[str]] = {}
        for path, blob in files.items():
            for parent in PurePosixPath(path).parents:
                if str(parent) != ".":
                    folders.setdefault(str(parent), []).append(blob)
        entries = [{"type": "file", "oid": blob, "path": path, "size": self.server.store.blob_size(repo_type, repo_id, blob)}
                   for path, blob in files.items()]
        entries += [{"type": "directory", "oid": hashlib.sha1("".join(sorted(blobs)).encode()).hexdigest(), "path": path,
                     "size": 0} for path, blobs in folders.items()]
        if paths is not None:
            return sorted((e for e in entries if e["path"] in paths), key=lambda e: e["path"])
        prefix = f"{under}/" if under else ""
        selected = [e for e in entries if e["path"].startswith(prefix)
                    and (recursive or "/" not in e["path"][len(prefix):])]
        return sorted(selected, key=lambda e: (e["type"] != "directory", e["path"]))

    def _tree(self, repo_type: str, repo_id: str, revision: str, under: str) -> None:
        state = self._readable_state(repo_type, repo_id)
        files = state["commits"][self.server.store.resolve(state, revision)]["files"]
        entries = self._entries(repo_type, repo_id, files, under=under.strip("/"),
                                recursive=self.query.get("recursive", "false").lower() in ("true", "1"))
        if under and not entries:
            raise HubError(404, f"{under!r} does not exist at revision {revision!r}.", "EntryNotFound")
        self._json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        state = self._readable_state(repo_type, repo_id)
        files = state["commits"][self.server.store.resolve(state, revision)]["files"]
        form = parse_qs(self.body.decode())
        self._json(self._entries(repo_type, repo_id, files, paths={p.strip("/") for p in form.get("paths", [])}))

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_token()
        state = self._readable_state(repo_type, repo_id)
        oid = self.server.store.resolve(state, revision)
        files = state["commits"][oid]["files"]
        self._json({
            "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
                      for f in self._json_body().get("files", [])],
            "commitOid": oid,
        })

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_token()
        if self.query.get("create_pr") == "1":
            raise HubError(400, "Pull requests are not supported by this test server.")
        self._readable_state(repo_type, repo_id)
        try:
            lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Commit body is not NDJSON: {error}.") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a 'header' line.")
        oid = self.server.store.commit(repo_type, repo_id, revision, lines[0].get("value", {}), lines[1:])
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{oid}",
                    "pullRequestUrl": None})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._require_token()
        self._readable_state(repo_type, repo_id)
        self.server.store.create_branch(repo_type, repo_id, branch, self._json_body().get("startingPoint"))
        self._json({})

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        state = self._readable_state(repo_type, repo_id)
        oid = self.server.store.resolve(state, revision)
        blob = state["commits"][oid]["files"].get(path)
        if blob is None:
            raise HubError(404, f"Entry {path!r} not found at revision {revision!r}.", "EntryNotFound",
                           headers={"X-Repo-Commit": oid})
        content = self.server.store.read_blob(repo_type, repo_id, blob)
        self._send(200, content, "application/octet-stream", {"X-Repo-Commit": oid, "ETag": f'"{blob}"'},
                   head_only=method == "HEAD")


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: HubStore, user: str):
        super().__init__(address, _HubRequestHandler)
        self.store, self.user = store, user
        self.url = f"http://{self.server_address[0]}:{self.server_address[1]}"


class LocalHub:
    """A `HubStore` under `root` served on 127.0.0.1 (`port=0`: a free port) from a daemon thread.

    Use as a context manager, or `start()`/`stop()`. `url` is what `HF_ENDPOINT` must be; `env()` builds a client
    subprocess environment pointing at it.
    """

    def __init__(self, root: str | os.PathLike, port: int = 0, user: str = DEFAULT_USER):
        self.store = HubStore(root)
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.user = user
        self._port = port
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() or use it as a context manager.")
        return self._server.url

    def start(self) -> LocalHub:
        self._server = _HubHTTPServer(("127.0.0.1", self._port), self.store, self.user)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def env(self, hf_home: str | os.PathLike, token: str = "dummy") -> dict[str, str]:
        """`os.environ` for a client process of this hub: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME` set, offline mode off."""
        env = {key: value for key, value in os.environ.items() if key not in _CLIENT_ENV_DROP}
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        env.update(HF_ENDPOINT=self.url, HF_TOKEN=token, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_XET="1", NO_PROXY=no_proxy, no_proxy=no_proxy)
        return env


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter with `env` (e.g. `LocalHub.env(...)`); its stdout, or AssertionError with
    its stderr when it fails."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"Subprocess exited with {result.returncode}:\n{result.stderr[-6000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory) -> Iterator[LocalHub]:
    """A running `LocalHub` shared by one test module (import this fixture into the module to use it)."""
    with LocalHub(tmp_path_factory.mktemp("hub")) as hub:
        yield hub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local Hugging Face Hub-compatible API (for tests).")
    parser.add_argument("--root", required=True, help="Folder holding the repos (created if missing).")
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1; 0 picks a free one.")
    parser.add_argument("--user", default=DEFAULT_USER, help="User name returned by whoami and used as default namespace.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalHub(args.root, port=args.port, user=args.user) as hub:
        print(hub.url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
