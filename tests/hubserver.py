"""A real HTTP server that answers the Hugging Face Hub endpoints huggingface_hub 2.x calls to
resolve a revision, list and download a model or dataset snapshot, and create commits.

Used by tests instead of mocking huggingface_hub: the library runs unchanged against it
(set HF_ENDPOINT / HubSettings.endpoint / HfApi(endpoint=...) to `FakeHub.url`). Endpoints, as
called by huggingface_hub 2.4 ({type} is models or datasets; {rev} a branch, tag or commit sha,
URL-quoted; {path} a repo path, URL-quoted with or without its slashes):

    GET  /api/whoami-v2                                    the token's account, orgs and permissions
    GET  /api/{type}/{owner}/{name}[/revision/{rev}]       repo info: id, sha, private, gated, siblings
                                                           (?blobs=true adds size, blobId, lfs to siblings)
    GET  /api/{type}/{owner}/{name}/tree/{rev}[/{path}]    listing of the root or of a folder, ?recursive=true
                                                           for all descendants; LFS files carry "lfs": {oid
                                                           (sha256), size, pointerSize} and "oid" is the git
                                                           blob id of their pointer; a missing path (or a
                                                           file) -> 404 EntryNotFound
    POST /api/{type}/{owner}/{name}/paths-info/{rev}       entries of the given paths (form field "paths")
    GET  /api/{type}/{owner}/{name}/refs                   branches, tags (converts, pullRequests empty)
    HEAD /[datasets/]{owner}/{name}/resolve/{rev}/{path}   X-Repo-Commit, ETag, Content-Length; LFS files also
                                                           X-Linked-Etag (sha256) and X-Linked-Size
    GET  /[datasets/]{owner}/{name}/resolve/{rev}/{path}   the bytes (LFS too: 200, no CDN redirect)
    POST /api/repos/create                                 create a repo (409 if it exists); "private" /
                                                           "visibility" in the payload sets FakeRepo.private
    POST /api/validate-yaml                                model card metadata check
    POST /api/{type}/{owner}/{name}/preupload/{rev}        upload mode (regular / lfs) and remote oid per file
    POST /[datasets/]{owner}/{name}.git/info/lfs/objects/batch   LFS: which objects to PUT where
    PUT  /lfs-objects/{sha256}                             LFS: the bytes of one object (basic transfer)
    POST /api/{type}/{owner}/{name}/commit/{rev}           NDJSON commit (header, file, lfsFile, deletedFile,
                                                           deletedFolder) -> {"commitOid", "commitUrl"}

Xet: hf_xet is installed, but the server offers only the basic LFS transfer (no Xet headers, no
"xet" transfer in the LFS batch answer, no xetHash in listings): run clients with
HF_HUB_DISABLE_XET=1 (or set huggingface_hub.constants.HF_HUB_DISABLE_XET = True in-process).

Auth: uploads need a token from `write_tokens` (401 without a token, 403 with another one); whoami
answers for the tokens in `tokens` (token -> whoami payload, see `whoami_payload`) and for every write
token (as a write token of "alice", member of the org "acme" with the write role), 401 for others.
A private repo is visible only to known tokens (write_tokens or tokens): others get the Hub's 404
(401 anonymous) RepoNotFound. `revoke(token)` makes a token invalid: every request carrying it gets
401 with X-Error-Message "Invalid credentials in Authorization header", as the Hub answers an invalid
token (huggingface_hub raises HfHubHTTPError, status 401). To model a read-only token instead, take it
out of `write_tokens` (writes then get 403).
Errors follow the Hub: `X-Error-Code: RepoNotFound | RevisionNotFound | GatedRepo | EntryNotFound`.
Deleting a file that does not exist is 404 EntryNotFound ("A file with this name doesn't exist"), as on
the Hub; deleting a missing folder is 404 too unless `lenient_folder_deletes` is set (not verified
against the real Hub: handle both).

State: `repos[(type, id)]` -> FakeRepo (files: path -> bytes of the head, lfs: paths stored in LFS,
commits: shas, history: Commit records, snapshots of earlier commits so old shas still resolve).
Faults, queued with `fail(method, path_contains, action, times)` or applied to every request with
`outage(action)`, are: an HTTP status (int); "drop" (close without answering, nothing applied);
"apply-then-drop" (handle the request fully, e.g. apply the commit, then close without answering: a
reply lost after the Hub acted); "delay:<s>" (wait, then answer); "hang:<s>" (say nothing for that
long, then close). `refuse()` / `accept()` stop and resume listening on the same port (connections
refused meanwhile, open ones cut, state kept). Every request is recorded (`requests`, `hits`) so
tests can count retries and check which revision was fetched. All state changes happen under the
hub's lock, so tests may poll while a client uploads from another thread.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's content: what the Hub reports as a regular file's oid/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git LFS pointer file that git stores in place of an LFS file's content."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


DEFAULT_USER = "alice"
DEFAULT_ORGS = {"acme": "write"}
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the Hub's X-Error-Message for a bad token


def whoami_payload(
    name: str = DEFAULT_USER,
    *,
    role: str = "write",
    orgs: dict[str, str] | None = None,
    scoped: tuple[tuple[str, str, tuple[str, ...]], ...] = (),
    global_permissions: tuple[str, ...] = (),
) -> dict:
    """What the Hub's GET /api/whoami-v2 answers for a user access token (the shape huggingface_hub reads):
    `orgs` maps org name -> roleInOrg; for role "fineGrained", `scoped` lists (entity type, entity name,
    permissions), e.g. ("model", "alice/other", ("repo.write",)) or ("org", "acme", ("repo.content.read",))."""
    orgs = DEFAULT_ORGS if orgs is None else orgs
    token: dict = {"displayName": f"{role}-token", "role": role, "createdAt": "2025-01-01T00:00:00.000Z"}
    if role == "fineGrained":
        token["fineGrained"] = {
            "canReadGatedRepos": True,
            "global": list(global_permissions),
            "scoped": [{"entity": {"_id": f"id-{entity}", "type": kind, "name": entity}, "permissions": list(perms)}
                       for kind, entity, perms in scoped],
        }
    return {
        "type": "user", "id": f"id-{name}", "name": name, "fullname": name.title(), "email": f"{name}@example.com",
        "emailVerified": True, "isPro": False, "canPay": False, "periodEnd": None,
        "orgs": [{"type": "org", "id": f"id-{org}", "name": org, "fullname": org.title(), "roleInOrg": org_role}
                 for org, org_role in orgs.items()],
        "auth": {"type": "access_token", "accessToken": token},
    }


@dataclass
class Commit:
    """One commit the Hub accepted: what it added (path -> sha256 hex of the content) and deleted
    (the paths as sent: a folder deletion keeps its trailing "/" if the client sent one)."""

    sha: str
    message: str
    added: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: dict[str, bytes]  # the head's files (tests may edit them; the head sha then serves the edit)
    sha: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha (list_repo_refs: branches)
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()  # tokens that accepted the gated repo's license
    commits: list[str] = field(default_factory=list)  # shas of the commits pushed to it, oldest first
    private: bool = False
    lfs: set[str] = field(default_factory=set)  # paths of `files` stored in LFS (tree "lfs", X-Linked-Etag)
    history: list[Commit] = field(default_factory=list)  # the commits pushed to it, oldest first
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit sha
    snapshots: dict[str, tuple[dict[str, bytes], frozenset[str]]] = field(default_factory=dict, repr=False)
    # files and LFS paths of earlier commits, by sha, so that a download pinned to an old sha still works

    def resolve(self, revision: str) -> str | None:
        if revision == self.sha or revision in self.snapshots:
            return revision
        return self.branches.get(revision) or self.tags.get(revision)

    def at(self, sha: str) -> tuple[dict[str, bytes], frozenset[str] | set[str]]:
        """The files and LFS paths of commit `sha` (the head for an unknown sha)."""
        if sha != self.sha and sha in self.snapshots:
            return self.snapshots[sha]
        return self.files, self.lfs


@dataclass
class Fault:
    method: str
    path_contains: str
    action: int | str  # see _check_action
    remaining: int


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted path, no query
    authorization: str | None


def _lfs_mode(sample: bytes, size: int) -> str:
    # Like the Hub's .gitattributes: binary content goes to LFS, small text stays in git.
    return "lfs" if b"\0" in sample or size > 100_000 else "regular"


def _oid(data: bytes, mode: str) -> str:
    """What the Hub reports as a file's oid in preupload: sha256 for LFS files, the git blob id otherwise."""
    return hashlib.sha256(data).hexdigest() if mode == "lfs" else git_blob_oid(data)


def _check_action(action: int | str) -> int | str:
    """An HTTP status, "drop" (close without answering), "apply-then-drop" (handle the request, then close
    without answering), "delay:<seconds>" (then answer) or "hang:<seconds>" (silence, then close)."""
    if isinstance(action, int) and not isinstance(action, bool) and 100 <= action <= 599:
        return action
    if action in ("drop", "apply-then-drop"):
        return action
    if isinstance(action, str) and action.startswith(("delay:", "hang:")):
        float(action.split(":", 1)[1])  # ValueError if it is no number
        return action
    raise ValueError(f"unknown fault action {action!r}")


def _folders(paths: Iterable[str], base: str = "") -> set[str]:
    """Every folder below `base` ("" or "a/b/") that holds one of `paths` (all under `base`)."""
    found = set()
    for path in paths:
        parts = path[len(base):].split("/")
        for i in range(1, len(parts)):
            found.add(base + "/".join(parts[:i]))
    return found


def _file_entry(path: str, data: bytes, is_lfs: bool) -> dict:
    if not is_lfs:
        return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
    pointer = lfs_pointer(data)
    return {"type": "file", "oid": git_blob_oid(pointer), "size": len(data), "path": path,
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}


def _folder_entry(folder: str, files: dict[str, bytes]) -> dict:
    inside = sorted((p, git_blob_oid(d)) for p, d in files.items() if p.startswith(folder + "/"))
    return {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0, "path": folder}


def _truthy(values: list[str] | None) -> bool:
    return values is not None and bool(values) and values[-1].lower() in ("1", "true", "yes")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Close every open (keep-alive) connection, as a server going down does."""
        with self._connections_lock:
            open_ones = list(self.connections)
        for sock in open_ones:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or gave up closes its end; that is the point of some tests.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            super().handle_error(request, client_address)


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint to pass to huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.write_tokens: set[str] = set()  # tokens that may create repos and push
        self.tokens: dict[str, dict] = {}  # token -> what whoami answers (write tokens answer as whoami_payload())
        self.revoked: set[str] = set()  # tokens the Hub no longer accepts (401 on every request)
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, as the Hub's LFS storage
        self.requests: list[Request] = []
        self.lenient_folder_deletes = False  # True: deleting a missing folder is a no-op instead of 404
        self._faults: list[Fault] = []
        self._outage: int | str | None = None
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None

    # ------------------------------------------------------------ setup

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        gated: bool = False,
        allowed_tokens: tuple[str, ...] = (),
        private: bool = False,
    ) -> FakeRepo:
        """A repo holding `files` at one commit (no history); files that the Hub's .gitattributes rule puts
        in LFS (binary or > 100 kB) are listed as LFS files."""
        sha = hashlib.sha1(repr((repo_id, sorted(files.items()))).encode()).hexdigest()
        repo = FakeRepo(
            repo_id=repo_id,
            repo_type=repo_type,
            files=dict(files),
            sha=sha,
            branches={"main": sha},
            gated=gated,
            allowed_tokens=frozenset(allowed_tokens),
            private=private,
            lfs={path for path, data in files.items() if _lfs_mode(data[:512], len(data)) == "lfs"},
        )
        with self._lock:
            self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_token(self, token: str, **whoami: object) -> dict:
        """A token whoami knows (arguments of `whoami_payload`); it may push only if also in write_tokens."""
        with self._lock:
            self.tokens[token] = whoami_payload(**whoami)  # type: ignore[arg-type]
            return self.tokens[token]

    def revoke(self, token: str) -> None:
        """From now on every request carrying `token` gets 401 "Invalid credentials in Authorization header"
        (what the Hub answers for a revoked or invalid token), reads included."""
        with self._lock:
            self.revoked.add(token)

    # ------------------------------------------------------------ faults

    def fail(self, method: str, path_contains: str, action: int | str, times: int = 1) -> None:
        """The next `times` requests with this method whose path contains `path_contains` get `action`
        (an HTTP status, "drop", "apply-then-drop", "delay:<s>" or "hang:<s>") instead."""
        with self._lock:
            self._faults.append(Fault(method, path_contains, _check_action(action), times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def outage(self, action: int | str = 503) -> None:
        """Every request, any method and path, gets `action` (as in `fail`) until `end_outage()`; queued
        faults wait meanwhile."""
        with self._lock:
            self._outage = _check_action(action)

    def end_outage(self) -> None:
        with self._lock:
            self._outage = None

    def refuse(self) -> None:
        """Stop listening: connections are refused and open keep-alive connections are cut (as when the
        Hub is unreachable); the state is kept. `accept()` listens again on the same port."""
        self._close_server()

    def accept(self) -> None:
        """Listen again, on the same address and port, after `refuse()`."""
        assert self._address is not None, "start the FakeHub first"
        if self._server is None:
            self._listen(self._address)

    def hits(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and contains in r.path)

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._address is not None, "start the FakeHub first"
        host, port = self._address
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._listen(("127.0.0.1", 0))
        return self

    def stop(self) -> None:
        self._close_server()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ internals

    def _listen(self, address: tuple[str, int]) -> None:
        handler = type("Handler", (_Handler,), {"hub": self})
        server = _Server(address, handler)
        self._address = server.server_address[:2]  # type: ignore[assignment]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()

    def _close_server(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.cut_connections()
        if thread is not None:
            thread.join(timeout=5)

    def _record(self, method: str, path: str, authorization: str | None) -> int | str | None:
        with self._lock:
            self.requests.append(Request(method, path, authorization))
            if self._outage is not None:
                return self._outage
            for fault in self._faults:
                if fault.remaining > 0 and fault.method == method and fault.path_contains in path:
                    fault.remaining -= 1
                    return fault.action
        return None

    def _may_read_private(self, token: str | None) -> bool:
        return token is not None and (token in self.write_tokens or token in self.tokens)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer has a Content-Length

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    # ------------------------------------------------------------ dispatch

    def _body(self) -> bytes:
        """The request body, sent with a Content-Length or chunked (httpx streams file uploads)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size) if size else b""
                self.rfile.readline()  # the CRLF after each chunk
                if not size:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        return auth.removeprefix("Bearer ") if auth else None

    def _serve(self, method: str) -> None:
        raw_path = urlsplit(self.path).path
        path = unquote(raw_path)
        body = self._body() if method in ("POST", "PUT") else b""  # read first: the connection stays usable
        action = self.hub._record(method, path, self.headers.get("Authorization"))
        if isinstance(action, str) and action.startswith("delay:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif isinstance(action, str) and action.startswith("hang:"):
            time.sleep(float(action.split(":", 1)[1]))
            self.close_connection = True
            return
        elif action == "drop":
            self.close_connection = True  # answer nothing: the client sees the connection cut
            return
        elif action == "apply-then-drop":
            wire, self.wfile = self.wfile, io.BytesIO()  # the answer goes nowhere
            try:
                self._dispatch(method, raw_path, path, body)
            finally:
                self.wfile = wire
                self.close_connection = True
            return
        elif isinstance(action, int):
            self._send_json(action, {"error": f"injected HTTP {action}"})
            return
        self._dispatch(method, raw_path, path, body)

    def _dispatch(self, method: str, raw_path: str, path: str, body: bytes) -> None:
        token = self._token()
        if token is not None and token in self.hub.revoked:
            return self._send_json(401, {"error": INVALID_TOKEN_MESSAGE}, error_message=INVALID_TOKEN_MESSAGE)
        if method in ("POST", "PUT"):
            return self._write(method, raw_path, body)

        query = parse_qs(urlsplit(self.path).query)
        parts = raw_path.strip("/").split("/")
        if parts == ["api", "whoami-v2"]:
            return self._whoami()
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            if len(parts) == 4:
                return self._repo_info(repo_type, repo_id, "main", query)
            if len(parts) == 5 and parts[4] == "refs":
                return self._refs(repo_type, repo_id)
            if len(parts) >= 6:
                revision = unquote(parts[5])
                if parts[4] == "revision":
                    return self._repo_info(repo_type, repo_id, revision, query)
                if parts[4] == "tree":
                    folder = "/".join(unquote(p) for p in parts[6:]).strip("/")
                    return self._tree(repo_type, repo_id, revision, folder, _truthy(query.get("recursive")))
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
        with self.hub._lock:
            repo = self.hub.repos.get((repo_type, repo_id))
            hidden = repo is not None and repo.private and not self.hub._may_read_private(self._token())
            sha = repo.resolve(revision) if repo is not None else None
        if repo is None or hidden:
            # The Hub answers 401 to anonymous callers and 404 to authenticated ones, so as not to
            # reveal whether a private repo exists.
            status = 404 if self.headers.get("Authorization") else 401
            self._send_json(status, {"error": "Repository not found"}, error_code="RepoNotFound")
            return None
        if sha is None:
            self._send_json(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
            return None
        return repo, sha

    def _whoami(self) -> None:
        token = self._token()
        with self.hub._lock:
            payload = self.hub.tokens.get(token) if token else None
            if payload is None and token in self.hub.write_tokens:
                payload = whoami_payload()
        if payload is None:
            return self._send_json(401, {"error": "Invalid credentials in Authorization header"})
        self._send_json(200, payload)

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        with self.hub._lock:
            files, lfs = repo.at(sha)
            blobs = _truthy(query.get("blobs"))
            siblings = []
            for name, data in sorted(files.items()):
                sibling: dict = {"rfilename": name}
                if blobs:
                    entry = _file_entry(name, data, name in lfs)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                                          "pointerSize": entry["lfs"]["pointerSize"]}
                siblings.append(sibling)
            body = {"id": repo.repo_id, "sha": sha, "private": repo.private,
                    "gated": "manual" if repo.gated else False, "siblings": siblings}
        self._send_json(200, body)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        found = self._find(repo_type, repo_id, "main")
        if found is None:
            return
        repo, _ = found
        with self.hub._lock:
            body = {
                "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                             for name, sha in sorted(repo.branches.items())],
                "converts": [],
                "tags": [{"name": name, "ref": f"refs/tags/{name}", "targetCommit": sha}
                         for name, sha in sorted(repo.tags.items())],
                "pullRequests": [],
            }
        self._send_json(200, body)

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str, recursive: bool) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        with self.hub._lock:
            files, lfs = repo.at(sha)
            files, lfs = dict(files), set(lfs)
        base = f"{folder}/" if folder else ""
        inside = {p: d for p, d in files.items() if p.startswith(base)}
        if folder and not inside:  # a missing path, or a file: not a folder to list
            message = f"{folder} does not exist on {revision}"
            return self._send_json(404, {"error": message}, error_code="EntryNotFound", error_message=message)
        folders = _folders(inside, base)
        if not recursive:
            folders = {f for f in folders if "/" not in f[len(base):]}
            inside = {p: d for p, d in inside.items() if "/" not in p[len(base):]}
        entries = [_folder_entry(f, files) for f in sorted(folders)]
        entries += [_file_entry(p, d, p in lfs) for p, d in sorted(inside.items())]
        self._send_json(200, entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths") or []
        else:
            paths = parse_qs(body.decode()).get("paths") or []
        with self.hub._lock:
            files, lfs = repo.at(sha)
            files, lfs = dict(files), set(lfs)
        folders = _folders(files)
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                entries.append(_file_entry(path, files[path], path in lfs))
            elif path in folders:
                entries.append(_folder_entry(path, files))
        self._send_json(200, entries)

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        if repo.gated:
            token = self._token()
            if token is None:
                message = f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in."
                self._send_json(401, {"error": message}, error_code="GatedRepo", error_message=message)
                return
            if token not in repo.allowed_tokens:
                message = f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. Visit the repo to ask for access."
                self._send_json(403, {"error": message}, error_code="GatedRepo", error_message=message)
                return
        with self.hub._lock:
            files, lfs = repo.at(sha)
            data = files.get(filename)
            is_lfs = filename in lfs
        if data is None:
            self._send_json(404, {"error": "Entry not found"}, error_code="EntryNotFound", extra={"X-Repo-Commit": sha})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        if is_lfs:  # the Hub names the LFS object (sha256, real size) besides the pointer's blob id
            self.send_header("ETag", f'"{git_blob_oid(lfs_pointer(data))}"')
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
        else:
            self.send_header("ETag", f'"{git_blob_oid(data)}"')
        self.send_header("X-Repo-Commit", sha)
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)

    # ------------------------------------------------------------ uploads

    def _writer_refused(self) -> bool:
        """Answer 401/403 unless the request carries a write token."""
        token = self._token()
        if token is None:
            self._send_json(401, {"error": "Invalid username or password."})
            return True
        if token not in self.hub.write_tokens:
            self._send_json(403, {"error": "You don't have the rights to write to this repo"})
            return True
        return False

    def _write(self, method: str, raw_path: str, body: bytes) -> None:
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._send_json(200, {"errors": [], "warnings": []})
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-objects":
            return self._lfs_put(parts[1], body)  # a pre-signed storage URL on the Hub: no token is sent
        api_repo = method == "POST" and parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("models", "datasets")
        if api_repo and parts[4] == "paths-info":  # a read, sent as a POST
            return self._paths_info(parts[1][:-1], f"{parts[2]}/{parts[3]}", "/".join(parts[5:]), body)
        if self._writer_refused():
            return
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            repo_type = "dataset" if parts[0] == "datasets" else "model"
            owner_name = parts[1:-4] if repo_type == "dataset" else parts[:-4]
            return self._lfs_batch(json.loads(body), repo_type, "/".join(owner_name).removesuffix(".git"))
        if api_repo:
            repo_type, repo_id, revision = parts[1][:-1], f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
            if parts[4] == "preupload":
                return self._preupload(repo_type, repo_id, revision, json.loads(body))
            if parts[4] == "commit":
                return self._commit(repo_type, repo_id, revision, body)
        self._send_json(404, {"error": f"no such endpoint {method} {raw_path}"})

    def _create_repo(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub._lock:
            exists = (repo_type, repo_id) in self.hub.repos
            if not exists:
                self.hub.add_repo(repo_id, {}, repo_type=repo_type, private=private)
        if exists:
            return self._send_json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{prefix}{repo_id}"})
        self._send_json(200, {"url": f"{self.hub.url}/{prefix}{repo_id}"})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        with self.hub._lock:
            current, lfs = repo.at(sha)
            current, lfs = dict(current), set(lfs)
        files = []
        for entry in payload["files"]:
            mode = _lfs_mode(base64.b64decode(entry["sample"]), entry["size"])
            existing = current.get(entry["path"])
            stored_as = "lfs" if entry["path"] in lfs else "regular"
            files.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False,
                          "oid": _oid(existing, stored_as) if existing is not None else None})
        self._send_json(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, payload: dict, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            known = (repo_type, repo_id) in self.hub.repos
            stored = set(self.hub.lfs_objects)
        if not known:
            return self._send_json(404, {"error": "Repository not found"}, error_code="RepoNotFound")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in stored:  # only what the storage lacks is sent
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-objects/{obj['oid']}"}}
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send_json(400, {"error": "content does not match its sha256"})
        with self.hub._lock:
            self.hub.lfs_objects[oid] = body
        self._send_json(200, {})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo = found[0]
        with self.hub._lock:  # read, check and apply at once: concurrent commits serialize, none is lost
            answer = self._apply_commit(repo, revision, body)
        status, payload, error_code = answer
        if error_code:
            return self._send_json(status, payload, error_code=error_code, error_message=payload["error"])
        self._send_json(status, payload)

    def _apply_commit(self, repo: FakeRepo, revision: str, body: bytes) -> tuple[int, dict, str | None]:
        parent = repo.resolve(revision)
        if parent is None:
            return 404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound"
        before, before_lfs = repo.at(parent)
        files, lfs = dict(before), set(before_lfs)
        message, added, deleted = "", {}, []
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value.get("summary") or ""
                expected = value.get("parentCommit")
                if expected and expected != parent:
                    return 412, {"error": "A commit has happened since. Please refresh and try again."}, None
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
                added[value["path"]] = hashlib.sha256(files[value["path"]]).hexdigest()
            elif item["key"] == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}, None
                files[value["path"]] = data
                lfs.add(value["path"])
                added[value["path"]] = value["oid"]
            elif item["key"] == "deletedFile":
                if value["path"] not in files:
                    return 404, {"error": "A file with this name doesn't exist"}, "EntryNotFound"
                del files[value["path"]]
                lfs.discard(value["path"])
                deleted.append(value["path"])
            elif item["key"] == "deletedFolder":
                prefix = value["path"].strip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone and not self.hub.lenient_folder_deletes:
                    return 404, {"error": "A folder with this name doesn't exist"}, "EntryNotFound"
                for path in gone:
                    del files[path]
                    lfs.discard(path)
                deleted.append(value["path"])
        sha = hashlib.sha1(repr((parent, sorted(files.items()))).encode()).hexdigest()
        if repo.sha not in repo.snapshots:
            repo.snapshots[repo.sha] = (dict(repo.files), frozenset(repo.lfs))
        repo.files, repo.lfs, repo.sha = files, lfs, sha
        repo.branches[revision] = sha
        repo.commits.append(sha)
        repo.history.append(Commit(sha=sha, message=message, added=added, deleted=deleted))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return 200, {"commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{sha}", "commitOid": sha,
                     "success": True}, None

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
