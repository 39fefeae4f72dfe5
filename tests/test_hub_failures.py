"""Hub failures, downloads and uploads alike, against a real local Hub server (tests/hubserver.py):
which are retried and for how long, what a person is told, and that a finished run uploads what is
missing without retraining. Nothing leaves 127.0.0.1: no DNS test runs (see test_dns_failure_...).

Run: OMP_NUM_THREADS=1 pytest tests/test_hub_failures.py -q   (~3.5 minutes on 2 busy cores: the shared
short demo run, a 2-step run, one re-export and a dozen CLI start-ups; the in-process tests take seconds)
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import httpx2
import pytest
from conftest import PLANTED_TOKEN, cli_env, run_cli, start_cli
from hubserver import FakeHub

from sana_appliance.config.resolve import resolve
from sana_appliance.core.errors import AssetError
from sana_appliance.core.workspace import Credentials, HubSettings, Workspace
from sana_appliance.hub import retry as hubretry
from sana_appliance.hub import upload
from sana_appliance.hub.download import fetch_model

REPO_ID = "acme/sana-ft"
WINDOW_S = 1.5


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.write_tokens.add(PLANTED_TOKEN)
        yield server


@pytest.fixture
def no_xet(monkeypatch):
    """hf_xet is installed; the local Hub speaks LFS only (what HF_HUB_DISABLE_XET=1 sets at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def short_timeouts(monkeypatch):
    """What HF_HUB_ETAG_TIMEOUT=1 HF_HUB_DOWNLOAD_TIMEOUT=1 set at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolved_for(tmp_path: Path, endpoint: str, **env: str):
    base = {"WORKSPACE": str(tmp_path / "ws"), "HF_TOKEN": PLANTED_TOKEN, "HF_ENDPOINT": endpoint,
            "SANA_PUSH_TO_HUB": "true", "SANA_HUB_MODEL_ID": REPO_ID, "SANA_HUB_RETRY_WINDOW_S": str(WINDOW_S)}
    return resolve({**base, **env})


def small_final(folder: Path) -> Path:
    """A small exported pipeline folder: text files go to git, binary weights through LFS."""
    import torch
    from safetensors.torch import save_file

    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline", "transformer": ["diffusers", "X"]}))
    (folder / "transformer" / "config.json").write_text("{}")
    save_file({"w": torch.arange(64, dtype=torch.float32)}, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    (folder / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# card\n")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def final_on_hub(repo, output: Path) -> bool:
    """The exported pipeline and the single-file weights are at the repo root, byte for byte; the run's
    records under run/."""
    want = {**files_of(output / "final"), "transformer.safetensors": (output / "transformer.safetensors").read_bytes(),
            "run/metrics.jsonl": (output / "metrics.jsonl").read_bytes()}
    return all(repo.files.get(name) == data for name, data in want.items())


# ---------------------------------------------------------------- the classification, from real failures


def test_real_network_failures_are_classified(hub, short_timeouts):
    from huggingface_hub import HfApi

    def failure_of(endpoint: str, **kwargs) -> hubretry.Failure:
        api = HfApi(endpoint=endpoint, token=kwargs.pop("token", False))
        with pytest.raises(Exception) as err:
            api.repo_info(kwargs.pop("repo", "acme/x"), revision="main", timeout=hubretry.request_timeout())
        return hubretry.classify(err.value)

    # A refused connection is an httpx2.ConnectError: neither OSError nor ConnectionError.
    refused = failure_of(f"http://127.0.0.1:{closed_port()}")
    assert (refused.kind, refused.transient) == ("refused", True)
    hub.add_repo("acme/x", {"a.txt": b"a"})
    for action, kind in [(500, "server"), (503, "server"), (429, "rate_limited"), ("drop", "dropped"),
                         ("hang:2.5", "timeout")]:
        hub.fail("GET", "/revision/main", action)
        failure = failure_of(hub.url)
        assert (failure.kind, failure.transient) == (kind, True), action
    for action, kind in [(401, "auth"), (403, "auth"), (404, "not_found"), (400, "http")]:
        hub.fail("GET", "/revision/main", action)
        failure = failure_of(hub.url)
        assert (failure.kind, failure.transient, failure.status) == (kind, False, action)
    missing = failure_of(hub.url, repo="acme/none", token="hf_other")  # the Hub's RepoNotFound
    assert (missing.kind, missing.transient) == ("not_found", False)


def test_offline_mode_is_not_retried(monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception) as err:
        HfApi(endpoint=f"http://127.0.0.1:{closed_port()}", token=False).repo_info("acme/x")
    failure = hubretry.classify(err.value)
    assert (failure.kind, failure.transient) == ("offline", False)


def test_dns_failure_is_retried_and_names_hf_endpoint():
    """No name is looked up here: a lookup of even a `.invalid` name goes to the system resolver, which
    may forward it off this machine. The chain below is the one httpx2 raises when getaddrinfo fails
    (httpx2.ConnectError from httpcore2.ConnectError from socket.gaierror), built without the lookup."""
    try:
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except socket.gaierror as gai:
            raise httpx2.ConnectError("[Errno -2] Name or service not known") from gai
    except httpx2.ConnectError as exc:
        failure = hubretry.classify(exc)
    assert (failure.kind, failure.transient) == ("dns", True)
    advice = hubretry.transient_advice(failure, "https://hub.example.invalid")
    assert "cannot be resolved" in advice and "HF_ENDPOINT" in advice and "https://hub.example.invalid" in advice


def test_window_is_honoured_and_each_retry_logged(caplog):
    caplog.set_level(logging.WARNING)
    calls = []

    def always_refused():
        calls.append(time.monotonic())
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    start = time.monotonic()
    with pytest.raises(hubretry.HubUnavailable) as err:
        hubretry.call_with_retries(always_refused, what="ping", policy=hubretry.RetryPolicy(1.0), secrets=[],
                                   log=logging.getLogger("t"))
    # The last try starts inside the window and nothing sleeps past it.
    assert calls[-1] - start < 1.0 and time.monotonic() - start < 1.5
    assert len(calls) >= 4 and err.value.attempts == len(calls) and err.value.failure.kind == "refused"
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == len(calls) - 1


# ---------------------------------------------------------------- downloads: token and repo named


def test_download_refused_token_names_its_variable_and_the_repo(hub, tmp_path):
    hub.add_repo("acme/gated", {"model_index.json": b"{}"}, gated=True)
    workspace = Workspace(root=tmp_path, hf_home=tmp_path / "hf")
    creds = Credentials(hf_token=PLANTED_TOKEN, hf_token_source="HUGGING_FACE_HUB_TOKEN")
    with pytest.raises(AssetError) as err:
        fetch_model("acme/gated", "main", workspace, HubSettings(endpoint=hub.url, retry_window_s=5), creds)
    message = err.value.message
    assert "HUGGING_FACE_HUB_TOKEN is set but the Hub refused it" in message and "acme/gated" in message
    assert PLANTED_TOKEN not in message
    # A 403 is not retried, however long the window: the file list was fetched once, the one file tried once.
    assert hub.hits("GET", "/tree/") == 1 and hub.hits("HEAD", "/resolve/") == 1


# ---------------------------------------------------------------- uploads, in process


def push_final(tmp_path: Path, resolved, wait_s: float = 30) -> tuple[list[str], upload.Uploader]:
    """Queue output/final with the background uploader and wait for it, as the end of a run does."""
    uploader = upload.Uploader(resolved, tmp_path / "out").start()
    try:
        uploader.add("final")
        return uploader.drain(wait_s, why="in the test"), uploader
    finally:
        uploader.close()


def test_upload_lands_every_file_through_transient_faults(hub, tmp_path, no_xet):
    folder = small_final(tmp_path / "out" / "final")
    hub.fail("POST", "/api/repos/create", 503)  # our retry
    hub.fail("POST", "/api/repos/create", "drop")
    hub.fail("POST", "/commit/", 502)  # after the LFS upload: the whole job is tried again
    unsent, uploader = push_final(tmp_path, resolved_for(tmp_path, hub.url, SANA_HUB_RETRY_WINDOW_S="20"))
    assert unsent == []
    repo = hub.repos[("model", REPO_ID)]
    assert repo.files == files_of(folder) and uploader.last_commit == repo.sha and len(repo.commits) == 1
    assert hub.hits("PUT", "/lfs-objects/") == 1  # the weights went through LFS once, not again on the retry
    assert hub.hits("POST", "/api/repos/create") == 3 and hub.hits("POST", "/commit/") == 2


def test_upload_403_names_the_token_variable_and_repo_and_is_not_retried(hub, tmp_path, no_xet):
    small_final(tmp_path / "out" / "final")
    hub.write_tokens.clear()  # the token may read, not write
    resolved = resolved_for(tmp_path, hub.url, HF_TOKEN="", HUGGING_FACE_HUB_TOKEN=PLANTED_TOKEN)
    start = time.monotonic()
    unsent, _ = push_final(tmp_path, resolved)
    assert time.monotonic() - start < 5
    assert len(unsent) == 1 and unsent[0].startswith("final: ")
    assert "HUGGING_FACE_HUB_TOKEN may not write to acme/sana-ft (HTTP 403)" in unsent[0]
    assert "not with your token" not in unsent[0] and PLANTED_TOKEN not in unsent[0]
    assert hub.hits("POST", "/api/repos/create") == 1


def test_upload_500_says_the_hub_is_failing_when_the_wait_ends(hub, tmp_path, no_xet):
    small_final(tmp_path / "out" / "final")
    hub.fail("POST", "/api/repos/create", 500, times=1000)
    start = time.monotonic()
    unsent, _ = push_final(tmp_path, resolved_for(tmp_path, hub.url), wait_s=3)
    assert time.monotonic() - start < 3 + 4
    assert len(unsent) == 1 and "HTTP 500" in unsent[0]
    assert "problem on the Hub's side, not with your token or config" in unsent[0] and "hub_upload_wait_s" in unsent[0]
    assert hub.hits("POST", "/api/repos/create") >= 3  # tried again and again until the wait ended


def test_upload_that_hangs_times_out_instead_of_hanging(hub, tmp_path, no_xet, short_timeouts):
    small_final(tmp_path / "out" / "final")
    hub.fail("POST", "/api/repos/create", "hang:30", times=1000)
    start = time.monotonic()
    unsent, _ = push_final(tmp_path, resolved_for(tmp_path, hub.url), wait_s=4)
    assert time.monotonic() - start < 4 + 4  # the wait, and a hung request abandoned at close
    assert hub.hits("POST", "/api/repos/create") >= 2  # without a timeout the first request never returned
    assert "did not answer in time" in unsent[0] and "HF_HUB_DOWNLOAD_TIMEOUT" in unsent[0]


def test_check_final_finds_missing_and_truncated_files(tmp_path):
    folder = small_final(tmp_path / "final")
    assert upload.check_final(folder) == []
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    (folder / "README.md").unlink()
    problems = upload.check_final(folder)
    assert any("README.md" in p for p in problems) and any("truncated" in p for p in problems)
    shutil.rmtree(folder / "transformer")
    assert any("transformer/ is missing" in p for p in upload.check_final(folder))


# ---------------------------------------------------------------- through the CLI


def hub_env(workspace: Path, output: Path, endpoint: str, **extra: str) -> dict[str, str]:
    settings = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "2",
                "HF_HUB_DOWNLOAD_TIMEOUT": "2", "SANA_PUSH_TO_HUB": "true", "SANA_HUB_MODEL_ID": REPO_ID,
                "SANA_HUB_RETRY_WINDOW_S": "2", "SANA_HUB_UPLOAD_WAIT_S": "4"}
    return cli_env(workspace, output, **{**settings, **extra})


def marker(output: Path) -> dict:
    return json.loads((output / "TRAINING_COMPLETE.json").read_text())


def untouched(output: Path) -> dict[str, int]:
    """What retraining or re-exporting would rewrite."""
    paths = [output / "metrics.jsonl", output / "run.json", *(output / "checkpoints").rglob("*"), *(output / "final").rglob("*")]
    return {str(p): p.stat().st_mtime_ns for p in paths if p.is_file()}


@pytest.fixture
def finished_copy(demo_run, tmp_path):
    """A copy of the finished short demo run (push_to_hub was off)."""
    source, _ = demo_run
    output = tmp_path / "out"
    shutil.copytree(source, output)
    return output


@pytest.mark.parametrize("fault", ["500", "refused"])
def test_download_failures_exit_3_without_traceback(shared_workspace, tmp_path, fault):
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-sana", {"model_index.json": b"{}"})
        hub.fail("GET", "/revision/main", 500, times=1000)
        endpoint = hub.url if fault == "500" else f"http://127.0.0.1:{closed_port()}"
        env = hub_env(shared_workspace, tmp_path / "out", endpoint, SANA_PUSH_TO_HUB="false",
                      SANA_PRETRAINED_MODEL_NAME_OR_PATH="acme/tiny-sana", HF_HOME=str(tmp_path / "hf"))
        result = run_cli(env)
        hits = hub.hits("GET", "/revision/main")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    error = result.stderr.split("sana-appliance: error:")[-1]
    if fault == "500":
        assert "HTTP 500" in error and "problem on the Hub's side, not with your token or config" in error
        assert hits >= 3
    else:
        assert "connection refused" in error and endpoint in error and "HF_ENDPOINT" in error
    assert "retrying in" in result.stderr  # each retry is logged
    assert PLANTED_TOKEN not in result.stderr + result.stdout


def test_push_switched_on_after_finishing_uploads_final_without_retraining(finished_copy, shared_workspace, hub):
    output = finished_copy
    before = untouched(output)
    result = run_cli(hub_env(shared_workspace, output, hub.url))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without retraining or re-exporting" in result.stderr
    assert f"Hub: token of alice can write {REPO_ID} (will be created)" in result.stderr  # the push preflight
    repo = hub.repos[("model", REPO_ID)]
    assert final_on_hub(repo, output)  # every exported file landed, byte for byte
    assert untouched(output) == before  # nothing retrained, re-exported or re-recorded
    record = marker(output)
    assert record["step"] == 16
    assert record["upload"] == {"repo": REPO_ID, "endpoint": hub.url, "status": "uploaded", "commit": repo.sha}
    assert f"everything is on the Hub: {REPO_ID} (commit {repo.sha})" in result.stderr
    assert PLANTED_TOKEN not in result.stderr + result.stdout + json.dumps(record)

    # Started again: already uploaded there, so nothing to do and the Hub is not asked anything (not even
    # the push preflight's whoami).
    requests = len(hub.requests)
    again = run_cli(hub_env(shared_workspace, output, hub.url))
    assert again.returncode == 0 and "already finished at step 16" in again.stderr
    assert f"final/ is on the Hub: {REPO_ID} at {hub.url} (commit {repo.sha})" in again.stderr
    assert len(hub.requests) == requests


@pytest.mark.parametrize("fault", ["403", "dropped", "refused", "offline"])
def test_upload_failures_exit_3_or_6_with_advice_and_mark_the_upload_failed(finished_copy, shared_workspace, hub, fault):
    output = finished_copy
    endpoint = f"http://127.0.0.1:{closed_port()}" if fault == "refused" else hub.url
    extra = {"HF_HUB_OFFLINE": "1"} if fault == "offline" else {}
    if fault == "403":  # the push preflight (whoami) accepts the token as a write token; the upload is refused
        hub.write_tokens.clear()
        hub.add_token(PLANTED_TOKEN)
    if fault == "dropped":  # the Hub answers the preflight, then cuts every upload's connection
        hub.fail("POST", "/api/repos/create", "drop", times=1000)
    before = marker(output)
    result = run_cli(hub_env(shared_workspace, output, endpoint, **extra))
    assert "Traceback" not in result.stderr + result.stdout
    if fault == "offline":  # refused with the config, before anything runs: exit 2, nothing asked of the Hub
        assert result.returncode == 2, result.stderr[-3000:]
        assert "cannot upload while HF_HUB_OFFLINE is set" in result.stderr
        assert hub.requests == [] and marker(output) == before
        return
    # Refused: the push preflight fails (exit 3). Otherwise the preflight passed and the uploads did not: 6.
    assert result.returncode == (3 if fault == "refused" else 6), result.stderr[-3000:]
    error = result.stderr.split("sana-appliance: error:")[-1]
    if fault == "refused":  # the Hub is unreachable from the start: the push preflight says so, the marker stays
        assert f"nothing accepts connections at {endpoint} (connection refused): check HF_ENDPOINT" in error
        assert f"can push to the Hub repo {REPO_ID}" in error and "Nothing was downloaded or trained" in error
        assert "retrying in" in result.stderr and PLANTED_TOKEN not in result.stderr + result.stdout
        assert marker(output) == before
        return
    assert f"Hub: token of alice can write {REPO_ID} (will be created)" in result.stderr
    expected = {"403": f"the token in HF_TOKEN may not write to {REPO_ID} (HTTP 403)",
                "dropped": f"the connection to {hub.url} was cut before the answer was complete"}[fault]
    assert expected in error and "without retraining" in error and "final: " in error
    assert PLANTED_TOKEN not in result.stderr + result.stdout
    record = marker(output)
    assert record["upload"]["status"] == "failed" and record["upload"]["repo"] == REPO_ID
    assert record["upload"]["error"] in result.stderr
    if fault == "403":
        assert hub.hits("POST", "/api/repos/create") == 1  # not retried


def test_failed_upload_at_the_end_of_a_run_is_done_by_the_next_start(shared_workspace, tmp_path, hub):
    output = tmp_path / "out"
    env = hub_env(shared_workspace, output, hub.url, SANA_MAX_TRAIN_STEPS="2", SANA_CHECKPOINTING_STEPS="2",
                  SANA_VALIDATION_STEPS="0")
    hub.fail("POST", "/api/repos/create", 503, times=1000)  # the Hub is down when training ends
    failed = run_cli(env)
    assert failed.returncode == 6, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr + failed.stdout
    assert "HTTP 503" in failed.stderr and "problem on the Hub's side" in failed.stderr
    assert marker(output)["upload"]["status"] == "failed" and marker(output)["step"] == 2
    assert REPO_ID not in {r for _, r in hub.repos}

    hub.clear_faults()  # the Hub is back
    before = untouched(output)
    again = run_cli(env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "without retraining or re-exporting" in again.stderr
    assert untouched(output) == before
    repo = hub.repos[("model", REPO_ID)]
    assert final_on_hub(repo, output)
    assert marker(output)["upload"] == {"repo": REPO_ID, "endpoint": hub.url, "status": "uploaded", "commit": repo.sha}


def test_upload_killed_midway_sends_only_what_is_missing_on_restart(finished_copy, shared_workspace, hub):
    output = finished_copy
    env = hub_env(shared_workspace, output, hub.url, HF_HUB_DOWNLOAD_TIMEOUT="60")
    hub.fail("POST", "/commit/", "hang:60")  # the first job's LFS objects are stored; its commit never answers
    proc = start_cli(env)
    try:
        deadline = time.monotonic() + 120
        while hub.hits("POST", "/commit/") == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.hits("POST", "/commit/") == 1, proc.communicate(timeout=5)[0][-3000:] if proc.poll() is not None else ""
        proc.kill()  # kill -9 in the middle of the upload
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker(output)["upload"]["status"] == "pending"
    assert hub.lfs_objects and hub.repos[("model", REPO_ID)].commits == []

    result = run_cli(env)
    assert result.returncode == 0, result.stderr[-3000:]
    puts = [r.path for r in hub.requests if r.method == "PUT"]
    assert len(puts) == len(set(puts))  # no object was sent twice
    repo = hub.repos[("model", REPO_ID)]
    assert final_on_hub(repo, output)
    assert len(repo.commits) == 2  # the run's records, then final/: nothing committed twice
    assert marker(output)["upload"]["status"] == "uploaded"


def test_incomplete_export_is_redone_from_the_last_checkpoint_before_uploading(finished_copy, shared_workspace, hub):
    output = finished_copy
    weights = output / "final" / "transformer" / "diffusion_pytorch_model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # e.g. a volume that filled up while copying
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    result = run_cli(hub_env(shared_workspace, output, hub.url))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "export is incomplete" in result.stderr and "truncated" in result.stderr
    assert "resumed from checkpoint-16" in result.stderr  # no training step was run again
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == checkpoints
    assert weights.read_bytes() == intact  # the same weights, exported again
    assert final_on_hub(hub.repos[("model", REPO_ID)], output)
    assert marker(output)["upload"]["status"] == "uploaded"
