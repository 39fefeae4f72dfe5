"""Uploads to the Hugging Face Hub: the only module that pushes anything.

Only the exported model folder is uploaded (it holds no secrets: the model card and run
metadata are built from the redacted config). Transient Hub errors are retried.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tenacity import before_sleep_log, retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from .errors import AssetError

log = logging.getLogger("sana_appliance.upload")


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def push_folder(folder: Path, repo_id: str, token: str, endpoint: str | None, path_in_repo: str = "", attempts: int = 5) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)

    @retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(attempts), wait=wait_exponential_jitter(1, 30),
           before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)
    def _push() -> str:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, path_in_repo=path_in_repo or None,
                                 commit_message="sana-appliance upload")
        return getattr(info, "oid", "") or ""

    try:
        return _push()
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise AssetError(f"pushing {folder} to the Hub repo {repo_id} failed (HTTP {status}); check that HF_TOKEN has "
                         "write access and hub_model_id is right. The trained model stays in output/.") from None


def publish(resolved, output_dir: Path) -> None:
    cfg = resolved.config
    if not cfg.push_to_hub:
        return
    sha = push_folder(output_dir / "final", cfg.hub_model_id, resolved.credentials.hf_token, resolved.hub.endpoint)
    log.info("pushed the final model to %s (commit %s)", cfg.hub_model_id, sha[:12])
