"""Where a process stands in a job, from the environment (core/topology.py), and the job's exit code
from its processes' codes (distributed/launch.py). Pure functions: no process is started.

Run: pytest tests/test_topology.py   (~1 s)
"""

from __future__ import annotations

import pytest

from sana_appliance.core.errors import ConfigError
from sana_appliance.core.topology import detect, slurm_first_host
from sana_appliance.distributed.launch import job_exit_code


def test_one_process_without_any_variable_trains_in_place():
    t = detect({}, 1)
    assert t.role == "single" and t.nnodes == 1
    assert detect({"RANK": "3"}, 1).role == "single"  # a stray RANK without WORLD_SIZE changes nothing


def test_deepspeed_local_size_and_an_unknown_local_count():
    base = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1", "CROSS_RANK": "1"}
    t = detect({**base, "LOCAL_SIZE": "2"}, 1)
    assert (t.launcher, t.local_world_size, t.local_size_known, t.nnodes) == ("deepspeed", 2, True, 2)
    assert detect(base, 1).local_size_known is False  # counted per machine once the group has met


def test_several_processes_or_one_per_gpu_make_this_process_the_launcher():
    assert detect({}, 2).role == "agent" and detect({}, 2).nproc_per_node == 2
    assert detect({}, 0).role == "agent" and detect({}, 0).nproc_per_node == 0  # decided at launch from the GPUs


def test_appliance_variables_describe_the_machines():
    t = detect({"NUM_NODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}, 1)
    assert (t.role, t.nnodes, t.node_rank, t.master_addr, t.master_port) == ("agent", 2, 1, "10.0.0.1", 1234)
    assert t.describe() == "machine 1 of 2, rendezvous at 10.0.0.1:1234 (appliance variables)"


@pytest.mark.parametrize("env, says", [
    ({"NUM_NODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK"),
    ({"NUM_NODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR"),
    ({"NUM_NODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 is not below NUM_NODES=2"),
    ({"NUM_NODES": "two", "NODE_RANK": "0", "MASTER_ADDR": "h"}, "NUM_NODES='two'"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "not below WORLD_SIZE"),
])
def test_contradicting_variables_are_refused_naming_the_variable(env, says):
    with pytest.raises(ConfigError) as err:
        detect(env, 1)
    assert says in err.value.message


def test_runpod_instant_cluster_world_size_is_not_mistaken_for_a_launched_worker():
    env = {"NUM_NODES": "2", "NODE_RANK": "1", "PRIMARY_ADDR": "10.65.0.2", "PRIMARY_PORT": "29500",
           "MASTER_ADDR": "10.65.0.2", "MASTER_PORT": "29500", "NUM_TRAINERS": "8", "WORLD_SIZE": "16",
           "NODE_ADDR": "10.65.0.3"}
    t = detect(env, 0)
    assert t.role == "agent" and t.source == "RunPod Instant Cluster"
    assert (t.nnodes, t.node_rank, t.nproc_per_node, t.local_addr) == (2, 1, 8, "10.65.0.3")


def test_skypilot_variables():
    env = {"SKYPILOT_NUM_NODES": "3", "SKYPILOT_NODE_RANK": "2", "SKYPILOT_NODE_IPS": "10.1.0.4\n10.1.0.5\n10.1.0.6\n",
           "SKYPILOT_NUM_GPUS_PER_NODE": "4"}
    t = detect(env, 0)
    assert (t.source, t.nnodes, t.node_rank, t.master_addr, t.local_addr, t.nproc_per_node) == (
        "SkyPilot", 3, 2, "10.1.0.4", "10.1.0.6", 4)
    assert detect(env, 2).nproc_per_node == 2  # an explicit num_processes wins over the platform's GPU count


def test_slurm_one_task_per_node_launches_and_one_task_per_gpu_is_a_launcher():
    base = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[003-004]",
            "SLURM_GPUS_ON_NODE": "8"}
    t = detect({**base, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, 0)
    assert (t.role, t.source, t.master_addr, t.node_rank, t.nproc_per_node) == ("agent", "Slurm", "gpu003", 1, 8)
    w = detect({**base, "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
                "MASTER_PORT": "29500"}, 1)
    assert (w.role, w.launcher, w.rank, w.world_size, w.local_rank, w.master_addr) == (
        "worker", "srun", 9, 16, 1, "gpu003")


def test_slurm_node_lists():
    assert slurm_first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert slurm_first_host("node7,node8") == "node7"
    assert slurm_first_host("") is None


def test_launched_workers_name_their_launcher():
    worker = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
              "MASTER_PORT": "1"}
    assert detect({**worker, "TORCHELASTIC_RUN_ID": "x"}, 1).launcher == "torchrun"
    assert detect({**worker, "TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "no"}, 1).launcher == \
        "accelerate launch"
    assert "appliance" in detect({**worker, "TORCHELASTIC_RUN_ID": "x", "APPLIANCE_LAUNCHER_PID": "5"}, 1).launcher
    t = detect({**worker, "TORCHELASTIC_RESTART_COUNT": "2"}, 1)
    assert (t.role, t.rank, t.local_rank, t.restart) == ("worker", 1, 1, 2)
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}, 1).role == "single"  # torchrun --nproc_per_node 1


def test_the_job_exit_code():
    assert job_exit_code([0, 0]) == 0
    assert job_exit_code([143, 0]) == 143 and job_exit_code([-15, 0]) == 143  # a signal before the handler
    assert job_exit_code([7, 2]) == 2  # the documented error, not the peer that lost it
    assert job_exit_code([-9, 7]) == 7 and job_exit_code([1]) == 7  # a crash with no restart left


def test_resolve_refuses_accelerate_mixed_precision_that_disagrees(tmp_path):
    from sana_appliance.config.resolve import CliArgs, resolve_collecting

    env = {"WORKSPACE": str(tmp_path), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
           "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "fp16"}
    _, problems = resolve_collecting(env, CliArgs())
    assert any("accelerate launch set mixed precision 'fp16'" in p and "--mixed_precision no" in p for p in problems)
    _, problems = resolve_collecting({**env, "ACCELERATE_MIXED_PRECISION": "no"}, CliArgs())
    assert not problems  # the demo's mixed_precision is no


def test_a_restarted_group_resumes_even_with_resume_none(tmp_path):
    from sana_appliance.config.resolve import CliArgs, resolve

    env = {"WORKSPACE": str(tmp_path), "SANA_RESUME_FROM_CHECKPOINT": "none"}
    assert resolve(env, CliArgs()).config.resume_from_checkpoint == "none"
    worker = {**env, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "APPLIANCE_GROUP_START": "1"}
    r = resolve(worker, CliArgs())
    assert r.config.resume_from_checkpoint == "latest" and "restart 1" in r.provenance["resume_from_checkpoint"]
