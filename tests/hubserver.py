"""A real HTTP server that answers the few Hugging Face Hub endpoints huggingface_hub 2.x calls
to resolve a revision and download a model or dataset snapshot.

Used by tests instead of mocking huggingface_hub: the library runs unchanged against it
(set HF_ENDPOINT / HubSettings.endpoint to `FakeHub.url`). Endpoints, as called by
huggingface_hub 2.4:

    GET  /api/{models|datasets}/{owner}/{name}/revision/{rev}       repo info -> {"id", "sha"}
    GET  /api/{models|datasets}/{owner}/{name}/tree/{rev}?recursive  file listing
    HEAD /[datasets/]{owner}/{name}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length
    GET  /[datasets/]{owner}/{name}/resolve/{rev}/{path}             the bytes

Errors follow the Hub: `X-Error-Code: RepoNotFound | RevisionNotFound | GatedRepo | EntryNotFound`.
Faults (an HTTP status, a dropped connection, a delay) can be queued per endpoint, and every
request is recorded so tests can count retries and check which revision was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's content: what the Hub reports as a regular file's oid/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: dict[str, bytes]
    sha: str
    branches: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()  # tokens that accepted the gated repo's license

    def resolve(self, revision: str) -> str | None:
        if revision == self.sha:
            return self.sha
        return self.branches.get(revision)


@dataclass
class Fault:
    method: str
    path_contains: str
    action: int | str  # an HTTP status, "drop" (close without answering) or "delay:<seconds>"
    remaining: int


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted path, no query
    authorization: str | None


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint to pass to huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[Request] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ setup

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        gated: bool = False,
        allowed_tokens: tuple[str, ...] = (),
    ) -> FakeRepo:
        sha = hashlib.sha1(repr((repo_id, sorted(files.items()))).encode()).hexdigest()
        repo = FakeRepo(
            repo_id=repo_id,
            repo_type=repo_type,
            files=dict(files),
            sha=sha,
            branches={"main": sha},
            gated=gated,
            allowed_tokens=frozenset(allowed_tokens),
        )
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def fail(self, method: str, path_contains: str, action: int | str, times: int = 1) -> None:
        """The next `times` requests whose path contains `path_contains` get `action` instead."""
        with self._lock:
            self._faults.append(Fault(method, path_contains, action, times))

    def hits(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and contains in r.path)

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "start the FakeHub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ internals

    def _record(self, method: str, path: str, authorization: str | None) -> int | str | None:
        with self._lock:
            self.requests.append(Request(method, path, authorization))
            for fault in self._faults:
                if fault.remaining > 0 and fault.method == method and fault.path_contains in path:
                    fault.remaining -= 1
                    return fault.action
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer has a Content-Length

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    # ------------------------------------------------------------ dispatch

    def _serve(self, method: str) -> None:
        raw_path = urlsplit(self.path).path
        path = unquote(raw_path)
        action = self.hub._record(method, path, self.headers.get("Authorization"))
        if isinstance(action, str) and action.startswith("delay:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "drop":
            self.close_connection = True  # answer nothing: the client sees the connection cut
            return
        elif isinstance(action, int):
            self._send_json(action, {"error": f"injected HTTP {action}"})
            return

        parts = raw_path.strip("/").split("/")
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            revision = unquote(parts[5])
            if parts[4] == "revision":
                return self._repo_info(repo_type, repo_id, revision)
            if parts[4] == "tree":
                return self._tree(repo_type, repo_id, revision)
        repo_type = "model"
        if parts[:1] == ["datasets"]:
            repo_type, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            revision = unquote(parts[3])
            filename = unquote("/".join(parts[4:]))
            return self._resolve(method, repo_type, repo_id, revision, filename)
        self._send_json(404, {"error": f"no such endpoint {path}"})

    def _find(self, repo_type: str, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            # The Hub answers 401 to anonymous callers and 404 to authenticated ones, so as not to
            # reveal whether a private repo exists.
            status = 404 if self.headers.get("Authorization") else 401
            self._send_json(status, {"error": "Repository not found"}, error_code="RepoNotFound")
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._send_json(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
            return None
        return repo, sha

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is not None:
            repo, sha = found
            body = {"id": repo.repo_id, "sha": sha, "private": False, "gated": "manual" if repo.gated else False}
            self._send_json(200, body)

    def _tree(self, repo_type: str, repo_id: str, revision: str) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, _ = found
        entries = []
        folders = sorted({"/".join(p.split("/")[:i]) for p in repo.files for i in range(1, p.count("/") + 1)})
        for folder in folders:
            entries.append({"type": "directory", "oid": git_blob_oid(folder.encode()), "size": 0, "path": folder})
        for name, data in sorted(repo.files.items()):
            entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": name})
        self._send_json(200, entries)

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        if repo.gated:
            auth = self.headers.get("Authorization")
            token = auth.removeprefix("Bearer ") if auth else None
            if token is None:
                message = f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in."
                self._send_json(401, {"error": message}, error_code="GatedRepo", error_message=message)
                return
            if token not in repo.allowed_tokens:
                message = f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. Visit the repo to ask for access."
                self._send_json(403, {"error": message}, error_code="GatedRepo", error_message=message)
                return
        data = repo.files.get(filename)
        if data is None:
            self._send_json(404, {"error": "Entry not found"}, error_code="EntryNotFound", extra={"X-Repo-Commit": sha})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{git_blob_oid(data)}"')
        self.send_header("X-Repo-Commit", sha)
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)

    def _send_json(
        self,
        status: int,
        body: object,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        if error_message:
            self.send_header("X-Error-Message", error_message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
