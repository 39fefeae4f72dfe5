"""Uploads to the Hugging Face Hub: the only module that pushes anything.

What goes up is the table :data:`UPLOAD_TARGETS` (today one entry: the exported model folder,
which holds no secrets: the model card and run metadata are built from the redacted config).
Each target names its local folder, where it lands in the repo and the check that it is
complete; every target goes up at the end of the run, after export. Adding one is one entry
(and its test); the completion marker records the last commit. Failures follow the retry rule shared with
downloads (hub/retry.py). The completion marker records each upload (repo, commit), so an
upload that failed, was interrupted, or was switched on after the run finished is done by the
next start from the exported final/, without retraining; huggingface_hub then sends only the
files the Hub does not already hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import AssetError
from ..core.fsutil import safetensors_problem
from . import retry as hubretry

log = logging.getLogger(__name__)

LIBRARY_NAME = "sana-appliance"
COMMIT_MESSAGE = "sana-appliance upload"


# ---------------------------------------------------------------- what the marker records


def _endpoint(resolved) -> str:
    return hubretry.endpoint_of(resolved.hub.endpoint)


def is_done(resolved, record: dict | None) -> bool:
    """Whether the completion marker's upload record covers this config (same repo, same Hub)."""
    if not isinstance(record, dict):  # null (push_to_hub was off) or a marker edited by hand
        return False
    return record.get("status") == "uploaded" and record.get("repo") == resolved.config.hub_model_id \
        and record.get("endpoint") == _endpoint(resolved)


def wanted(resolved, record: dict | None) -> bool:
    """push_to_hub is on and final/ is not yet on the Hub repo it names."""
    return bool(resolved.config.push_to_hub) and not is_done(resolved, record)


def pending(resolved) -> dict:
    return {"repo": resolved.config.hub_model_id, "endpoint": _endpoint(resolved), "status": "pending"}


def failed(resolved, error: AssetError) -> dict:
    return {**pending(resolved), "status": "failed", "error": error.message}


# ---------------------------------------------------------------- checking final/


def check_final(folder: Path) -> list[str]:
    """What is missing or broken in an exported pipeline folder (empty: complete)."""
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


@dataclass(frozen=True)
class UploadTarget:
    """One thing the run uploads: the entry of :data:`UPLOAD_TARGETS`."""

    name: str
    local: str  # the folder under output_dir
    path_in_repo: str  # where it lands in the repo ("" = the repo root)
    check: Callable[[Path], list[str]]  # what is missing or broken in the folder (empty: it may go up)


UPLOAD_TARGETS: dict[str, UploadTarget] = {spec.name: spec for spec in (
    # the exported diffusers pipeline with its model card and sample images, at the repo root
    UploadTarget("final", "final", "", check_final),
)}


def end_problems(output_dir: Path) -> list[str]:
    """What keeps the end-of-run targets from going up (empty: every one is complete)."""
    return [p for t in UPLOAD_TARGETS.values() for p in t.check(output_dir / t.local)]


# ---------------------------------------------------------------- pushing


def _failure_message(gave_up: hubretry.HubUnavailable, folder: Path, repo_id: str, resolved) -> str:
    failure = gave_up.failure
    token = hubretry.token_name(resolved.credentials.hf_token_source)
    endpoint = _endpoint(resolved)
    keep = (f"The trained model is safe in {folder}; once this is fixed, start again with the same config: "
            "the upload is done without retraining")
    head = f"pushing {folder} to the Hub repo {repo_id} failed"
    if failure.transient:
        return (f"{head}: {failure.detail} ({gave_up.attempts} attempt(s) over {gave_up.elapsed_s:.0f} s). "
                f"{hubretry.transient_advice(failure, endpoint)}. {keep}")
    if failure.kind == "auth" and failure.status == 401:
        return (f"{head}: {endpoint} did not accept the token in {token} (HTTP 401): it is invalid, expired or "
                f"revoked. Set {token} to a write token from https://huggingface.co/settings/tokens. {keep}")
    if failure.kind == "auth":
        return (f"{head}: the token in {token} may not write to {repo_id} (HTTP {failure.status or 403}). Use a "
                f"token with write access to {repo_id} (fine-grained tokens need write permission on the repo or its "
                f"namespace), or set hub_model_id to a repo that token can write to. {keep}")
    if failure.kind == "not_found":
        return (f"{head}: {endpoint} answered 404 for {repo_id}. Check hub_model_id (owner/name, e.g. "
                f"you/sana-finetune) and that the account of {token} may create repos under that owner. {keep}")
    if failure.kind == "offline":
        return (f"{head}: huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
                f"unset it to upload. {keep}")
    if failure.kind == "proxy":
        return f"{head}: the HTTP proxy failed ({failure.detail}); check HTTPS_PROXY / HTTP_PROXY. {keep}"
    return f"{head}: {failure.detail}. {keep}"


def push_folder(folder: Path, repo_id: str, resolved, path_in_repo: str = "") -> str:
    """Create the repo if needed and upload `folder`; returns the commit sha on the Hub."""
    from huggingface_hub import HfApi

    # False, not None: None would let huggingface_hub fall back to a token saved on disk.
    api = HfApi(endpoint=_endpoint(resolved), token=resolved.credentials.hf_token or False, library_name=LIBRARY_NAME)

    def push() -> str:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, path_in_repo=path_in_repo or None,
                                 commit_message=COMMIT_MESSAGE)
        return getattr(info, "oid", "") or ""

    hubretry.ensure_request_timeouts()
    try:
        return hubretry.call_with_retries(push, what=f"push {folder} to {repo_id}",
                                          policy=hubretry.RetryPolicy(resolved.hub.retry_window_s),
                                          secrets=resolved.credentials.values(), log=log)
    except hubretry.HubUnavailable as gave_up:
        raise AssetError(_failure_message(gave_up, folder, repo_id, resolved)) from None


def publish(resolved, output_dir: Path) -> dict:
    """Push the end-of-run targets (output/final) to hub_model_id; returns the record for the completion marker."""
    cfg = resolved.config
    targets = list(UPLOAD_TARGETS.values())
    if resolved.hub.offline:
        folders = ", ".join(str(output_dir / t.local) for t in targets)
        raise AssetError(f"push_to_hub is on but HF_HUB_OFFLINE is set, so {folders} was not pushed to {cfg.hub_model_id}. "
                         "Unset HF_HUB_OFFLINE and start again with the same config: the upload is done without "
                         "retraining")
    sha = ""
    for target in targets:
        folder = output_dir / target.local
        log.info("pushing %s to the Hub repo %s at %s", folder, cfg.hub_model_id, _endpoint(resolved))
        sha = push_folder(folder, cfg.hub_model_id, resolved, path_in_repo=target.path_in_repo)
        log.info("pushed the %s to %s (commit %s)", "final model" if target.name == "final" else target.name,
                 cfg.hub_model_id, sha)
    return {"repo": cfg.hub_model_id, "endpoint": _endpoint(resolved), "status": "uploaded", "commit": sha}
