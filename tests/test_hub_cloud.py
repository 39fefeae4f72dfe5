"""The cloud loop through the real CLI against a real local Hub (tests/hubserver.py): checkpoints go to the
Hub while training, kill -9 mid-upload loses and duplicates nothing, a new empty workspace resumes from the
Hub bit for bit, an outage is waited out, a revoked token stops uploads but not training.

Run: OMP_NUM_THREADS=1 pytest tests/test_hub_cloud.py -q   (~3 minutes on 2 cores: five short demo runs)
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import PLANTED_TOKEN, cli_env, run_cli, start_cli
from hubserver import FakeHub
from safetensors.torch import load_file

REPO_ID = "acme/sana-ft"


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.write_tokens.add(PLANTED_TOKEN)
        yield server


def cloud_env(workspace: Path, output: Path, endpoint: str, **extra: str) -> dict[str, str]:
    settings = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "2",
                "HF_HUB_DOWNLOAD_TIMEOUT": "5", "SANA_PUSH_TO_HUB": "true", "SANA_PUSH_CHECKPOINTS_TO_HUB": "true",
                "SANA_HUB_MODEL_ID": REPO_ID, "SANA_HUB_RETRY_WINDOW_S": "4", "SANA_HUB_UPLOAD_WAIT_S": "60"}
    return cli_env(workspace, output, **{**settings, **extra})


def repo_files(hub: FakeHub) -> dict[str, bytes]:
    repo = hub.repos.get(("model", REPO_ID))
    return dict(repo.files) if repo is not None else {}


def local_tree(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def checkpoint_prefix(output: Path, step: int) -> str:
    state = json.loads((output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return f"checkpoints/{state['config_hash']}/{state['run_id']}/checkpoint-{step}/"


def added_counts(hub: FakeHub, prefix: str) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for commit in hub.repos[("model", REPO_ID)].history:
        for path, sha in commit.added.items():
            if path.startswith(prefix):
                counts[(path, sha)] = counts.get((path, sha), 0) + 1
    return counts


def wait_for(condition, timeout_s: float, proc=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError("the run ended early:\n" + proc.communicate()[0][-4000:])
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_everything_on_the_hub(hub: FakeHub, output: Path, checkpoints: bool = True, full_rank: bool = True) -> None:
    files = repo_files(hub)
    for folder in sorted((output / "checkpoints").glob("checkpoint-*")) if checkpoints else []:
        prefix = checkpoint_prefix(output, int(folder.name.split("-")[1]))
        assert {k: v for k, v in files.items() if k.startswith(prefix)} == local_tree(folder, prefix)
    for name, data in local_tree(output / "final").items():
        assert files[name] == data, name
    for name in ("transformer.safetensors",) if full_rank else ("adapter.safetensors", "adapter_ema.safetensors"):
        assert files[name] == (output / name).read_bytes(), name
    assert files["run/metrics.jsonl"] == (output / "metrics.jsonl").read_bytes()
    assert files["run/run.json"] == (output / "run.json").read_bytes()
    for name, data in local_tree(output / "validation", "run/validation/").items():
        assert files[name] == data, name
    marker = json.loads((output / "TRAINING_COMPLETE.json").read_text())
    assert marker["upload"]["status"] == "uploaded"
    assert json.loads((output / ".hub-uploads.json").read_text())["jobs"] == []


def logged_steps(output: Path) -> list[int]:
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def tensorboard_steps(logdir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_kill_9_during_a_checkpoint_upload_then_restart_sends_every_file_once(shared_workspace, tmp_path, hub):
    output = tmp_path / "out"
    env = cloud_env(shared_workspace, output, hub.url, SANA_MAX_TRAIN_STEPS="24", SANA_REPORT_TO="tensorboard",
                    HF_HUB_DOWNLOAD_TIMEOUT="60")
    hub.fail("PUT", "/lfs-objects/", "hang:60")  # checkpoint-8's first LFS object never completes
    proc = start_cli(env)
    try:
        wait_for(lambda: hub.hits("PUT", "/lfs-objects/") >= 1, 180, proc)
        # Training goes on meanwhile: the killed run logs steps past checkpoint-8 (the upload stays hung).
        wait_for(lambda: logged_steps(output) and max(logged_steps(output)) > 9, 120, proc)
        proc.kill()  # kill -9 mid-upload
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    queued = [j["id"] for j in json.loads((output / ".hub-uploads.json").read_text())["jobs"]]
    assert queued[0] == "checkpoint-8"
    assert not any(k.startswith("checkpoints/") and k.endswith("COMPLETE") for k in repo_files(hub))
    assert max(logged_steps(output)) > 8  # so a resume that did not purge would show steps twice

    result = run_cli(env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "left from an earlier start" in result.stderr and "checkpoint-8" in result.stderr
    assert_everything_on_the_hub(hub, output)
    counts = added_counts(hub, "checkpoints/")
    assert counts and set(counts.values()) == {1}  # every checkpoint file went up exactly once
    steps = tensorboard_steps(output / "tensorboard", "loss")
    assert sorted(steps) == sorted(set(steps)) == list(range(1, 25))  # no step twice after the resume
    assert PLANTED_TOKEN not in result.stderr + result.stdout + json.dumps(repo_files(hub), default=str)


def test_a_new_empty_workspace_resumes_from_the_hub_bit_identical(demo_run, shared_workspace, tmp_path, hub):
    reference, _ = demo_run  # the same config run uninterrupted, uploads off (upload keys are neutral)
    first = tmp_path / "pod-1" / "out"
    env = cloud_env(shared_workspace, first, hub.url, SANA_HUB_STOP_UPLOAD_S="60")
    proc = start_cli(env)
    try:
        wait_for(lambda: (first / "checkpoints" / "checkpoint-8" / "COMPLETE").is_file(), 180, proc)
        proc.send_signal(signal.SIGTERM)  # the pod is preempted, maybe before checkpoint-8 reached the Hub
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-4000:]
    assert "every queued upload reached the Hub" in out  # the stop grace went to the upload queue
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    assert stopped_at < 16

    # A new pod: empty workspace (the tiny model and every cache are built again), same config and repo.
    second_ws = tmp_path / "pod-2" / "workspace"
    second = tmp_path / "pod-2" / "out"
    result = run_cli(cloud_env(second_ws, second, hub.url))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"downloading checkpoint-{stopped_at} of this run from {REPO_ID}" in result.stderr
    assert f"resumed from checkpoint-{stopped_at}" in result.stderr
    got, want = load_file(second / "transformer.safetensors"), load_file(reference / "transformer.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)  # bit for bit
    assert_everything_on_the_hub(hub, second)
    # The first pod's metrics came along: the history on the new pod (and on the Hub) has every step once.
    assert "metrics.jsonl of run" in result.stderr
    loss_steps = [json.loads(x)["step"] for x in (second / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert loss_steps == list(range(1, 17))


def test_a_hub_outage_during_training_is_waited_out_and_everything_goes_up(shared_workspace, tmp_path, hub):
    output = tmp_path / "out"
    env = cloud_env(shared_workspace, output, hub.url)
    proc = start_cli(env)
    try:
        # After the preflight's repo lookup and the look for checkpoints to resume (an outage during either
        # exits 3: the next test), before the first upload.
        wait_for(lambda: hub.hits("GET", f"/api/models/{REPO_ID}") >= 2, 60, proc)
        hub.outage(503)
        refused = hub.hits()

        def end_outage() -> None:  # after several failed tries by the worker, while the run goes on
            deadline = time.monotonic() + 120
            while hub.hits() - refused < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            hub.end_outage()

        ender = threading.Thread(target=end_outage, daemon=True)
        ender.start()
        out = proc.communicate(timeout=240)[0]
        ender.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "503" in out and "training goes on, retrying in" in out
    assert "Traceback" not in out
    assert_everything_on_the_hub(hub, output)
    assert set(added_counts(hub, "checkpoints/").values()) == {1}


def test_a_hub_down_when_an_empty_output_looks_for_checkpoints_exits_3_instead_of_starting_over(shared_workspace,
                                                                                                 tmp_path, hub):
    env = cloud_env(shared_workspace, tmp_path / "out", hub.url)
    proc = start_cli(env)
    try:
        wait_for(lambda: hub.hits("GET", f"/api/models/{REPO_ID}") >= 1, 60, proc)  # the preflight's last request
        hub.outage(503)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out[-4000:]
    error = out.split("sana-appliance: error:")[-1]
    assert f"look for checkpoints of this run in {REPO_ID} failed" in error and "problem on the Hub's side" in error
    assert "Traceback" not in out and not (tmp_path / "out" / "checkpoints").exists()


def test_a_token_revoked_mid_run_stops_uploads_not_training_then_a_restart_sends_the_rest(shared_workspace, tmp_path, hub):
    output = tmp_path / "out"
    env = cloud_env(shared_workspace, output, hub.url)
    proc = start_cli(env)
    try:
        wait_for(lambda: hub.hits("POST", "/commit/") >= 1, 180, proc)
        hub.revoke(PLANTED_TOKEN)
        out = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 6, out[-4000:]
    assert "Traceback" not in out and PLANTED_TOKEN not in out
    assert out.count("Hub uploads stopped: ") == 1 and "no longer accepts the token in HF_TOKEN (HTTP 401" in out
    error = out.split("sana-appliance: error:")[-1]
    assert "training finished and every output is in" in error and "final:" in error
    assert "start again with the same config and they are sent without retraining" in error
    assert (output / "final" / "model_index.json").is_file()
    marker = json.loads((output / "TRAINING_COMPLETE.json").read_text())
    assert marker["step"] == 16 and marker["upload"]["status"] == "failed"

    hub.revoked.discard(PLANTED_TOKEN)  # a working token again
    before = (output / "checkpoints" / "checkpoint-16" / "transformer.safetensors").stat().st_mtime_ns
    again = run_cli(env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "without retraining" in again.stderr
    assert (output / "checkpoints" / "checkpoint-16" / "transformer.safetensors").stat().st_mtime_ns == before
    assert_everything_on_the_hub(hub, output)


def test_the_runs_records_go_up_while_training_at_the_sync_interval(shared_workspace, tmp_path, hub):
    output = tmp_path / "out"
    # No checkpoint before the final one: what goes up mid-run is the hub_sync_interval_s cadence's doing.
    env = cloud_env(shared_workspace, output, hub.url, SANA_CHECKPOINTING_STEPS="100", SANA_HUB_SYNC_INTERVAL_S="0.2",
                    SANA_PUSH_CHECKPOINTS_TO_HUB="false")
    result = run_cli(env)
    assert result.returncode == 0, result.stderr[-4000:]
    repo = hub.repos[("model", REPO_ID)]
    mid_run = []
    for commit in repo.history:
        if "run/run.json" in commit.added:
            files, _ = repo.at(commit.sha)
            mid_run.append(json.loads(files["run/run.json"]))
    assert any(doc["status"] == "training" and 0 < doc["steps"] < 16 for doc in mid_run)
    assert json.loads(repo.files["run/run.json"])["status"] == "finished"
    assert json.loads((output / "run.json").read_text())["status"] == "finished"
    assert not any(k.startswith("checkpoints/") for k in repo.files)  # push_checkpoints_to_hub is off
    assert_everything_on_the_hub(hub, output, checkpoints=False)
