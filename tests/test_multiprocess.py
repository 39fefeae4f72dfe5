"""Two real training processes on CPU (gloo): the appliance's own launcher, shared caches,
rank-0 outputs, a SIGTERM that every rank obeys before resuming, and replicas that end with
identical weights.

Run: pytest tests/test_multiprocess.py   (~1-2 minutes on 2 cores)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch
from conftest import cli_env, run_cli, start_cli
from probes import sitecustomize
from safetensors.torch import load_file
from test_checkpoints import Reader

from sana_appliance.run import checkpoints
from sana_appliance.run import lock as runlock

# Test-only probe, loaded into every worker through PYTHONPATH (no hook in the package): when
# sana_appliance.run.train is imported, Run.finish is wrapped so that each rank, after finishing,
# writes a digest of the weights IT holds. Only rank 0 writes outputs, so this is the one way
# to see rank 1's weights.
REPLICA_PROBE = sitecustomize("""
def _patch(module):
    original = module.Run.finish

    def finish(self):
        original(self)
        from test_multiprocess import weights_digest

        out = Path(os.environ["REPLICA_PROBE_DIR"]) / f"rank{self.accelerator.process_index}.sha256"
        out.write_text(weights_digest(self.state.transformer.state_dict()))

    module.Run.finish = finish
""", "REPLICA_PROBE_DIR")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        tensor = state[key].detach()
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP: this rank's shard
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_two_processes_train_stop_and_resume(shared_workspace, tmp_path):
    out, probe = tmp_path / "out", tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(REPLICA_PROBE)
    env = cli_env(shared_workspace, out, SANA_NUM_PROCESSES="2", SANA_MAX_TRAIN_STEPS="12", SANA_CHECKPOINTING_STEPS="4",
                  SANA_VALIDATION_STEPS="0", REPLICA_PROBE_DIR=str(probe))
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), tests_dir, env.get("PYTHONPATH")]))
    proc = start_cli(env)
    reader = Reader(proc)
    if not reader.wait_for("saved checkpoint-4", timeout=150):
        proc.kill()
        raise AssertionError(reader.text()[-5000:])
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both ranks
    assert proc.wait(timeout=120) == 143, reader.text()[-3000:]
    log = reader.text()
    assert "launching 2 training process(es) on one machine" in log
    valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
    assert valid and not invalid
    _, objects, state = checkpoints.load(valid[-1])
    assert state["world_size"] == 2 and {"rng_rank0", "rng_rank1"} <= objects.keys()

    done = run_cli(env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from checkpoint-{valid[-1].step}" in done.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 13))
    # Only rank 0 writes outputs; both ranks trained the same replicated weights, the ones exported.
    assert (out / "final" / "model_index.json").is_file() and (out / "run.json").is_file()
    rank0, rank1 = (probe / "rank0.sha256").read_text(), (probe / "rank1.sha256").read_text()
    assert rank0 == rank1, "the two ranks ended with different weights"
    assert rank0 == weights_digest(load_file(out / "transformer.safetensors"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 for r in rows if "loss" in r)


def _workers_of(launcher_pid: int) -> list[int]:
    """Live processes started by the appliance launcher `launcher_pid` (they carry its pid)."""
    mark = f"APPLIANCE_LAUNCHER_PID={launcher_pid}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if mark in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_workers_die_with_the_launcher_killed_by_kill_9(shared_workspace, tmp_path):
    """kill -9 of the appliance's launcher (the elastic agent) takes its workers with it: no orphan keeps
    training and writing, and the output folder is free for the restart at once."""
    out = tmp_path / "out"
    env = cli_env(shared_workspace, out, SANA_NUM_PROCESSES="2", SANA_MAX_TRAIN_STEPS="400", SANA_VALIDATION_STEPS="0",
                  SANA_CHECKPOINTING_STEPS="1000")
    proc = start_cli(env)
    reader = Reader(proc)
    workers = []
    try:
        assert reader.wait_for("held-out eval loss at step 0", timeout=150), reader.text()[-3000:]
        workers = _workers_of(proc.pid)
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their launcher"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lock_file = out / runlock.LOCK_NAME
    assert not (holders := _holders(lock_file)), f"the lock file is still open after the job died: {holders}"
    runlock.acquire(out).release()  # the kernel dropped the lock with its last holder


def _holders(path: Path) -> list[str]:
    """Processes with `path` open: pid, state, command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") == str(path) for fd in fds):
                state = Path(f"/proc/{entry}/stat").read_text().split()[2]
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                found.append(f"{entry} [{state}] {cmd}")
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has closed its files
    except OSError:
        return False
