"""The background upload worker (hub/upload.py) against a real local Hub (tests/hubserver.py), in process:
checkpoints go up files first and marker last, restarts send only what is missing, lost replies and
outages do not duplicate anything, 401/403 stop uploads with one message, remote pruning.

huggingface_hub runs unmodified; the Hub speaks LFS only (HF_HUB_DISABLE_XET). Run:
OMP_NUM_THREADS=1 pytest tests/test_hub_uploads.py -q   (~30 s)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import PLANTED_TOKEN
from hubserver import FakeHub

from sana_appliance.config.resolve import resolve
from sana_appliance.hub import upload
from sana_appliance.hub.upload import Uploader
from sana_appliance.run import checkpoints

REPO_ID = "acme/sana-ft"
HASH = "0123456789abcdef"
RUN = "20261201T000000Z"


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.write_tokens.add(PLANTED_TOKEN)
        yield server


@pytest.fixture(autouse=True)
def no_xet(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def resolved_for(tmp_path: Path, endpoint: str, **env: str):
    base = {"WORKSPACE": str(tmp_path / "ws"), "OUTPUT_DIR": str(tmp_path / "out"), "HF_TOKEN": PLANTED_TOKEN,
            "HF_ENDPOINT": endpoint, "SANA_PUSH_TO_HUB": "true", "SANA_PUSH_CHECKPOINTS_TO_HUB": "true",
            "SANA_HUB_MODEL_ID": REPO_ID, "SANA_HUB_RETRY_WINDOW_S": "2"}
    return resolve({**base, **env})


def save_checkpoint(output: Path, step: int, seed: int = 0, sharded: Path | None = None) -> Path:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return checkpoints.save(output / "checkpoints", step,
                            tensors={"transformer": {"w": torch.randn(40_000, generator=g)}},  # 160 kB: LFS
                            objects={"optimizer": {"step": step}},
                            state={"step": step, "config_hash": HASH}, sharded=sharded)


def local_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_prefix(step: int, run: str = RUN) -> str:
    return f"checkpoints/{HASH}/{run}/checkpoint-{step}/"


def repo_under(hub: FakeHub, prefix: str) -> dict[str, bytes]:
    return {k: v for k, v in hub.repos[("model", REPO_ID)].files.items() if k.startswith(prefix)}


def added_counts(hub: FakeHub) -> dict[tuple[str, str], int]:
    """How many commits added each (path, content) pair."""
    counts: dict[tuple[str, str], int] = {}
    for commit in hub.repos[("model", REPO_ID)].history:
        for path, sha in commit.added.items():
            counts[(path, sha)] = counts.get((path, sha), 0) + 1
    return counts


def drained(uploader: Uploader, timeout_s: float = 30) -> list[str]:
    return uploader.drain(timeout_s, why="in the test", report_every_s=1)


def test_a_checkpoint_goes_up_whole_with_its_marker_in_a_later_commit(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url)
    folder = save_checkpoint(tmp_path / "out", 8)
    uploader = Uploader(resolved, tmp_path / "out").start()
    try:
        uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
        assert drained(uploader) == []
    finally:
        uploader.close()
    repo = hub.repos[("model", REPO_ID)]
    assert repo_under(hub, remote_prefix(8)) == local_files(folder, remote_prefix(8))
    assert repo.private  # hub_private defaults to true
    *files_commits, marker_commit = [c for c in repo.history if any(p.startswith(remote_prefix(8)) for p in c.added)]
    assert list(marker_commit.added) == [remote_prefix(8) + "COMPLETE"]
    assert all(remote_prefix(8) + "COMPLETE" not in c.added for c in files_commits) and len(files_commits) == 1
    assert json.loads((tmp_path / "out" / upload.QUEUE_FILE).read_text())["jobs"] == []


def test_a_restart_sends_only_what_changed_and_makes_no_empty_commit(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url)
    output = tmp_path / "out"
    save_checkpoint(output, 8)
    (output / "validation").mkdir(parents=True)
    (output / "validation" / "step0000008_validation_64x64.png").write_bytes(b"\x89PNG" + bytes(300))
    (output / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    first = Uploader(resolved, output).start()
    first.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
    first.add("progress")
    assert drained(first) == []
    first.close()
    commits, puts = len(hub.repos[("model", REPO_ID)].history), hub.hits("PUT", "/lfs-objects/")

    again = Uploader(resolved, output).start()  # a new process: nothing changed, nothing is committed
    again.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
    again.add("progress")
    assert drained(again) == []
    assert len(hub.repos[("model", REPO_ID)].history) == commits and hub.hits("PUT", "/lfs-objects/") == puts

    with open(output / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "loss": 0.9}\n')
    again.add("progress")
    assert drained(again) == []
    again.close()
    last = hub.repos[("model", REPO_ID)].history[-1]
    assert list(last.added) == ["run/metrics.jsonl"]  # only the changed file went up
    assert hub.repos[("model", REPO_ID)].files["run/metrics.jsonl"] == (output / "metrics.jsonl").read_bytes()


def test_a_reply_lost_after_the_commit_applied_is_not_committed_again(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url)
    folder = save_checkpoint(tmp_path / "out", 8)
    hub.fail("POST", "/commit/", "apply-then-drop")
    uploader = Uploader(resolved, tmp_path / "out").start()
    try:
        uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
        assert drained(uploader) == []
    finally:
        uploader.close()
    assert hub.hits("POST", "/commit/") == 2  # the files (reply lost), then the marker: no repeat of the first
    assert repo_under(hub, remote_prefix(8)) == local_files(folder, remote_prefix(8))
    assert set(added_counts(hub).values()) == {1}


def test_an_outage_is_waited_out_while_the_caller_goes_on_and_nothing_is_lost(hub, tmp_path, caplog):
    resolved = resolved_for(tmp_path, hub.url)
    output = tmp_path / "out"
    folder = save_checkpoint(output, 8)
    hub.outage(503)
    uploader = Uploader(resolved, output).start()
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sana_appliance.hub.upload"):
            uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
            assert time.monotonic() - start < 2  # queuing never waits on the network (a write and an fsync)
            time.sleep(3)
            assert uploader.pending() == ["checkpoint-8"]
            # The queue is on disk: a kill now would leave the job for the next start.
            assert [j["id"] for j in json.loads((output / upload.QUEUE_FILE).read_text())["jobs"]] == ["checkpoint-8"]
            hub.end_outage()
            assert drained(uploader) == []
    finally:
        uploader.close()
    assert "retrying in" in caplog.text and "503" in caplog.text and "training goes on" in caplog.text
    assert repo_under(hub, remote_prefix(8)) == local_files(folder, remote_prefix(8))
    assert set(added_counts(hub).values()) == {1}


def test_refused_connections_are_retried_until_the_hub_listens_again(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url)
    folder = save_checkpoint(tmp_path / "out", 8)
    hub.refuse()
    uploader = Uploader(resolved, tmp_path / "out").start()
    try:
        uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
        time.sleep(2)
        assert uploader.pending() == ["checkpoint-8"]
        hub.accept()
        assert drained(uploader) == []
    finally:
        uploader.close()
    assert repo_under(hub, remote_prefix(8)) == local_files(folder, remote_prefix(8))


def test_the_queue_survives_a_restart(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url)
    output = tmp_path / "out"
    folder = save_checkpoint(output, 8)
    hub.outage(503)
    first = Uploader(resolved, output).start()
    first.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
    deadline = time.monotonic() + 30
    while hub.hits() < 2 and time.monotonic() < deadline:  # it has tried, and failed
        time.sleep(0.05)
    unsent = first.drain(0.1, why="in the test")
    first.close()  # e.g. the pod was stopped
    assert len(unsent) == 1 and unsent[0].startswith("checkpoint-8: not sent in time, the Hub kept failing (")
    assert "HTTP 503" in unsent[0] and "hub_upload_wait_s" in unsent[0]
    hub.end_outage()
    second = Uploader(resolved, output).start()  # nothing added: the job comes from output/.hub-uploads.json
    try:
        assert second.pending() == ["checkpoint-8"]
        assert drained(second) == []
    finally:
        second.close()
    assert repo_under(hub, remote_prefix(8)) == local_files(folder, remote_prefix(8))


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_stops_uploads_with_one_message_and_keeps_the_queue(hub, tmp_path, caplog, status):
    resolved = resolved_for(tmp_path, hub.url)
    output = tmp_path / "out"
    save_checkpoint(output, 8)
    save_checkpoint(output, 16)
    if status == 401:
        hub.revoke(PLANTED_TOKEN)
    else:
        hub.write_tokens.clear()
        hub.add_token(PLANTED_TOKEN)  # known to whoami, may not write
    uploader = Uploader(resolved, output).start()
    try:
        with caplog.at_level(logging.ERROR, logger="sana_appliance.hub.upload"):
            uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
            uploader.add("checkpoint", step=16, config_hash=HASH, run_id=RUN)
            start = time.monotonic()
            unsent = drained(uploader)
            assert time.monotonic() - start < 5  # no retrying a refused token
    finally:
        uploader.close()
    expected = ("no longer accepts the token in HF_TOKEN (HTTP 401" if status == 401
                else f"the token in HF_TOKEN may not write to {REPO_ID} (HTTP 403)")
    assert [u.split(":", 1)[0] for u in unsent] == ["checkpoint-8", "checkpoint-16"]
    assert all(expected in u for u in unsent)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0].getMessage() and "Training goes on" in errors[0].getMessage()
    assert PLANTED_TOKEN not in caplog.text + "".join(unsent)
    assert [j["id"] for j in json.loads((output / upload.QUEUE_FILE).read_text())["jobs"]] == ["checkpoint-8", "checkpoint-16"]


def test_remote_checkpoints_beyond_the_limit_are_deleted_oldest_first(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url, SANA_HUB_KEEP_CHECKPOINTS="2", SANA_CHECKPOINTS_TOTAL_LIMIT="")
    output = tmp_path / "out"
    uploader = Uploader(resolved, output).start()
    try:
        for step in (8, 16, 24):
            save_checkpoint(output, step)
            uploader.add("checkpoint", step=step, config_hash=HASH, run_id=RUN)
            assert drained(uploader) == []
    finally:
        uploader.close()
    remote = {p.split("/")[3] for p in repo_under(hub, f"checkpoints/{HASH}/")}
    assert remote == {"checkpoint-16", "checkpoint-24"}
    assert sorted((output / "checkpoints").iterdir())  # local checkpoints are the local limit's business
    found = upload.find_remote_checkpoints(resolved, HASH)
    assert [(r.run_id, r.step) for r in found] == [(RUN, 24), (RUN, 16)]


def test_another_run_of_the_same_config_keeps_its_own_checkpoints_and_the_newest_run_is_resumed(hub, tmp_path):
    """resume_from_checkpoint=none in the same repo starts a run with its own folder: pruning never touches the
    earlier run's, and an empty machine resumes the newest run, not the one with the highest step."""
    resolved = resolved_for(tmp_path, hub.url, SANA_HUB_KEEP_CHECKPOINTS="1")
    output = tmp_path / "out"
    uploader = Uploader(resolved, output).start()
    try:
        save_checkpoint(output, 1000)
        uploader.add("checkpoint", step=1000, config_hash=HASH, run_id="20261101T000000Z")
        save_checkpoint(output, 100)
        uploader.add("checkpoint", step=100, config_hash=HASH, run_id=RUN)
        assert drained(uploader) == []
    finally:
        uploader.close()
    assert remote_prefix(1000, "20261101T000000Z") + "COMPLETE" in hub.repos[("model", REPO_ID)].files
    assert remote_prefix(100) + "COMPLETE" in hub.repos[("model", REPO_ID)].files
    found = upload.find_remote_checkpoints(resolved, HASH)
    assert [(r.run_id, r.step) for r in found] == [(RUN, 100), ("20261101T000000Z", 1000)]


def test_a_checkpoint_pruned_locally_before_it_went_up_is_dropped_with_a_reason(hub, tmp_path, caplog):
    resolved = resolved_for(tmp_path, hub.url)
    output = tmp_path / "out"
    save_checkpoint(output, 8)
    later = save_checkpoint(output, 16)
    checkpoints.prune(output / "checkpoints", 1)  # checkpoint-8 is gone before the worker reached it
    uploader = Uploader(resolved, output).start()
    try:
        with caplog.at_level(logging.WARNING, logger="sana_appliance.hub.upload"):
            uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
            uploader.add("checkpoint", step=16, config_hash=HASH, run_id=RUN)
            assert drained(uploader) == []
    finally:
        uploader.close()
    assert "checkpoint-8 was removed locally" in caplog.text and "raise checkpointing_steps" in caplog.text
    assert repo_under(hub, f"checkpoints/{HASH}/") == local_files(later, remote_prefix(16))


def test_a_stale_marker_is_removed_in_the_commit_that_replaces_its_files(hub, tmp_path):
    """Another run of the same config pushed checkpoint-8 earlier: its marker never vouches for the new files."""
    resolved = resolved_for(tmp_path, hub.url)
    old = save_checkpoint(tmp_path / "old", 8, seed=1)
    first = Uploader(resolved_for(tmp_path, hub.url, OUTPUT_DIR=str(tmp_path / "old")), tmp_path / "old").start()
    first.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
    assert drained(first) == []
    first.close()
    assert repo_under(hub, remote_prefix(8)) == local_files(old, remote_prefix(8))

    new = save_checkpoint(tmp_path / "out", 8, seed=2)
    second = Uploader(resolved, tmp_path / "out").start()
    second.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
    assert drained(second) == []
    second.close()
    history = hub.repos[("model", REPO_ID)].history
    replacing = history[-2]
    assert remote_prefix(8) + "COMPLETE" in replacing.deleted and remote_prefix(8) + "transformer.safetensors" in replacing.added
    assert repo_under(hub, remote_prefix(8)) == local_files(new, remote_prefix(8))


@pytest.mark.parametrize("sharded", [False, True])
def test_download_checkpoint_gives_the_same_bytes_and_it_verifies(hub, tmp_path, sharded):
    """Every file the marker vouches for goes up and comes back: an FSDP checkpoint's `sharded/` folder too,
    with DCP's hidden `.metadata`."""
    resolved = resolved_for(tmp_path, hub.url)
    shards = None
    if sharded:
        shards = tmp_path / "out" / "checkpoints" / ".checkpoint-8.sharded.tmp"
        shards.mkdir(parents=True)
        (shards / ".metadata").write_bytes(b"dcp metadata")
        (shards / "__0_0.distcp").write_bytes(bytes(range(256)) * 700)
    folder = save_checkpoint(tmp_path / "out", 8, sharded=shards)
    assert (folder / "sharded" / ".metadata").is_file() == sharded
    uploader = Uploader(resolved, tmp_path / "out").start()
    uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
    assert drained(uploader) == []
    uploader.close()
    (remote,) = upload.find_remote_checkpoints(resolved, HASH)
    hub.fail("GET", "/resolve/", 503)  # one download is retried
    got = upload.download_checkpoint(resolved, HASH, remote, tmp_path / "dl")
    assert local_files(got, "") == local_files(folder, "")
    assert checkpoints.verify(checkpoints.CheckpointRef(got, 8)) == []


def test_uploading_does_not_hold_the_callers_thread(hub, tmp_path):
    """add() returns at once even while a commit hangs on the Hub."""
    resolved = resolved_for(tmp_path, hub.url)
    save_checkpoint(tmp_path / "out", 8)
    save_checkpoint(tmp_path / "out", 16)
    hub.fail("POST", "/commit/", "delay:3")
    uploader = Uploader(resolved, tmp_path / "out").start()
    try:
        uploader.add("checkpoint", step=8, config_hash=HASH, run_id=RUN)
        deadline = time.monotonic() + 10
        while hub.hits("POST", "/commit/") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        uploader.add("checkpoint", step=16, config_hash=HASH, run_id=RUN)
        assert time.monotonic() - start < 2  # far below the 3 s the commit hangs
        assert threading.current_thread() is threading.main_thread()
        assert drained(uploader) == []
    finally:
        uploader.close()
    assert remote_prefix(16) + "COMPLETE" in hub.repos[("model", REPO_ID)].files


def test_a_job_queued_again_while_it_is_being_sent_goes_up_once_more(hub, tmp_path):
    """The end of a run queues the run's records while the interval's upload of them may be on its way: the
    newest files must reach the Hub, not the ones read before."""
    resolved = resolved_for(tmp_path, hub.url)
    output = tmp_path / "out"
    output.mkdir(parents=True)
    (output / "run.json").write_text('{"status": "training"}')
    hub.fail("POST", "/commit/", "delay:2")
    uploader = Uploader(resolved, output).start()
    try:
        uploader.add("progress")
        deadline = time.monotonic() + 30
        while hub.hits("POST", "/commit/") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        (output / "run.json").write_text('{"status": "finished"}')  # the export rewrote it meanwhile
        uploader.add("progress")
        assert drained(uploader) == []
    finally:
        uploader.close()
    assert json.loads(hub.repos[("model", REPO_ID)].files["run/run.json"]) == {"status": "finished"}


def test_the_run_identity_and_a_checkpoints_paths_do_not_depend_on_where_the_workspace_is_mounted(tmp_path):
    from sana_appliance.run.train import _moved_workspace

    one = {"data_backend_config": "/pod1/ws/config/mdb.json", "learning_rate": 1e-5, "output_dir": "/pod1/ws/output"}
    two = {"data_backend_config": "/mnt/b/config/mdb.json", "learning_rate": 1e-5, "output_dir": "/mnt/b/output"}
    assert checkpoints.run_identity(one, Path("/pod1/ws")) == checkpoints.run_identity(two, Path("/mnt/b"))
    assert checkpoints.run_identity(one, Path("/pod1/ws")) != checkpoints.run_identity(
        {**two, "learning_rate": 2e-5}, Path("/mnt/b"))
    moved = _moved_workspace(one, "/pod1/ws", Path("/mnt/b"))
    assert checkpoints.compare_configs(moved, two) == ([], [])  # the same files: nothing changed
    assert _moved_workspace(one, None, Path("/mnt/b")) == one  # a checkpoint that did not record its workspace
