"""Checkpoints that survive anything: atomic saves, pruning, exact resume, SIGTERM, kill -9.

Run: pytest tests/test_checkpoints.py   (~3 minutes on 2 cores; uses the shared demo run)
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_env, run_cli, start_cli
from safetensors.torch import load_file

from sana_appliance.core.errors import ConfigError, DataError
from sana_appliance.run import checkpoints
from sana_appliance.run import lock as runlock


def save_dummy(root: Path, step: int) -> Path:
    return checkpoints.save(root, step, tensors={"transformer": {"w": torch.full((2,), float(step))}},
                            objects={"optimizer": {"step": step}}, state={"step": step})


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class Reader:
    """Drains a child's output in a thread so the pipe never blocks; lines are searchable."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.proc = proc
        self.thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self.thread.start()

    def _run(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float) -> bool:
        """True once `needle` is printed; False on timeout or when the child exits first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.thread.join(timeout=10)
                return any(needle in line for line in self.lines)
            if any(needle in line for line in list(self.lines)):
                return True
            time.sleep(0.05)
        return False

    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


# ---------------------------------------------------------------- unit behaviour


def test_folder_without_marker_is_never_a_checkpoint(tmp_path, caplog):
    save_dummy(tmp_path, 10)
    save_dummy(tmp_path, 20)
    broken = tmp_path / "checkpoint-30"  # a save killed before its marker
    broken.mkdir()
    (broken / "transformer.safetensors").write_bytes(b"half")
    valid, invalid = checkpoints.list_checkpoints(tmp_path)
    assert [r.step for r in valid] == [10, 20] and invalid == [broken]
    with caplog.at_level("WARNING"):
        ref = checkpoints.find_resume("latest", tmp_path)
    assert ref.step == 20 and "checkpoint-30" in caplog.text
    assert checkpoints.find_resume("none", tmp_path) is None
    with pytest.raises(ConfigError, match="COMPLETE"):
        checkpoints.find_resume(str(broken), tmp_path)
    with pytest.raises(ConfigError, match="latest"):
        checkpoints.find_resume("checkpoint-99", tmp_path)
    # Paths inside are relative: the folder still loads after the volume moves.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    tensors, objects, state = checkpoints.load(checkpoints.find_resume("latest", moved))
    assert state["step"] == 20 and float(tensors["transformer"]["w"][0]) == 20.0


def test_prune_keeps_newest_and_cleans_temp(tmp_path):
    for step in (1, 2, 3, 4):
        save_dummy(tmp_path, step)
    (tmp_path / ".checkpoint-5.abc.tmp").mkdir()
    removed = checkpoints.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_disk_space_check_refuses_with_numbers(tmp_path):
    with pytest.raises(DataError) as exc:
        checkpoints.check_disk(tmp_path, 10**18)
    assert "GiB free" in exc.value.message and "two" in exc.value.message and exc.value.exit_code == 4
    checkpoints.check_disk(tmp_path, 1024)


def test_failed_save_keeps_earlier_checkpoints(tmp_path):
    """A real full disk: a 2 MiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        checkpoints.save(mnt, 1, tensors={"transformer": {"w": torch.zeros(1000)}}, objects={}, state={"step": 1})
        with pytest.raises(DataError) as exc:
            checkpoints.save(mnt, 2, tensors={"transformer": {"w": torch.zeros(1_000_000)}}, objects={}, state={"step": 2})
        assert "intact" in exc.value.message
        valid, invalid = checkpoints.list_checkpoints(mnt)
        assert [r.step for r in valid] == [1] and not invalid
        assert not list(mnt.glob(".checkpoint-*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------- end to end


def test_sigterm_saves_exits_143_and_resume_is_bit_exact(demo_run, shared_workspace):
    """Interrupted + resumed == uninterrupted, bitwise, with validation in between."""
    reference, _ = demo_run
    out = shared_workspace / "out-sigterm"
    env = cli_env(shared_workspace, out)
    proc = start_cli(env)
    reader = Reader(proc)
    assert reader.wait_for("saved checkpoint-8", timeout=240), reader.text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, reader.text()[-3000:]
    first = reader.text()
    assert "SIGTERM" in first
    valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
    stopped_at = valid[-1].step
    assert 8 <= stopped_at < 16 and not invalid
    assert not (out / "final").exists()

    second = run_cli(env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from checkpoint-{stopped_at}" in second.stderr
    assert same_weights(reference / "transformer.safetensors", out / "transformer.safetensors")
    assert same_weights(reference / "transformer_ema.safetensors", out / "transformer_ema.safetensors")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 17))  # no duplicated or missing step after the resume


def test_random_kill9_always_resumes_from_a_valid_checkpoint(shared_workspace, tmp_path):
    """kill -9 at random moments (saves run every step, so many kills land mid-save); the
    final weights equal those of an uninterrupted run of the same job."""
    settings = {"SANA_MAX_TRAIN_STEPS": "60", "SANA_CHECKPOINTING_STEPS": "1", "SANA_CHECKPOINTS_TOTAL_LIMIT": "2",
                "SANA_VALIDATION_STEPS": "0", "SANA_USE_EMA": "false"}
    reference = run_cli(cli_env(shared_workspace, tmp_path / "reference", **settings))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "killed"
    env = cli_env(shared_workspace, out, **settings)
    rng = random.Random(1234)
    kills = 0
    for _attempt in range(8):
        proc = start_cli(env)
        reader = Reader(proc)
        if not reader.wait_for("held-out eval loss at step", timeout=240):
            proc.kill()
            if "already finished" in reader.text():
                break  # the previous attempt was killed after its completion marker: done
            pytest.fail(reader.text()[-3000:])
        # Within 1.5 s of the first step: each attempt trains a few steps, so a fast machine cannot finish the
        # job before the third kill.
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.kill()
        proc.wait()
        reader.text()
        kills += 1
        ref = checkpoints.find_resume("latest", out / "checkpoints")
        if ref is not None:  # the newest valid checkpoint always loads completely
            tensors, objects, state = checkpoints.load(ref)
            assert state["step"] == ref.step and "transformer" in tensors and "optimizer" in objects
    assert kills >= 3
    final = run_cli(env)
    assert final.returncode == 0, final.stderr[-3000:]
    assert same_weights(tmp_path / "reference" / "transformer.safetensors", out / "transformer.safetensors")


def test_restart_after_completion_does_nothing(demo_run, shared_workspace):
    """Container platforms restart finished containers: no retraining, no re-export, no re-upload."""
    reference, _ = demo_run
    lock = reference / runlock.LOCK_NAME  # rewritten by every run: it names the run holding the folder
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and p != lock}
    again = run_cli(cli_env(shared_workspace, reference))
    assert again.returncode == 0 and "already finished at step 16" in again.stderr
    after = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and p != lock}
    assert before == after


# ---------------------------------------------------------------- background writes


def test_background_save_writes_the_state_as_copied_while_training_changes_it(tmp_path):
    """host_copy + BackgroundSave: the live tensors change in place right after the copy (as the next steps do),
    and the checkpoint still holds the values at the copy, complete and verified."""
    live = {"transformer": {"w": torch.arange(6, dtype=torch.float32)}}
    objects = {"optimizer": {"state": {0: {"m": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}}
    copied = checkpoints.host_copy({"tensors": live, "objects": objects})
    assert checkpoints.tensor_bytes(copied) == 6 * 4 + 3 * 4
    write = checkpoints.BackgroundSave(tmp_path / "ck", 4, None, tensors=copied["tensors"], objects=copied["objects"],
                                       state={"step": 4})
    live["transformer"]["w"].add_(100.0)
    objects["optimizer"]["state"][0]["m"].zero_()
    objects["optimizer"]["param_groups"][0]["lr"] = 9.0
    path = write.result()
    assert write.done() and write.error is None and checkpoints.verify(checkpoints.CheckpointRef(path, 4)) == []
    tensors, saved_objects, state = checkpoints.load(checkpoints.CheckpointRef(path, 4))
    assert torch.equal(tensors["transformer"]["w"], torch.arange(6, dtype=torch.float32))
    assert torch.equal(saved_objects["optimizer"]["state"][0]["m"], torch.ones(3))
    assert saved_objects["optimizer"]["param_groups"][0]["lr"] == 0.1 and state == {"step": 4}


def test_background_save_failure_is_raised_by_result(tmp_path):
    """A write that fails (here: the checkpoints folder is a file) is a DataError from result(), the loop's
    thread, not a thread's traceback; nothing half-written is left."""
    root = tmp_path / "ck"
    root.write_text("not a folder")
    write = checkpoints.BackgroundSave(root, 4, None, tensors={"transformer": {"w": torch.zeros(2)}}, objects={},
                                       state={"step": 4})
    with pytest.raises(DataError, match="saving checkpoint-4"):
        write.result()
    assert root.read_text() == "not a folder"


def test_the_loop_trains_on_while_a_periodic_checkpoint_is_written(demo_run, shared_workspace, tmp_path, monkeypatch,
                                                                  caplog):
    """The short demo in-process, with checkpoint-8's write held back until the loop has reached step 10: the
    loop trained on (validation at step 8 included) while the write waited, and checkpoint-8 still holds
    step 8's weights, bit for bit those of the uninterrupted CLI run."""
    import logging

    from sana_appliance.config.resolve import CliArgs, resolve
    from sana_appliance.distributed.stopping import StopFlag
    from sana_appliance.run.train import Run

    reference, _ = demo_run
    run = Run(resolve(cli_env(shared_workspace, tmp_path / "out"), CliArgs()), StopFlag())
    real_save, writes = checkpoints.save, []

    def held_save(root, step, **kwargs):
        deadline = time.monotonic() + 120
        while step < run.max_steps and run.state.step < step + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        writes.append((step, run.state.step))
        return real_save(root, step, **kwargs)

    monkeypatch.setattr(checkpoints, "save", held_save)
    caplog.set_level(logging.INFO, logger="sana_appliance.run.train")
    try:
        run.setup()
        run.train()
        run.finish()
    finally:
        run.close()
    assert writes[0][0] == 8 and writes[0][1] >= 10, writes  # the loop was at step 10 or later when it was written
    assert writes[-1] == (16, 16)  # the final save is written before finish() goes on
    assert "saved checkpoint-8" in caplog.text and "written while training went on" in caplog.text
    ck = tmp_path / "out" / "checkpoints" / "checkpoint-8"
    assert checkpoints.verify(checkpoints.CheckpointRef(ck, 8)) == []
    assert same_weights(ck / "transformer.safetensors", reference / "checkpoints" / "checkpoint-8" / "transformer.safetensors")
    assert same_weights(tmp_path / "out" / "transformer.safetensors", reference / "transformer.safetensors")
