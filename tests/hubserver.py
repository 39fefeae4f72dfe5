"""A real HTTP server that answers the Hugging Face Hub endpoints huggingface_hub 2.x calls to
resolve a revision, download a model or dataset snapshot, and upload a folder.

Used by tests instead of mocking huggingface_hub: the library runs unchanged against it
(set HF_ENDPOINT / HubSettings.endpoint to `FakeHub.url`). Endpoints, as called by
huggingface_hub 2.4:

    GET  /api/whoami-v2                                             the token's account, orgs and permissions
    GET  /api/{models|datasets}/{owner}/{name}[/revision/{rev}]     repo info -> {"id", "sha"} (repo_exists: no rev)
    GET  /api/{models|datasets}/{owner}/{name}/tree/{rev}?recursive  file listing
    HEAD /[datasets/]{owner}/{name}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length
    GET  /[datasets/]{owner}/{name}/resolve/{rev}/{path}             the bytes
    POST /api/repos/create                                          create a repo (409 if it exists)
    POST /api/validate-yaml                                         model card metadata check
    POST /api/{models|datasets}/{owner}/{name}/preupload/{rev}      upload mode (regular / lfs) per file
    POST /[datasets/]{owner}/{name}.git/info/lfs/objects/batch      LFS: which objects to PUT where
    PUT  /lfs-objects/{sha256}                                      LFS: the bytes of one object
    POST /api/{models|datasets}/{owner}/{name}/commit/{rev}         NDJSON commit -> {"commitOid"}

Uploads need a token from `write_tokens` (401 without a token, 403 with another one); whoami answers
for the tokens in `tokens` (token -> whoami payload, see `whoami_payload`) and for every write token
(as a write token of "alice", member of the org "acme" with the write role), 401 for others. The LFS
protocol is used, not Xet (run the client with HF_HUB_DISABLE_XET=1, since hf_xet is installed).
Errors follow the Hub: `X-Error-Code: RepoNotFound | RevisionNotFound | GatedRepo | EntryNotFound`.
Faults (an HTTP status, a dropped connection, a delay) can be queued per method and path, and
every request is recorded so tests can count retries and check which revision was fetched.
"""

from __future__ import annotations

import base64
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


DEFAULT_USER = "alice"
DEFAULT_ORGS = {"acme": "write"}


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
class FakeRepo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: dict[str, bytes]
    sha: str
    branches: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()  # tokens that accepted the gated repo's license
    commits: list[str] = field(default_factory=list)  # shas of the commits pushed to it, oldest first

    def resolve(self, revision: str) -> str | None:
        if revision == self.sha:
            return self.sha
        return self.branches.get(revision)


@dataclass
class Fault:
    method: str
    path_contains: str
    action: int | str  # an HTTP status, "drop" (close without answering), "delay:<seconds>" (then answer)
    # or "hang:<seconds>" (say nothing for that long, then close without answering)
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or gave up closes its end; that is the point of some tests.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint to pass to huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.write_tokens: set[str] = set()  # tokens that may create repos and push
        self.tokens: dict[str, dict] = {}  # token -> what whoami answers (write tokens answer as whoami_payload())
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, as the Hub's LFS storage
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

    def add_token(self, token: str, **whoami: object) -> dict:
        """A token whoami knows (arguments of `whoami_payload`); it may push only if also in write_tokens."""
        self.tokens[token] = whoami_payload(**whoami)  # type: ignore[arg-type]
        return self.tokens[token]

    def fail(self, method: str, path_contains: str, action: int | str, times: int = 1) -> None:
        """The next `times` requests whose path contains `path_contains` get `action` instead."""
        with self._lock:
            self._faults.append(Fault(method, path_contains, action, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

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
        self._server = _Server(("127.0.0.1", 0), handler)
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
        elif isinstance(action, int):
            self._send_json(action, {"error": f"injected HTTP {action}"})
            return
        if method in ("POST", "PUT"):
            return self._write(method, raw_path, body)

        parts = raw_path.strip("/").split("/")
        if parts == ["api", "whoami-v2"]:
            return self._whoami()
        if parts[:1] == ["api"] and len(parts) == 4 and parts[1] in ("models", "datasets"):
            return self._repo_info(parts[1][:-1], f"{unquote(parts[2])}/{unquote(parts[3])}", "main")
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

    def _whoami(self) -> None:
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ") if auth else None
        payload = self.hub.tokens.get(token) if token else None
        if payload is None and token in self.hub.write_tokens:
            payload = whoami_payload()
        if payload is None:
            return self._send_json(401, {"error": "Invalid credentials in Authorization header"})
        self._send_json(200, payload)

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

    # ------------------------------------------------------------ uploads

    def _writer_refused(self) -> bool:
        """Answer 401/403 unless the request carries a write token."""
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ") if auth else None
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
        if self._writer_refused():
            return
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            repo_type = "dataset" if parts[0] == "datasets" else "model"
            owner_name = parts[1:-4] if repo_type == "dataset" else parts[:-4]
            return self._lfs_batch(json.loads(body), repo_type, "/".join(owner_name).removesuffix(".git"))
        if method == "POST" and parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("models", "datasets"):
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
        if (repo_type, repo_id) in self.hub.repos:
            return self._send_json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{prefix}{repo_id}"})
        self.hub.add_repo(repo_id, {}, repo_type=repo_type)
        self._send_json(200, {"url": f"{self.hub.url}/{prefix}{repo_id}"})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> None:
        found = self._find(repo_type, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        files = []
        for entry in payload["files"]:
            mode = _lfs_mode(base64.b64decode(entry["sample"]), entry["size"])
            existing = repo.files.get(entry["path"])
            files.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False,
                          "oid": _oid(existing, mode) if existing is not None else None})
        self._send_json(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, payload: dict, repo_type: str, repo_id: str) -> None:
        if (repo_type, repo_id) not in self.hub.repos:
            return self._send_json(404, {"error": "Repository not found"}, error_code="RepoNotFound")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:  # only what the storage lacks is sent
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
        repo, parent = found
        files = dict(repo.files)
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    return self._send_json(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                files[value["path"]] = data
            elif item["key"] in ("deletedFile", "deletedFolder"):
                files = {k: v for k, v in files.items() if k != value["path"] and not k.startswith(value["path"].rstrip("/") + "/")}
        sha = hashlib.sha1(repr((parent, sorted(files.items()))).encode()).hexdigest()
        with self.hub._lock:
            repo.files, repo.sha = files, sha
            repo.branches[revision] = sha
            repo.commits.append(sha)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send_json(200, {"commitUrl": f"{self.hub.url}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                              "success": True})

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
