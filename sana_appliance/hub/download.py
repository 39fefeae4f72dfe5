"""Fetch the base model and Hub datasets. The only module in the appliance that downloads.

Built on huggingface_hub (its cache layout, atomic blob downloads and per-file locks)
plus three things it does not give us:

* Pinning: a branch or tag is resolved to a commit sha once, and exactly that sha is
  downloaded and recorded, so a run can say which weights it trained from even if the
  branch moves mid-download or between ranks.
* Retries of transient failures for `hub_retry_window_s` around the resolve and the
  download, each retry logged: the rule shared with uploads (hub/retry.py), which looks
  through the cause chain because huggingface_hub swallows some network errors into a
  "not in the local cache" error.
* Errors a user can act on: gated/private repos, typos in repo ids or revisions, an
  empty offline cache. The HF token never appears in a message or log line.

Several ranks call this at once: a file lock under HF_HOME lets one process download
while the others wait and then find the cache complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import filelock
import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..core.errors import AssetError
from ..core.fsutil import atomic_open
from ..core.workspace import Credentials, HubSettings, Workspace
from . import retry as hubretry

LOG = logging.getLogger(__name__)

LIBRARY_NAME = "sana-appliance"
DEFAULT_ENDPOINT = hubretry.DEFAULT_ENDPOINT
EXAMPLE_MODEL = "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers"
# The components a SanaPipeline is assembled from; each is a subfolder of the pipeline folder.
SANA_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_OWNER_NAME = re.compile(r"^[^/\s]+/[^/\s]+$")

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSource:
    """Where the base model's files are, and which exact version they are."""

    path: Path  # local folder in diffusers layout (model_index.json, transformer/, vae/, ...)
    kind: str  # "local" or "hub"
    repo_id: str | None
    revision: str | None  # what the user asked for, e.g. "main"
    commit_sha: str | None  # the exact commit that was downloaded (None for local)


@dataclass(frozen=True)
class _Target:
    """One Hub repo at one requested revision, plus what messages need to know about it."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str
    endpoint: str
    has_token: bool
    token_source: str | None = None  # the environment variable the token came from
    looked_for: Path | None = None  # the local folder a model spec could also have meant

    def web_url(self, endpoint: str) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"{endpoint}/{prefix}{self.repo_id}"

    def __str__(self) -> str:
        return f"{self.repo_type} repo {self.repo_id!r} (revision {self.revision!r})"


# ---------------------------------------------------------------- public API


def fetch_model(
    spec: str,
    revision: str,
    workspace: Workspace,
    hub: HubSettings,
    credentials: Credentials,
) -> ModelSource:
    """Find or download the base model named by `spec` (pretrained_model_name_or_path).

    `spec` is an existing folder (absolute, or relative to the workspace root) or a Hub
    repo id `owner/name`. Hub models go to the HF cache at `workspace.hf_home/hub`.
    Transient Hub failures are retried for `hub.retry_window_s` seconds.
    Raises AssetError (exit code 3) with the fix.
    """
    folder = _existing_local_folder(spec, workspace)
    if folder is not None:
        _check_pipeline_folder(folder, f"local model folder {folder}")
        return ModelSource(path=folder, kind="local", repo_id=None, revision=None, commit_sha=None)

    _check_repo_id(spec, what="pretrained_model_name_or_path", workspace=workspace)
    target = _target(spec, "model", revision, hub, credentials, looked_for=workspace.resolve(spec))
    cache_dir = workspace.hf_home / "hub"
    if hub.offline:
        sha, path = _from_cache(target, cache_dir=cache_dir, local_dir=None)
    else:
        with _download_lock(workspace.hf_home / "sana-appliance" / "locks", target):
            sha, path = _download(target, cache_dir, None, credentials, hub)
    _check_pipeline_folder(path, f"{target} at commit {sha}")
    return ModelSource(path=path, kind="hub", repo_id=spec, revision=target.revision, commit_sha=sha)


def fetch_dataset(
    repo_id: str,
    revision: str,
    dest: Path,
    hub: HubSettings,
    credentials: Credentials,
) -> tuple[Path, str]:
    """Download a Hub *dataset* repo at `revision` into the folder `dest`; returns (dest, commit sha).

    Files appear under `dest` with their repo paths. huggingface_hub keeps its bookkeeping
    (per-file metadata, the tree listing, the revision -> sha ref) in `dest/.cache/huggingface`,
    so a later call with `hub.offline` finds the same sha without the network.
    """
    _check_repo_id(repo_id, what="dataset repo", workspace=None)
    target = _target(repo_id, "dataset", revision, hub, credentials)
    dest = Path(dest).expanduser().absolute()
    cache_dir = dest / ".cache" / "huggingface" / "hub"
    if hub.offline:
        sha, path = _from_cache(target, cache_dir=cache_dir, local_dir=dest)
        return path, sha
    with _download_lock(dest / ".cache" / "huggingface" / "sana-appliance-locks", target):
        sha, path = _download(target, cache_dir, dest, credentials, hub)
    return path, sha


# ---------------------------------------------------------------- specs and local folders


def _existing_local_folder(spec: str, workspace: Workspace) -> Path | None:
    """The folder `spec` names, if it exists; None if `spec` should be read as a Hub repo id."""
    if not spec or not spec.strip():
        raise AssetError(
            "pretrained_model_name_or_path is empty: set it to a local diffusers folder or a Hub repo id, "
            f"e.g. {EXAMPLE_MODEL}"
        )
    path = workspace.resolve(spec.strip())
    if path.is_dir():
        return path
    if path.exists():
        raise AssetError(
            f"pretrained_model_name_or_path={spec!r}: {path} is a file, not a folder; point it at the "
            "pipeline folder that holds model_index.json"
        )
    # Something written like a path (not like owner/name) that does not exist is a typo or a
    # missing volume mount, not a Hub id: say so instead of asking the Hub about it.
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec):
        raise AssetError(
            f"pretrained_model_name_or_path={spec!r}: the folder {path} does not exist. Check the path "
            f"(relative paths start at the workspace {workspace.root}) and that its volume is mounted, or "
            f"use a Hub repo id like {EXAMPLE_MODEL}"
        )
    return None


def _check_repo_id(repo_id: str, *, what: str, workspace: Workspace | None) -> None:
    problem = None
    if not _OWNER_NAME.fullmatch(repo_id):
        problem = "a Hub repo id has the form owner/name"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc).splitlines()[0]
    if problem is None:
        return
    if workspace is not None:
        raise AssetError(
            f"{what}={repo_id!r} is neither an existing folder (looked for {workspace.resolve(repo_id)}) nor a "
            f"valid Hub repo id ({problem}). Use a folder in diffusers layout (absolute, or relative to the "
            f"workspace {workspace.root}) or a Hub repo id of the form owner/name, e.g. {EXAMPLE_MODEL}"
        )
    raise AssetError(f"{what} {repo_id!r} is not a valid Hub repo id ({problem}): use owner/name")


def _check_pipeline_folder(folder: Path, origin: str) -> None:
    """Fail early, naming what is missing, instead of deep inside diffusers' from_pretrained."""
    fix = (
        "Use a folder written by SanaPipeline.save_pretrained (model_index.json, "
        f"{'/, '.join(SANA_COMPONENTS)}/) or a Hub repo in diffusers layout, e.g. {EXAMPLE_MODEL}"
    )
    index = folder / "model_index.json"
    if not index.is_file():
        raise AssetError(f"{origin} is not a diffusers pipeline folder: {index} is missing. {fix}")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"{origin}: {index} cannot be read as JSON ({exc}). {fix}") from None
    if not isinstance(data, dict):
        raise AssetError(f"{origin}: {index} must hold a JSON object. {fix}")
    not_listed = [name for name in SANA_COMPONENTS if name not in data]
    if not_listed:
        raise AssetError(
            f"{origin}: {index} does not list the Sana component(s) {', '.join(not_listed)} "
            f"(it is a {data.get('_class_name', 'unknown')} pipeline). {fix}"
        )
    missing = [
        name
        for name, value in data.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise AssetError(
            f"{origin}: model_index.json lists {', '.join(missing)} but the folder(s) "
            f"{', '.join(str(folder / name) for name in missing)} are missing. {fix}"
        )
    class_name = str(data.get("_class_name", ""))
    if "Sana" not in class_name:
        LOG.warning("%s is a %s pipeline, not a Sana one; loading it as Sana may fail", origin, class_name or "unnamed")


# ---------------------------------------------------------------- Hub downloads


def _target(
    repo_id: str,
    repo_type: str,
    revision: str,
    hub: HubSettings,
    credentials: Credentials,
    looked_for: Path | None = None,
) -> _Target:
    return _Target(
        looked_for=looked_for,
        repo_id=repo_id,
        repo_type=repo_type,
        revision=(revision or "main").strip(),
        endpoint=(hub.endpoint or DEFAULT_ENDPOINT).rstrip("/"),
        has_token=bool(credentials.hf_token),
        token_source=credentials.hf_token_source,
    )


def _token(credentials: Credentials) -> str | bool:
    # False, not None: None would make huggingface_hub fall back to a token saved on disk or in
    # the process environment, and the run must use exactly the credentials it resolved.
    return credentials.hf_token or False


@contextmanager
def _download_lock(lock_dir: Path, target: _Target) -> Iterator[None]:
    """Hold a lock per repo so one process downloads while the other ranks wait."""
    lock = filelock.FileLock(str(lock_dir / f"{_folder_name(target)}.lock"))
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            LOG.info("another process is downloading %s; waiting for it (lock %s)", target, lock.lock_file)
            lock.acquire()  # no timeout: a large model can take a long time to download
    except OSError as exc:
        raise AssetError(
            f"cannot create the download lock {lock.lock_file} ({exc.strerror or exc}): the cache folder must be "
            "writable to download; fix its permissions, or set HF_HUB_OFFLINE=1 to use a read-only cache"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _download(
    target: _Target,
    cache_dir: Path,
    local_dir: Path | None,
    credentials: Credentials,
    hub: HubSettings,
) -> tuple[str, Path]:
    """Resolve the revision to a sha, then download exactly that sha. Each step retried on its own."""
    token = _token(credentials)
    api = HfApi(endpoint=target.endpoint, token=token, library_name=LIBRARY_NAME)

    def resolve() -> str:
        # repo_info has no timeout unless given one: a Hub that never answers would hang the run.
        info = api.repo_info(target.repo_id, repo_type=target.repo_type, revision=target.revision, token=token,
                             timeout=hubretry.request_timeout())
        if not info.sha:
            raise AssetError(
                f"{target}: {target.endpoint} answered without a commit sha; check that HF_ENDPOINT points at a "
                "Hugging Face Hub (or a mirror of it)"
            )
        return info.sha

    def download() -> Path:
        folder = snapshot_download(
            target.repo_id,
            repo_type=target.repo_type,
            revision=sha,
            cache_dir=str(cache_dir),
            local_dir=str(local_dir) if local_dir is not None else None,
            endpoint=target.endpoint,
            token=token,
            library_name=LIBRARY_NAME,
        )
        return Path(folder)

    policy = hubretry.RetryPolicy(hub.retry_window_s)
    sha = _with_retries(resolve, f"resolve {target}", target, cache_dir, policy, credentials)
    LOG.info("%s is commit %s; downloading it", target, sha)
    path = _with_retries(download, f"download {target} at commit {sha}", target, cache_dir, policy, credentials)
    if target.revision != sha:
        _write_ref(cache_dir, target, sha)
    return sha, path


def _folder_name(target: _Target) -> str:
    """huggingface_hub's cache folder name for a repo, e.g. models--owner--name."""
    return f"{target.repo_type}s--{target.repo_id.replace('/', '--')}"


def _ref_path(cache_dir: Path, target: _Target) -> Path | None:
    """Where the cache records which sha a branch or tag pointed to (None for odd revisions
    such as `../x` that would land outside the cache)."""
    parts = Path(target.revision).parts
    if not parts or Path(target.revision).is_absolute() or ".." in parts:
        return None
    return cache_dir / _folder_name(target) / "refs" / target.revision


def _write_ref(cache_dir: Path, target: _Target, sha: str) -> None:
    """Record revision -> sha in the cache's refs/ folder, as huggingface_hub does, so offline runs
    can resolve `main` later. We download by sha, so huggingface_hub does not write it itself."""
    ref = _ref_path(cache_dir, target)
    if ref is None:
        return
    with atomic_open(ref) as handle:
        handle.write(sha)


def _from_cache(target: _Target, *, cache_dir: Path, local_dir: Path | None) -> tuple[str, Path]:
    """Offline: resolve the revision from the cache's refs and return the cached snapshot."""
    where = local_dir if local_dir is not None else cache_dir
    fix = (
        f"Run once with network access (HF_HUB_OFFLINE unset) to fill the cache, or mount a cache that holds "
        f"it at {where}"
    )
    if _COMMIT_SHA.fullmatch(target.revision):
        sha = target.revision
    else:
        ref = _ref_path(cache_dir, target)
        try:
            sha = ref.read_text(encoding="utf-8").strip() if ref is not None else ""
        except OSError:
            sha = ""
        if not sha:
            raise AssetError(f"HF_HUB_OFFLINE is set but {target} is not in the cache (no {ref}). {fix}")
    try:
        folder = snapshot_download(
            target.repo_id,
            repo_type=target.repo_type,
            revision=sha,
            cache_dir=str(cache_dir),
            local_dir=str(local_dir) if local_dir is not None else None,
            local_files_only=True,
        )
    except (LocalEntryNotFoundError, OSError) as exc:
        raise AssetError(
            f"HF_HUB_OFFLINE is set but {target} at commit {sha} is missing or incomplete in the cache "
            f"({type(exc).__name__}). {fix}"
        ) from None
    LOG.info("offline: using cached %s at commit %s", target, sha)
    return sha, Path(folder)


# ---------------------------------------------------------------- retries and errors


def _with_retries(
    call: Callable[[], T], what: str, target: _Target, cache_dir: Path, policy: hubretry.RetryPolicy,
    credentials: Credentials,
) -> T:
    """Run `call` under the shared Hub retry rule; turn a final failure into an AssetError."""
    secrets = credentials.values()
    hubretry.ensure_request_timeouts()
    try:
        return hubretry.call_with_retries(call, what=what, policy=policy, secrets=secrets, log=LOG)
    except hubretry.HubUnavailable as gave_up:
        raise _asset_error(gave_up, what, target, cache_dir) from None


def _auth_advice(target: _Target) -> str:
    # Licenses are accepted on huggingface.co itself, also when HF_ENDPOINT names a mirror.
    license_step = f"open {target.web_url(DEFAULT_ENDPOINT)} while logged in and accept its license / request access"
    if target.has_token:
        name = hubretry.token_name(target.token_source)
        return (
            f"{name} is set but the Hub refused it for this repo: {license_step} with the account that owns "
            "the token, and check that the token has read access (fine-grained tokens need the repo or "
            "'public gated repos' read permission)"
        )
    return (
        f"no HF_TOKEN is set: {license_step}, then set HF_TOKEN to a read token from "
        "https://huggingface.co/settings/tokens"
    )


def _asset_error(gave_up: hubretry.HubUnavailable, what: str, target: _Target, cache_dir: Path) -> AssetError:
    """Turn a huggingface_hub / network failure into a message that says what to do."""
    exc = gave_up.__cause__ or gave_up
    failure = gave_up.failure
    chain = list(hubretry.causes(exc))
    detail = failure.detail

    def first(kind: type) -> BaseException | None:
        return next((link for link in chain if isinstance(link, kind)), None)

    if first(RevisionNotFoundError) is not None:
        return AssetError(
            f"revision {target.revision!r} was not found in {target.repo_type} repo {target.repo_id!r} on "
            f"{target.endpoint}: check the revision (a branch, tag or commit sha; e.g. main) and the repo id's "
            f"spelling at {target.web_url(target.endpoint)}"
        )
    if failure.kind == "auth" and (first(GatedRepoError) is not None or first(RepositoryNotFoundError) is None):
        return AssetError(f"{target} is gated or private and cannot be downloaded: {_auth_advice(target)}. ({detail})")
    if first(RepositoryNotFoundError) is not None:
        hint = (
            f"if it is private, check that {hubretry.token_name(target.token_source)}'s account can read it"
            if target.has_token
            else "if it is private or gated, set HF_TOKEN to a token with read access"
        )
        return AssetError(
            f"{target.repo_type} repo {target.repo_id!r} was not found on {target.endpoint} "
            f"(HTTP {failure.status or 404}): check the spelling of owner/name and the revision "
            f"{target.revision!r}; {hint}"
            + (f". No local folder {target.looked_for} exists either" if target.looked_for else "")
        )
    if first(EntryNotFoundError) is not None and first(LocalEntryNotFoundError) is None:
        return AssetError(f"{target}: a file listed by the Hub could not be found while downloading ({detail}); try again")
    if failure.kind == "proxy":
        return AssetError(f"could not {what}: the HTTP proxy failed ({detail}); check HTTPS_PROXY / HTTP_PROXY")
    if failure.kind == "offline":
        return AssetError(
            f"could not {what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set) "
            f"and {target} is not in the cache at {cache_dir}. Unset it to download, or mount a cache that holds it"
        )
    if failure.transient:
        return AssetError(
            f"could not {what}: {detail} ({gave_up.attempts} attempt(s) over {gave_up.elapsed_s:.0f} s). "
            f"{hubretry.transient_advice(failure, target.endpoint)}. If the files are already cached at {cache_dir}, "
            "set HF_HUB_OFFLINE=1 to use them without the network"
        )
    if isinstance(exc, OSError) and failure.status is None and first(httpx2.HTTPError) is None:
        return AssetError(f"could not {what}: cannot write to {cache_dir} ({detail}); check free space and permissions")
    return AssetError(f"could not {what}: {detail}")
