"""Uploads to the Hugging Face Hub: the only module that pushes anything, from one background worker.

What goes up is the table :data:`UPLOAD_TARGETS`:

- ``checkpoint``: each checkpoint once it is complete (push_checkpoints_to_hub), to
  ``checkpoints/<config hash>/<run id>/checkpoint-<step>/`` in the repo. Its files go in one commit and
  its ``COMPLETE`` marker in a second one, so a half-uploaded checkpoint never looks valid. The run's
  identity names the folders: the config hash without neutral keys (another config pushed to the same
  repo never mixes its checkpoints in) and the run id, the UTC time the run started at step 0 (a run
  started over with resume_from_checkpoint=none gets a folder of its own; the newest is resumed). After
  each one, older remote checkpoints of the run beyond ``hub_keep_checkpoints`` (default
  ``checkpoints_total_limit``) are deleted.
- ``progress``: validation images and grids, metrics.jsonl, data_report.json, run.json and the run report
  (report.html with its plots in report/), to ``run/``, at most every
  ``hub_sync_interval_s`` seconds while training, with each checkpoint, and at the end.
- ``final``: the exported pipeline (with the model card) at the repo root, plus the single-file weights.

Jobs wait in a queue persisted in ``output/.hub-uploads.json`` (written atomically), so a restart knows what
is unsent. One daemon thread (:class:`Uploader`) works through it; the training loop only appends. Before a
file goes up it is compared with what the repo holds (the LFS sha256, or the git blob id of a small
file): a restart after kill -9 mid-upload sends only what is missing, and unchanged content makes no
commit. Transient failures (refused, DNS, timeouts, 429, 5xx) are retried with backoff for as long as the
run lives; 401/403 stop uploads with one message (training goes on, outputs stay local). At the end the run
waits for the queue at most ``hub_upload_wait_s`` and exits 6 with the list of what is unsent; the next
start sends it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import AssetError, UploadsUnsent
from ..core.fsutil import atomic_path, atomic_write_json, safetensors_problem
from . import retry as hubretry

log = logging.getLogger(__name__)

LIBRARY_NAME = "sana-appliance"
QUEUE_FILE = ".hub-uploads.json"
QUEUE_FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/<config hash>/checkpoint-<step>/ in the repo
RUN_DIR = "run"  # validation images and the run's records
CHECKPOINT_MARKER = "COMPLETE"  # run/checkpoints.py's marker: uploaded last
SMALL_FILE = 10 * 2**20  # the Hub keeps files this small in git (blob id) unless they are binary (LFS)
PROGRESS_FILES = ("metrics.jsonl", "data_report.json", "run.json", "report.html")  # read once per job: they change
REPORT_PLOTS = "report"  # run/report.py's PLOTS_DIR: the report's PNGs, beside report.html


# ---------------------------------------------------------------- what the completion marker records


def hub_endpoint(resolved) -> str:
    return hubretry.endpoint_of(resolved.hub.endpoint)


def _hub_kwargs(resolved) -> dict:
    # token False, not None: None would let huggingface_hub fall back to a token saved on disk.
    return {"endpoint": hub_endpoint(resolved), "token": resolved.credentials.hf_token or False}


def is_done(resolved, record: dict | None) -> bool:
    """Whether the completion marker's upload record covers this config (same repo, same Hub)."""
    if not isinstance(record, dict):  # null (push_to_hub was off) or a marker edited by hand
        return False
    return record.get("status") == "uploaded" and record.get("repo") == resolved.config.hub_model_id \
        and record.get("endpoint") == hub_endpoint(resolved)


def wanted(resolved, record: dict | None) -> bool:
    """push_to_hub is on and final/ is not yet on the Hub repo it names."""
    return bool(resolved.config.push_to_hub) and not is_done(resolved, record)


def pending(resolved) -> dict:
    return {"repo": resolved.config.hub_model_id, "endpoint": hub_endpoint(resolved), "status": "pending"}


def failed(resolved, error: str) -> dict:
    return {**pending(resolved), "status": "failed", "error": error}


# ---------------------------------------------------------------- checking final/


ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # an adapter export's weights (model/adapters.py ADAPTER_FILE)


def check_final(folder: Path) -> list[str]:
    """What is missing or broken in an exported pipeline or adapter folder (empty: complete)."""
    if not (folder / "model_index.json").exists() and (folder / ADAPTER_WEIGHTS).is_file():  # model_type lora
        problems = [] if (folder / "README.md").is_file() else [f"{folder / 'README.md'} (the model card) is missing"]
        if (folder / "merged").exists():
            problems += check_final(folder / "merged")
        return problems + [f"{w.parent}/{p}" for w in sorted(folder.glob("*.safetensors"))
                           if (p := safetensors_problem(w))]
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return [f"{index} is missing or unreadable"]
    if not isinstance(data, dict):
        return [f"{index} does not hold a JSON object"]
    problems = [
        f"{folder / name}/ is missing"
        for name, value in data.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if not (folder / "README.md").is_file():
        problems.append(f"{folder / 'README.md'} (the model card) is missing")
    weights = sorted((folder / "transformer").glob("*.safetensors"))
    if not weights:
        problems.append(f"{folder / 'transformer'} holds no .safetensors weights")
    problems += [f"{w.parent}/{p}" for w in sorted(folder.rglob("*.safetensors")) if (p := safetensors_problem(w))]
    return problems


# ---------------------------------------------------------------- what goes up


def checkpoint_prefix(config_hash: str, run_id: str | None = None) -> str:
    """checkpoints/<config hash>[/<run id>] in the repo."""
    return f"{CHECKPOINTS_DIR}/{config_hash}" + (f"/{run_id}" if run_id else "")


def _tree_files(root: Path, prefix: str) -> list[tuple[Path, str]]:
    if not root.is_dir():
        return []
    return [(p, f"{prefix}{p.relative_to(root).as_posix()}") for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def _checkpoint_files(output_dir: Path, job: dict) -> list[tuple[Path, str]]:
    """Exactly the files the checkpoint's marker vouches for (a sharded checkpoint's `sharded/.metadata` too);
    the whole folder but hidden files for a marker without a manifest."""
    folder = output_dir / CHECKPOINTS_DIR / f"checkpoint-{job['step']}"
    remote = f"{checkpoint_prefix(job['config_hash'], job['run_id'])}/checkpoint-{job['step']}/"
    try:
        listed = json.loads((folder / CHECKPOINT_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, dict):
        return [(folder / name, remote + name) for name in sorted(listed)]
    return [(p, r) for p, r in _tree_files(folder, remote) if p.name != CHECKPOINT_MARKER]


def _checkpoint_marker(output_dir: Path, job: dict) -> tuple[Path, str] | None:
    folder = output_dir / CHECKPOINTS_DIR / f"checkpoint-{job['step']}"
    remote = f"{checkpoint_prefix(job['config_hash'], job['run_id'])}/checkpoint-{job['step']}/{CHECKPOINT_MARKER}"
    return folder / CHECKPOINT_MARKER, remote


def _checkpoint_gone(output_dir: Path, job: dict) -> str | None:
    folder = output_dir / CHECKPOINTS_DIR / f"checkpoint-{job['step']}"
    if not (folder / CHECKPOINT_MARKER).is_file():
        return (f"{folder.name} was removed locally (checkpoints_total_limit) before it reached the Hub: uploads are "
                "slower than checkpointing; raise checkpointing_steps or checkpoints_total_limit to keep every one")
    return None


def _progress_files(output_dir: Path, job: dict) -> list[tuple[Path, str]]:
    files = _tree_files(output_dir / "validation", f"{RUN_DIR}/validation/")
    files += _tree_files(output_dir / REPORT_PLOTS, f"{RUN_DIR}/{REPORT_PLOTS}/")
    return files + [(output_dir / name, f"{RUN_DIR}/{name}") for name in PROGRESS_FILES if (output_dir / name).is_file()]


def _final_files(output_dir: Path, job: dict) -> list[tuple[Path, str]]:
    singles = [(output_dir / n, n) for n in ("transformer.safetensors", "transformer_ema.safetensors",
                                             "adapter.safetensors", "adapter_ema.safetensors")
               if (output_dir / n).is_file()]
    return _tree_files(output_dir / "final", "") + singles


def _final_problem(output_dir: Path, job: dict) -> str | None:
    problems = check_final(output_dir / "final")
    return f"final/ is incomplete ({'; '.join(problems)})" if problems else None


@dataclass(frozen=True)
class UploadTarget:
    """One kind of upload job: the entry of :data:`UPLOAD_TARGETS`."""

    name: str
    doc: str
    files: Callable[[Path, dict], list[tuple[Path, str]]]  # (local file, path in repo) of a job
    marker: Callable[[Path, dict], tuple[Path, str] | None]  # the file that goes up last, in its own commit
    problem: Callable[[Path, dict], str | None]  # why the job cannot go up (None: it may)


def _no_marker(output_dir: Path, job: dict) -> None:
    return None


def _no_problem(output_dir: Path, job: dict) -> None:
    return None


UPLOAD_TARGETS: dict[str, UploadTarget] = {spec.name: spec for spec in (
    UploadTarget("checkpoint", "a complete checkpoint, marker last", _checkpoint_files, _checkpoint_marker, _checkpoint_gone),
    UploadTarget("progress", "validation images, metrics.jsonl, data_report.json, run.json, report", _progress_files,
                 _no_marker, _no_problem),
    UploadTarget("final", "the exported pipeline with its model card, and the single-file weights", _final_files,
                 _no_marker, _final_problem),
)}


def end_problems(output_dir: Path) -> list[str]:
    """What keeps final/ from going up (empty: it is complete)."""
    return check_final(output_dir / "final")


def job_id(kind: str, step: int | None = None) -> str:
    return f"checkpoint-{step}" if kind == "checkpoint" else kind


# ---------------------------------------------------------------- comparing with the repo


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Digests:
    """sha256 (and, for small files, the git blob id) of local files, kept while size and mtime hold."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], tuple[str, str | None]] = {}

    def of(self, path: Path, content: bytes | None = None) -> tuple[str, str | None]:
        if content is not None:
            return hashlib.sha256(content).hexdigest(), git_blob_oid(content) if len(content) <= SMALL_FILE else None
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._known:
            sha = hashlib.sha256()
            git = hashlib.sha1(b"blob %d\0" % stat.st_size) if stat.st_size <= SMALL_FILE else None
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    sha.update(chunk)
                    if git is not None:
                        git.update(chunk)
            self._known[key] = (sha.hexdigest(), git.hexdigest() if git is not None else None)
        return self._known[key]


def _same(remote, size: int, digests: tuple[str, str | None]) -> bool:
    """Whether a RepoFile of the repo holds exactly this content."""
    if remote is None or remote.size != size:
        return False
    sha256, blob = digests
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == sha256
    return blob is not None and remote.blob_id == blob


# ---------------------------------------------------------------- the worker


class _Superseded(Exception):
    """The job's files are gone locally (a newer checkpoint replaced it)."""


def _api(resolved):
    from huggingface_hub import HfApi

    return HfApi(**_hub_kwargs(resolved), library_name=LIBRARY_NAME)


def remote_files(api, repo_id: str, prefix: str) -> dict:
    """path -> RepoFile for every file under `prefix` in the repo ({} when the folder does not exist)."""
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = api.list_repo_tree(repo_id, path_in_repo=prefix or None, recursive=True)
        return {e.path: e for e in entries if isinstance(e, RepoFile)}
    except EntryNotFoundError:
        return {}


def _auth_message(failure: hubretry.Failure, resolved) -> str:
    token = hubretry.token_name(resolved.credentials.hf_token_source)
    repo_id = resolved.config.hub_model_id
    if failure.status == 401:
        return (f"{hub_endpoint(resolved)} no longer accepts the token in {token} (HTTP 401: invalid, expired or revoked). "
                f"Set {token} to a write token from https://huggingface.co/settings/tokens")
    return (f"the token in {token} may not write to {repo_id} (HTTP {failure.status or 403}); use a token with write "
            f"access to {repo_id}, or set hub_model_id to a repo that token can write to")


class Uploader:
    """The background upload worker of one run (rank 0 only). `add` never waits on the network."""

    def __init__(self, resolved, output_dir: Path, *, api=None):
        self.resolved = resolved
        self.cfg = resolved.config
        self.output_dir = Path(output_dir)
        self.queue_path = self.output_dir / QUEUE_FILE
        self._api = api or _api(resolved)
        self._cond = threading.Condition()
        self._jobs: list[dict] = self._load()
        self._failed: dict[str, str] = {}  # job id -> why it cannot go up (this process does not try it again)
        self.blocked: str | None = None  # set by a 401/403: nothing more goes up in this process
        self.last_commit: str = ""
        self.commits = 0
        self._repo_ready = False
        self._closing = False
        self._wake_at = 0.0  # a backoff in progress: no try before this time
        self._last_failure: hubretry.Failure | None = None  # the transient failure being retried, if any
        self._busy: str | None = None  # the job being sent
        self._again: set[str] = set()  # jobs added again while being sent: they stay queued for one more pass
        # Backoff from the window (tests use seconds), with a floor: a window of 0 must not mean a try every 50 ms.
        self._policy = hubretry.RetryPolicy(max(resolved.hub.retry_window_s, 8.0))
        self._digests = _Digests()
        self._thread = threading.Thread(target=self._loop, name="hub-uploads", daemon=True)
        if self._jobs:
            log.info("Hub uploads: %d job(s) left from an earlier start in %s (%s): sending them",
                     len(self._jobs), self.queue_path, ", ".join(j["id"] for j in self._jobs))

    # ------------------------------------------------------------ the queue

    def _load(self) -> list[dict]:
        try:
            doc = json.loads(self.queue_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("Hub uploads: %s is unreadable (%s); starting with an empty queue (files already on the "
                        "Hub are not sent again)", self.queue_path, exc)
            return []
        jobs = doc.get("jobs") if isinstance(doc, dict) else None
        return [j for j in jobs or [] if isinstance(j, dict) and j.get("kind") in UPLOAD_TARGETS and "id" in j]

    def _save(self) -> None:  # under the lock
        atomic_write_json(self.queue_path, {"format": QUEUE_FORMAT, "jobs": self._jobs}, indent=1)

    def add(self, kind: str, **fields) -> None:
        """Queue a job (a job with the same id already waiting is kept: it will send the newest files)."""
        job = {"id": job_id(kind, fields.get("step")), "kind": kind, **fields,
               "queued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._cond:
            self._failed.pop(job["id"], None)
            if any(j["id"] == job["id"] for j in self._jobs):
                if self._busy == job["id"]:  # it may have read its files already: it goes up once more after
                    self._again.add(job["id"])
            else:
                self._jobs.append(job)
                try:
                    self._save()
                except OSError as exc:  # e.g. a full disk: the job still goes up from memory; a restart may not know it
                    log.warning("Hub uploads: could not record %s in %s (%s); it is sent from memory", job["id"],
                                self.queue_path, exc.strerror or exc)
            self._cond.notify_all()

    def pending(self) -> list[str]:
        with self._cond:
            return [j["id"] for j in self._jobs]

    # ------------------------------------------------------------ the thread

    def start(self) -> Uploader:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # per-file upload bars from a background thread would break the run's log
        hubretry.ensure_request_timeouts()
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)  # a request in flight is abandoned: the queue says what is unsent

    def _next(self) -> dict | None:
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                ready = [j for j in self._jobs if j["id"] not in self._failed] if self.blocked is None else []
                if ready and now >= self._wake_at:
                    self._busy = ready[0]["id"]
                    return ready[0]
                self._cond.wait(timeout=(self._wake_at - now) if ready else None)
            return None

    def _loop(self) -> None:
        failures = 0
        while (job := self._next()) is not None:
            try:
                self._push(job)
                failures = 0
                self._done(job)
            except _Superseded as gone:
                log.warning("Hub uploads: %s", gone)
                self._done(job)
            except Exception as exc:  # every failure becomes a decision and a log line, never a dead thread
                gone = UPLOAD_TARGETS[job["kind"]].problem(self.output_dir, job) if job["kind"] == "checkpoint" else None
                if gone:  # pruned locally while its files were going up: a newer checkpoint replaces it
                    log.warning("Hub uploads: %s", gone)
                    self._done(job)
                    continue
                failure = hubretry.classify(exc, self.resolved.credentials.values())
                with self._cond:
                    self._busy = None
                    self._again.discard(job["id"])  # it is still queued: the next try reads the newest files
                if failure.transient:
                    self._last_failure = failure
                    failures += 1
                    wait = min(self._policy.max_wait_s, self._policy.first_wait_s * 2 ** (failures - 1))
                    wait += random.uniform(0, self._policy.first_wait_s)
                    log.warning("Hub upload of %s failed (%s); training goes on, retrying in %.1f s (try %d; the queue "
                                "is kept in %s)", job["id"], failure.detail, wait, failures, self.queue_path)
                    with self._cond:
                        self._wake_at = time.monotonic() + wait
                elif failure.kind == "auth":
                    with self._cond:
                        self.blocked = _auth_message(failure, self.resolved)
                        self._cond.notify_all()
                    log.error("Hub uploads stopped: %s. Training goes on and every output stays in %s; the queue (%s) "
                              "is sent by the next start with a working token", self.blocked, self.output_dir,
                              ", ".join(self.pending()))
                else:
                    message = failure.detail
                    if failure.kind == "other" and str(exc) and str(exc) not in message:
                        message += f" ({hubretry.redact(str(exc), self.resolved.credentials.values())})"
                    with self._cond:
                        self._failed[job["id"]] = message
                        self._cond.notify_all()
                    log.error("Hub upload of %s failed and is not retried in this run: %s; it stays queued for the "
                              "next start", job["id"], message)

    def _done(self, job: dict) -> None:
        with self._cond:
            self._last_failure = None
            self._busy = None
            self._wake_at = 0.0
            if job["id"] in self._again:  # newer files of it were queued while it went up
                self._again.discard(job["id"])
            else:
                self._jobs = [j for j in self._jobs if j["id"] != job["id"]]
                self._save()
            self._cond.notify_all()

    # ------------------------------------------------------------ one job

    def _commit(self, repo_id: str, items: Sequence[tuple[Path, str, bytes | None]], message: str,
                delete: Sequence[str] = ()) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list = [CommitOperationDelete(path_in_repo=name, is_folder=False) for name in delete]
        ops += [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=content if content is not None else str(path))
                for path, remote, content in items]
        info = self._api.create_commit(repo_id, operations=ops, commit_message=message)
        self.last_commit = getattr(info, "oid", "") or self.last_commit
        self.commits += 1

    def _push(self, job: dict) -> None:
        target = UPLOAD_TARGETS[job["kind"]]
        repo_id = self.cfg.hub_model_id
        problem = target.problem(self.output_dir, job)
        if problem:
            if job["kind"] == "checkpoint":
                raise _Superseded(problem)
            raise AssetError(problem)
        if not self._repo_ready:
            self._api.create_repo(repo_id, exist_ok=True, private=self.cfg.hub_private)
            self._repo_ready = True
        files = target.files(self.output_dir, job)
        marker = target.marker(self.output_dir, job)
        roots = {r.split("/", 1)[0] if "/" in r else "" for _, r in files + ([marker] if marker else [])}
        if "" in roots:  # something at the repo root: one listing of the whole repo
            roots = {""}
        remote: dict = {}
        for root in sorted(roots):
            remote.update(remote_files(self._api, repo_id, root))
        try:
            changed = self._changed(files, remote)
        except FileNotFoundError:
            raise _Superseded(target.problem(self.output_dir, job) or f"{job['id']}: its files vanished") from None
        start, sent = time.monotonic(), sum(len(c) if c is not None else p.stat().st_size for p, _, c in changed)
        # A marker already there for other files (an earlier run of the same config) goes in the same commit
        # that replaces them: the repo never shows a marker vouching for files it does not describe.
        stale = [marker[1]] if changed and marker is not None and marker[1] in remote else []
        if changed:
            self._commit(repo_id, changed, f"sana-appliance: {job['id']}", delete=stale)
            for name in stale:
                remote.pop(name, None)
        if marker is not None:
            if target.problem(self.output_dir, job):  # removed while its files went up: no marker for it
                raise _Superseded(target.problem(self.output_dir, job))
            changed_marker = self._changed([marker], remote)
            if changed_marker:
                self._commit(repo_id, changed_marker, f"sana-appliance: {job['id']} complete")
        log.info("Hub: %s is on %s (%d of %d file(s) sent, %.1f MB in %.1f s)", job["id"], repo_id, len(changed),
                 len(files) + (marker is not None), sent / 1e6, time.monotonic() - start)
        if job["kind"] == "checkpoint":
            try:
                self._prune_remote(repo_id, job["config_hash"], job["run_id"])
            except Exception as exc:  # the checkpoint is up; a prune that failed for good waits for the next one
                if hubretry.classify(exc, self.resolved.credentials.values()).transient:
                    raise
                log.warning("Hub: removing old checkpoints from %s failed (%s); tried again after the next checkpoint",
                            repo_id, hubretry.describe(exc, self.resolved.credentials.values()))

    def _changed(self, files: Sequence[tuple[Path, str]], remote: dict) -> list[tuple[Path, str, bytes | None]]:
        out = []
        for path, name in files:
            # Files rewritten in place during the run are read once, so what goes up matches its digest.
            content = path.read_bytes() if path.name in PROGRESS_FILES or path.parent.name == REPORT_PLOTS else None
            size = len(content) if content is not None else path.stat().st_size
            if not _same(remote.get(name), size, self._digests.of(path, content)):
                out.append((path, name, content))
        return out

    def _prune_remote(self, repo_id: str, config_hash: str, run_id: str) -> None:
        """Delete this run's remote checkpoints older than its newest `hub_keep_checkpoints` complete ones."""
        from huggingface_hub import CommitOperationDelete

        keep = self.cfg.hub_keep_checkpoints if self.cfg.hub_keep_checkpoints is not None else self.cfg.checkpoints_total_limit
        if not keep:
            return
        found = {step: ok for (run, step), ok in remote_checkpoints(self._api, repo_id, config_hash).items() if run == run_id}
        complete = sorted(step for step, ok in found.items() if ok)
        if len(complete) <= keep:
            return
        oldest_kept = complete[-keep]
        old = sorted(step for step in found if step < oldest_kept)
        prefix = checkpoint_prefix(config_hash, run_id)
        ops = [CommitOperationDelete(path_in_repo=f"{prefix}/checkpoint-{step}/", is_folder=True) for step in old]
        info = self._api.create_commit(repo_id, operations=ops,
                                       commit_message=f"sana-appliance: prune checkpoints ({keep} kept)")
        self.last_commit = getattr(info, "oid", "") or self.last_commit
        self.commits += 1
        log.info("Hub: removed %s from %s (hub_keep_checkpoints=%d)", ", ".join(f"checkpoint-{s}" for s in old), repo_id, keep)

    # ------------------------------------------------------------ waiting

    def drain(self, timeout_s: float, *, why: str, report_every_s: float = 10.0) -> list[str]:
        """Wait until the queue is empty, uploads are blocked, or `timeout_s` passed; log progress.
        Returns what is still unsent, each with its reason."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        next_report = time.monotonic()
        with self._cond:
            while True:
                left = [j for j in self._jobs if j["id"] not in self._failed]
                if not left or self.blocked is not None or not self._thread.is_alive():
                    break
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= next_report:
                    log.info("Hub uploads %s: %d job(s) left (%s); waiting up to %.0f s more", why, len(left),
                             ", ".join(j["id"] for j in left), deadline - now)
                    next_report = now + report_every_s
                self._cond.wait(timeout=min(deadline, next_report) - now)
            return self._unsent(timed_out=time.monotonic() >= deadline)

    def _unsent(self, *, timed_out: bool) -> list[str]:  # under the lock
        out = []
        for job in self._jobs:
            if job["id"] in self._failed:
                out.append(f"{job['id']}: {self._failed[job['id']]}")
            elif self.blocked is not None:
                out.append(f"{job['id']}: {self.blocked}")
            elif self._last_failure is not None:
                failure = self._last_failure
                out.append(f"{job['id']}: not sent in time, the Hub kept failing ({failure.detail}): "
                           f"{hubretry.transient_advice(failure, self.resolved.hub.endpoint, 'hub_upload_wait_s')}")
            else:
                out.append(f"{job['id']}: not sent in time (the upload was still running)")
        return out

    def unsent_error(self, unsent: list[str], *, waited_s: float) -> UploadsUnsent:
        body = "\n".join(f"  - {line}" for line in unsent)
        return UploadsUnsent(
            f"training finished and every output is in {self.output_dir}, but {len(unsent)} upload(s) to "
            f"{self.cfg.hub_model_id} did not complete (waited up to {waited_s:.0f} s, hub_upload_wait_s):\n{body}\n"
            f"They stay queued in {self.queue_path}: start again with the same config and they are sent without "
            "retraining.")


def queued(output_dir: Path) -> list[str]:
    """The ids of the jobs waiting in output_dir's upload queue (without starting a worker)."""
    try:
        doc = json.loads((Path(output_dir) / QUEUE_FILE).read_text())
    except (OSError, ValueError):
        return []
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    return [str(j["id"]) for j in jobs or [] if isinstance(j, dict) and "id" in j]


# ---------------------------------------------------------------- checkpoints on the Hub


def remote_checkpoints(api, repo_id: str, config_hash: str) -> dict[tuple[str, int], bool]:
    """(run id, step) -> complete (has its marker) for this config's checkpoints on the Hub."""
    import re

    prefix = checkpoint_prefix(config_hash) + "/"
    found: dict[tuple[str, int], bool] = {}
    pattern = re.compile(r"^([^/]+)/checkpoint-(\d+)/(.+)$")
    for path in remote_files(api, repo_id, checkpoint_prefix(config_hash)):
        match = pattern.match(path.removeprefix(prefix))
        if match:
            key = (match.group(1), int(match.group(2)))
            found[key] = found.get(key, False) or match.group(3) == CHECKPOINT_MARKER
    return found


@dataclass(frozen=True)
class RemoteCheckpoint:
    run_id: str
    step: int
    commit: str  # the repo's commit when it was listed: every file is fetched from that one snapshot


def call(fn: Callable, what: str, resolved):
    """`fn()` under the shared retry rule; a failure for good becomes an AssetError (exit 3) with advice."""
    try:
        return hubretry.call_with_retries(fn, what=what, policy=hubretry.RetryPolicy(resolved.hub.retry_window_s),
                                          secrets=resolved.credentials.values(), log=log)
    except hubretry.HubUnavailable as gave_up:
        failure = gave_up.failure
        if failure.transient:
            advice = hubretry.transient_advice(failure, resolved.hub.endpoint)
        elif failure.kind == "auth":
            advice = _auth_message(failure, resolved)
        elif failure.kind == "not_found":
            advice = f"{resolved.config.hub_model_id} changed while it was read (e.g. an old checkpoint was pruned)"
        else:
            advice = "check the repo and the network, then start again"
        raise AssetError(f"{what} failed: {failure.detail}. {advice}") from None


def find_remote_checkpoints(resolved, config_hash: str) -> list[RemoteCheckpoint]:
    """This config's complete checkpoints on the Hub, newest run first and, in a run, newest step first
    ([] when the repo has none or does not exist). A failure for good is an AssetError (exit 3): with the
    Hub unreachable the run cannot tell whether there is something to resume, and must not start over."""
    from huggingface_hub.errors import RepositoryNotFoundError

    api = _api(resolved)
    repo_id = resolved.config.hub_model_id

    def listing() -> tuple[str, dict[tuple[str, int], bool]]:
        try:
            head = api.repo_info(repo_id).sha or "main"
        except RepositoryNotFoundError:
            return "", {}
        return head, remote_checkpoints(api, repo_id, config_hash)

    head, found = call(listing, f"look for checkpoints of this run in {repo_id}", resolved)
    keys = sorted((key for key, complete in found.items() if complete), reverse=True)
    return [RemoteCheckpoint(run_id, step, head) for run_id, step in keys]


def download_checkpoint(resolved, config_hash: str, remote: RemoteCheckpoint, dest: Path) -> Path:
    """Download a checkpoint of this run into `dest` (a fresh folder), every file from the snapshot it was
    listed in; returns the checkpoint folder in it. The caller verifies it like a local checkpoint.
    Raises AssetError (exit 3) when the Hub fails for good."""
    from huggingface_hub import hf_hub_download

    api = _api(resolved)
    repo_id = resolved.config.hub_model_id
    prefix = f"{checkpoint_prefix(config_hash, remote.run_id)}/checkpoint-{remote.step}"
    files = call(lambda: sorted(remote_files(api, repo_id, prefix)), f"list {prefix} in {repo_id}", resolved)
    for name in files:
        call(lambda name=name: hf_hub_download(repo_id, name, revision=remote.commit, local_dir=str(dest),
                                               **_hub_kwargs(resolved)),
             f"download {name} from {repo_id}", resolved)
    return dest / prefix


def download_records(resolved, run_id: str, dest: Path) -> bool:
    """Put the Hub's run/metrics.jsonl into `dest` when run/run.json there belongs to run `run_id` (a run resumed
    on a new machine keeps its whole metrics history). False when it does not, or is not there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id = resolved.config.hub_model_id
    kwargs = _hub_kwargs(resolved)

    def fetch(name: str) -> bytes | None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".hub-records-", dir=dest) as tmp:
            try:
                return Path(hf_hub_download(repo_id, f"{RUN_DIR}/{name}", local_dir=tmp, **kwargs)).read_bytes()
            except EntryNotFoundError:
                return None

    record = call(lambda: fetch("run.json"), f"download {RUN_DIR}/run.json from {repo_id}", resolved)
    try:
        same_run = record is not None and json.loads(record).get("run_id") == run_id
    except ValueError:
        same_run = False
    metrics = call(lambda: fetch("metrics.jsonl"), f"download {RUN_DIR}/metrics.jsonl from {repo_id}",
                   resolved) if same_run else None
    if metrics is None:
        return False
    atomic_write_bytes(dest / "metrics.jsonl", metrics)
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
