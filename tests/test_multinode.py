"""Two "machines" on loopback: two torch elastic agents (torchrun's, or the appliance's own from
NUM_NODES / NODE_RANK / MASTER_ADDR), each with its own workspace (node-local disks) or one shared
workspace; a worker killed with -9, a SIGTERM to one machine, RANK/WORLD_SIZE without a
rendezvous, a resume on another process count. Data parallel must equal one process with the
same global batch: every random draw is made for the global batch and each rank takes its slice.

Run: pytest tests/test_multinode.py   (~4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import STEPS, TOLERANCE, cli_env, run_cli, start_cli
from probes import sitecustomize
from safetensors.torch import load_file
from test_checkpoints import Reader

from sana_appliance.model.parts import TINY_VERSION
from sana_appliance.run import checkpoints

ROOT = Path(__file__).resolve().parent.parent

# Test-only probe, loaded into every worker through PYTHONPATH (no hook in the package): after setup each
# rank records the step it starts training at, and after finishing a digest of the weights it holds.
PROBE = sitecustomize("""
def _patch(module):
    setup, finish = module.Run.setup, module.Run.finish

    def record(self, **facts):
        out = Path(os.environ["RANK_PROBE_DIR"]) / f"rank{self.ranks.rank}.json"
        old = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**old, **facts}))

    def patched_setup(self):
        setup(self)
        record(self, start_step=self.state.step, node=self.ranks.node, shared_output=self.ranks.shared_output)

    def patched_finish(self):
        finish(self)
        from test_multiprocess import weights_digest

        record(self, digest=weights_digest(self.state.transformer.state_dict()), end_step=self.state.step)

    module.Run.setup, module.Run.finish = patched_setup, patched_finish
""", "RANK_PROBE_DIR")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_probe(env: dict[str, str], probe: Path) -> dict[str, str]:
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE)
    tests_dir = str(Path(__file__).resolve().parent)
    return {**env, "RANK_PROBE_DIR": str(probe),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), tests_dir, env.get("PYTHONPATH")]))}


def node_env(workspace: Path, output: Path, node: int, port: int, probe: Path, **extra: str) -> dict[str, str]:
    env = cli_env(workspace, output, **{**STEPS, "SANA_TRAIN_BATCH_SIZE": "4", **extra})
    # NODE_ADDR: both machines are 127.0.0.1, so the rendezvous ranks them by start order (machine 0 first).
    env.update(NUM_NODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_ADDR="127.0.0.1")
    return with_probe(env, probe)


def torchrun_env(workspace: Path, output: Path, probe: Path) -> dict[str, str]:
    return with_probe(cli_env(workspace, output, **STEPS, SANA_TRAIN_BATCH_SIZE="4"), probe)


def start_torchrun(env: dict[str, str], port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"t{port}",
                             str(ROOT / "entrypoint.py")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(procs: list[subprocess.Popen], readers: list[Reader], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("\n\n".join(r.text()[-4000:] for r in readers)) from None
    return codes


def wait_any(readers: list[Reader], needle: str, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until one machine's log shows `needle` (rank 0 logs, on whichever machine the rendezvous put it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in line for r in readers for line in list(r.lines)):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"no {needle!r}:\n" + "\n\n".join(r.text()[-3000:] for r in readers))


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def probes(probe: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in probe.glob("rank*.json")}


@pytest.fixture(scope="module")
def second_disk(tmp_path_factory) -> Path:
    """Machine 1's own workspace: nothing in it, so that machine builds its model, dataset and caches itself."""
    return tmp_path_factory.mktemp("node1-disk")


def test_two_torchrun_agents_with_their_own_disks_match_one_process(shared_workspace, second_disk, reference, tmp_path):
    port = free_port()
    outs = [tmp_path / "out0", second_disk / "out-torchrun"]
    workspaces = [shared_workspace, second_disk]
    procs = [start_torchrun(torchrun_env(workspaces[n], outs[n], tmp_path / "probe"), port) for n in range(2)]
    readers = [Reader(p) for p in procs]
    codes = finish(procs, readers)
    logs = [r.text() for r in readers]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    both = "".join(logs)
    assert "launched by torchrun" in both and "node-local" in both, both[-3000:]
    assert "Traceback" not in both
    # Machine 1 built the built-in model on its own disk, every part with its weights (transformers writes
    # only on global rank 0 unless told otherwise).
    built = second_disk / "cache" / "models" / f"tiny-sana-{TINY_VERSION}"  # (not its .lock beside it)
    assert all(any((built / part).glob("*.safetensors")) for part in ("transformer", "vae", "text_encoder"))
    # Both machines hold the checkpoints (node-local output disks), identical.
    for out in outs:
        valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
        assert [r.step for r in valid][-1] == 16 and not invalid, out
    a, b = (out / "checkpoints" / "checkpoint-16" / "transformer.safetensors" for out in outs)
    assert a.read_bytes() == b.read_bytes()
    # Only rank 0 writes the run's records (rank 0 is the machine the rendezvous ranked first).
    main = 0 if (outs[0] / "run.json").exists() else 1
    assert (outs[main] / "final" / "model_index.json").is_file() and not (outs[1 - main] / "final").exists()
    assert not (outs[1 - main] / "metrics.jsonl").exists()
    # The global batch's draws, sliced: the same training as one process with batch 8.
    assert max_diff(outs[main] / "transformer.safetensors", reference / "transformer.safetensors") < TOLERANCE
    run = json.loads((outs[main] / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "nodes": 2, "processes_per_node": 1, "launcher": "torchrun",
                                  "workspace_disk": "node-local", "output_disk": "node-local", "strategy": "ddp"}
    ranks = probes(tmp_path / "probe")
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_appliance_variables_on_a_shared_workspace_match_one_process(shared_workspace, reference, tmp_path):
    """NUM_NODES=2, NODE_RANK, MASTER_ADDR=127.0.0.1 and no launcher command; both machines mount one workspace."""
    port, out = free_port(), tmp_path / "out"
    procs = [start_cli(node_env(shared_workspace, out, n, port, tmp_path / "probe")) for n in range(2)]
    readers = [Reader(p) for p in procs]
    codes = finish(procs, readers)
    logs = [r.text() for r in readers]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert "machine 0 of 2" in logs[0] and "machine 1 of 2" in logs[1]
    assert "shared by the machines" in "".join(logs) and "Traceback" not in "".join(logs)
    valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
    assert [r.step for r in valid] == [12, 16] and not invalid  # written once (checkpoints_total_limit=2)
    assert max_diff(out / "transformer.safetensors", reference / "transformer.safetensors") < TOLERANCE
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 17))
    # The logged loss is the global batch's: the mean over ranks, equal to one process's at step 1.
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step": 1,' in x][0]
    ref_first = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines() if '"step": 1,' in x][0]
    assert abs(first["loss"] - ref_first["loss"]) < 1e-5
    run = json.loads((out / "run.json").read_text())
    assert run["distributed"]["nodes"] == 2 and run["distributed"]["output_disk"] == "shared"
    assert run["distributed"]["launcher"].startswith("the appliance's launcher")


def test_kill_9_of_one_worker_restarts_the_group_and_finishes_as_if_uninterrupted(shared_workspace, second_disk,
                                                                                tmp_path):
    """Machine 1's worker dies by kill -9 after checkpoint-4: both agents restart the group, it resumes from a
    checkpoint both disks hold and ends bit for bit where the same job without the kill ends."""
    outs = [tmp_path / "out0", second_disk / "out-kill"]
    workspaces = [shared_workspace, second_disk]

    def job(probe: Path, kill: bool) -> list[str]:
        port = free_port()
        procs = [start_cli(node_env(workspaces[n], outs[n] if kill else outs[n].with_name(outs[n].name + "-ref"), n, port,
                                    probe, SANA_MAX_RESTARTS="2", SANA_MAX_TRAIN_STEPS="24")) for n in range(2)]
        readers = [Reader(p) for p in procs]
        if kill:
            wait_any(readers, "saved checkpoint-4", procs)
            os.kill(_worker_of(procs[1].pid), signal.SIGKILL)
        codes = finish(procs, readers)
        logs = [r.text() for r in readers]
        assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
        return logs

    job(tmp_path / "probe-ref", kill=False)
    logs = job(tmp_path / "probe", kill=True)
    both = "".join(logs)
    assert "restarting the group from the last checkpoint" in logs[1], logs[1][-3000:]
    assert "resumed from checkpoint-" in both and "Traceback" not in both
    ranks = probes(tmp_path / "probe")
    assert ranks[0]["start_step"] == ranks[1]["start_step"] > 0  # the restarted group resumed, at one step
    reference = probes(tmp_path / "probe-ref")
    assert ranks[0]["digest"] == ranks[1]["digest"] == reference[0]["digest"]


def _worker_of(agent_pid: int) -> int:
    """The training process the appliance's agent `agent_pid` started (its child with RANK set)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for tid in os.listdir(f"/proc/{agent_pid}/task"):
            for pid in Path(f"/proc/{agent_pid}/task/{tid}/children").read_text().split():
                try:
                    if any(v.startswith(b"RANK=") for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                        return int(pid)
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError(f"no worker under {agent_pid}")


def test_sigterm_to_one_machine_stops_both_and_both_resume_at_the_same_step(shared_workspace, second_disk, tmp_path):
    outs = [tmp_path / "out0", second_disk / "out-term"]
    workspaces = [shared_workspace, second_disk]
    port = free_port()
    env = [node_env(workspaces[n], outs[n], n, port, tmp_path / "probe", SANA_MAX_TRAIN_STEPS="24") for n in range(2)]
    procs = [start_cli(e) for e in env]
    readers = [Reader(p) for p in procs]
    wait_any(readers, "saved checkpoint-4", procs)
    procs[1].send_signal(signal.SIGTERM)  # machine 1 is preempted: its agent gets SIGTERM
    codes = finish(procs, readers, timeout=180)
    logs = [r.text() for r in readers]
    assert codes == [143, 143], "\n\n".join(log[-3000:] for log in logs)
    assert "Traceback" not in "".join(logs)
    steps = []
    for out in outs:  # one valid checkpoint at the stop step on each machine's disk, no half-written one
        valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
        assert valid and not invalid
        steps.append(valid[-1].step)
    assert steps[0] == steps[1]
    stop_step = steps[0]
    assert f"stopped by SIGTERM at step {stop_step}" in logs[0] and f"stopped by SIGTERM at step {stop_step}" in logs[1]
    for probe in (tmp_path / "probe").glob("rank*.json"):
        probe.unlink()

    port = free_port()
    procs = [start_cli({**e, "MASTER_PORT": str(port)}) for e in env]
    readers = [Reader(p) for p in procs]
    codes = finish(procs, readers)
    assert codes == [0, 0], "\n\n".join(r.text()[-3000:] for r in readers)
    ranks = probes(tmp_path / "probe")
    assert ranks[0]["start_step"] == ranks[1]["start_step"] == stop_step
    assert ranks[0]["end_step"] == ranks[1]["end_step"] == 24 and ranks[0]["digest"] == ranks[1]["digest"]


def test_rank_and_world_size_without_a_rendezvous_exit_in_seconds(shared_workspace, tmp_path):
    env = cli_env(shared_workspace, tmp_path / "out", RANK="1", WORLD_SIZE="2")
    t0 = time.monotonic()
    done = run_cli(env, timeout=60)
    assert done.returncode == 2 and "MASTER_ADDR and MASTER_PORT are not" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - t0 < 10
    # Rank 1 with a rendezvous nobody hosts, and rank 0 whose peers never come: one line each, exit 7.
    for rank, says in (("1", "could not reach rank 0's rendezvous"), ("0", "waited for the other ranks")):
        env = cli_env(shared_workspace, tmp_path / f"out{rank}", RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), SANA_RENDEZVOUS_TIMEOUT_S="3")
        t0 = time.monotonic()
        done = run_cli(env, timeout=120)
        assert done.returncode == 7 and says in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and "frame #" not in done.stderr
        assert time.monotonic() - t0 < 60


def test_resume_on_another_process_count_keeps_the_global_batch_or_says_what_to_set(shared_workspace, reference,
                                                                                     tmp_path):
    """A checkpoint of 2 processes x batch 4 at step 4: 1 process x batch 4 is refused (naming train_batch_size=8);
    1 process x batch 8 continues the same data order and draws, so it ends where one process x 8 throughout ends."""
    out = tmp_path / "out"
    first = run_cli(cli_env(shared_workspace, out, **{**STEPS, "SANA_MAX_TRAIN_STEPS": "4"}, SANA_NUM_PROCESSES="2",
                            SANA_TRAIN_BATCH_SIZE="4"))
    assert first.returncode == 0, first.stderr[-3000:]
    refused = run_cli(cli_env(shared_workspace, out, **STEPS, SANA_TRAIN_BATCH_SIZE="4"))
    assert refused.returncode == 2 and "set train_batch_size=8 to keep it" in refused.stderr, refused.stderr[-3000:]
    resumed = run_cli(cli_env(shared_workspace, out, **STEPS, SANA_TRAIN_BATCH_SIZE="8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the global batch (8) is the same, so data order and random draws continue exactly" in resumed.stderr
    assert max_diff(out / "transformer.safetensors", reference / "transformer.safetensors") < TOLERANCE


def test_machines_whose_datasets_differ_both_stop_with_exit_4(shared_workspace, tmp_path):
    """Node-local disks with one caption changed on machine 1: no silent difference, exit 4 on both machines."""
    from sana_appliance.core.workspace import Workspace
    from sana_appliance.data.demo import ensure_demo_dataset

    other = tmp_path / "node1"
    root = ensure_demo_dataset(Workspace(other, other / "cache" / "huggingface"))
    caption = sorted((root / "train").glob("*.txt"))[0]
    caption.write_text("a caption only machine 1 has")
    port = free_port()
    procs = [start_cli(node_env(ws, ws / "out-differ", n, port, tmp_path / "probe"))
             for n, ws in enumerate((shared_workspace, other))]
    readers = [Reader(p) for p in procs]
    codes = finish(procs, readers)
    logs = "".join(r.text() for r in readers)
    assert codes == [4, 4], logs[-4000:]
    assert "scanned different datasets" in logs and "machine 1: 64 samples" in logs and "Traceback" not in logs


AGREE_SCRIPT = """
import os, sys
import torch.distributed as dist
from sana_appliance.core.errors import ApplianceError, DataError
from sana_appliance.cli import leave
from sana_appliance.distributed.group import World

dist.init_process_group("gloo")
rank = dist.get_rank()
world = World(rank=rank, size=2, local_rank=rank, local_size=2)

def work():
    if rank == 1:
        raise DataError("not enough disk space in /x: 0.1 GiB free")
    return "ok"

try:
    world.agree(work)
except ApplianceError as exc:
    print(f"rank {rank} raised {type(exc).__name__}: {exc.message}", flush=True)
    leave(int(exc.exit_code))  # as the CLI ends: no gloo teardown abort at exit
leave(0)
"""


def test_an_error_on_one_rank_stops_every_rank_with_its_code(tmp_path):
    """World.agree: the rank that fails and the ranks that did not all raise, with the failing rank's exit code,
    instead of the others waiting in their next collective."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = free_port()
    procs = []
    for rank in ("0", "1"):
        procs.append(subprocess.Popen([sys.executable, str(script)], env={
            **env, "RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [4, 4], outs
    assert "rank 0 raised PeerError: rank 1 (machine 0) stopped: not enough disk space" in outs[0], outs[0]
    assert "rank 1 raised DataError" in outs[1], outs[1]
