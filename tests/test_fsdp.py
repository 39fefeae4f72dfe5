"""FSDP2 (`distributed_strategy: fsdp`) with real processes on CPU (gloo): weights, AdamW state and EMA
sharded across the ranks, checkpoints through torch.distributed.checkpoint, a resume on the same process
count (bit for bit) and on another one (DCP reshards), node-local disks that each end with every shard,
and the settings FSDP refuses.

Run: pytest tests/test_fsdp.py   (~3 minutes on 2 cores)
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import STEPS, TOLERANCE, cli_env, run_cli, start_cli
from safetensors.torch import load_file
from test_checkpoints import Reader
from test_config import env_for, problems_of
from test_multinode import finish, free_port, max_diff, node_env

from sana_appliance.config.resolve import resolve
from sana_appliance.config.schema import TrainConfig
from sana_appliance.core.errors import ConfigError
from sana_appliance.run import checkpoints

FSDP = {"SANA_DISTRIBUTED_STRATEGY": "fsdp"}


def _fsdp_env(workspace, out, processes: int, steps: int, **extra: str) -> dict[str, str]:
    return cli_env(workspace, out, **{**STEPS, "SANA_MAX_TRAIN_STEPS": str(steps), **FSDP,
                                      "SANA_NUM_PROCESSES": str(processes), "SANA_TRAIN_BATCH_SIZE": str(8 // processes),
                                      **extra})


def _shards(folder) -> list[str]:
    return sorted(p.name for p in (folder / checkpoints.SHARDED).iterdir())


def test_two_sharded_processes_match_one_process_and_resume_exactly_or_on_another_count(shared_workspace, reference,
                                                                                       tmp_path):
    """2 processes x batch 4 under FSDP train what 1 process x batch 8 trains (DDP, unsharded) within the stated
    tolerance, with validation and the EMA gathered from the shards; a resume of their step-8 checkpoint on 2
    processes ends bit for bit where the uninterrupted run ends, and on 1 process within the tolerance."""
    whole = tmp_path / "whole"
    done = run_cli(_fsdp_env(shared_workspace, whole, 2, 16, SANA_VALIDATION_STEPS="8"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "distributed_strategy=fsdp: weights, gradients, AdamW state and EMA sharded across 2 process(es)" in done.stderr
    assert "Traceback" not in done.stderr and "returned a view tensor" not in done.stderr
    assert max_diff(whole / "transformer.safetensors", reference / "transformer.safetensors") < TOLERANCE
    assert max_diff(whole / "transformer_ema.safetensors", reference / "transformer_ema.safetensors") < TOLERANCE
    # Validation ran on rank 0's gathered copy, at step 8 and at the end.
    assert {p.name.split("_")[0] for p in (whole / "validation").glob("*.png")} >= {"step0000008", "step0000016"}, \
        sorted(p.name for p in (whole / "validation").glob("*"))
    # Each rank wrote its own shard; the marker vouches for every file, the shards included.
    ckpt = whole / "checkpoints" / "checkpoint-16"
    assert _shards(ckpt) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.glob("transformer.safetensors")) and not list(ckpt.glob("optimizer.pt"))
    marker = json.loads((ckpt / checkpoints.MARKER).read_text())
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= marker["files"].keys()
    assert checkpoints.verify(checkpoints.CheckpointRef(ckpt, 16)) == []
    run = json.loads((whole / "run.json").read_text())
    assert run["distributed"]["strategy"] == "fsdp" and run["distributed"]["world_size"] == 2
    # The final weights are exported in the trained dtype, whole (not shards).
    assert (whole / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    half = tmp_path / "half"
    first = run_cli(_fsdp_env(shared_workspace, half, 2, 8))
    assert first.returncode == 0, first.stderr[-4000:]
    other = tmp_path / "other"
    shutil.copytree(half, other)
    again = run_cli(_fsdp_env(shared_workspace, half, 2, 16))
    assert again.returncode == 0 and "resumed from checkpoint-8 (step 8)" in again.stderr, again.stderr[-4000:]
    for name in ("transformer.safetensors", "transformer_ema.safetensors"):  # bit for bit
        assert max_diff(half / name, whole / name) == 0.0, name
    one = run_cli(_fsdp_env(shared_workspace, other, 1, 16))
    assert one.returncode == 0, one.stderr[-4000:]
    assert "1 processes now, 2 when the checkpoint was written" in one.stderr
    assert max_diff(other / "transformer.safetensors", reference / "transformer.safetensors") < TOLERANCE
    assert _shards(other / "checkpoints" / "checkpoint-16") == [".metadata", "__0_0.distcp"]

    # A sharded checkpoint is not resumed as an unsharded one (nor the reverse): exit 2, naming the key.
    refused = run_cli(cli_env(shared_workspace, other, **{**STEPS, "SANA_MAX_TRAIN_STEPS": "20"},
                              SANA_TRAIN_BATCH_SIZE="8"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "distributed_strategy: checkpoint has 'fsdp', config now says 'ddp'" in refused.stderr
    unsharded = tmp_path / "unsharded"
    shutil.copytree(reference, unsharded)
    refused = run_cli(_fsdp_env(shared_workspace, unsharded, 1, 20))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "distributed_strategy: checkpoint has 'ddp', config now says 'fsdp'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_sharded_checkpoints_on_node_local_disks_are_whole_on_every_machine(shared_workspace, reference, tmp_path):
    """Two machines with their own disks: each writes its rank's shard, then they exchange shards, so either disk
    alone resumes the run (here machine 1's, on one process)."""
    disk1 = tmp_path / "node1-disk"
    disk1.mkdir()
    port = free_port()
    outs = [tmp_path / "out0", disk1 / "out"]
    workspaces = [shared_workspace, disk1]
    procs = [start_cli(node_env(workspaces[n], outs[n], n, port, tmp_path / "probe", **FSDP,
                                SANA_MAX_TRAIN_STEPS="8")) for n in range(2)]
    readers = [Reader(p) for p in procs]
    codes = finish(procs, readers)
    logs = "".join(r.text() for r in readers)
    assert codes == [0, 0], logs[-5000:]
    assert "node-local" in logs and "Traceback" not in logs
    for out in outs:
        ckpt = out / "checkpoints" / "checkpoint-8"
        assert _shards(ckpt) == [".metadata", "__0_0.distcp", "__1_0.distcp"], out
        assert checkpoints.verify(checkpoints.CheckpointRef(ckpt, 8)) == []
    a, b = (out / "checkpoints" / "checkpoint-8" / "sharded" / "__1_0.distcp" for out in outs)
    assert a.read_bytes() == b.read_bytes()
    alone = run_cli(cli_env(disk1, outs[1], **STEPS, **FSDP, SANA_TRAIN_BATCH_SIZE="8"))
    assert alone.returncode == 0 and "resumed from checkpoint-8" in alone.stderr, alone.stderr[-4000:]
    assert max_diff(outs[1] / "transformer.safetensors", reference / "transformer.safetensors") < TOLERANCE


@pytest.mark.parametrize(("extra", "named"), [
    ({"SANA_OPTIMIZER": "optimi-adamw"}, "optimizer='optimi-adamw'"),
    ({"SANA_MIXED_PRECISION": "fp16"}, "mixed_precision='fp16'"),
    ({"SANA_COMPILE_TRANSFORMER": "true"}, "compile_transformer=True"),
])
def test_fsdp_refuses_what_it_cannot_train(tmp_path, extra, named):
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, **FSDP, **extra))
    text = problems_of(exc)
    assert named in text and "distributed_strategy=fsdp" in text, text
    assert exc.value.exit_code == 2


def test_bf16_under_fsdp_computes_in_bf16_and_exports_bf16(shared_workspace, tmp_path):
    """The GPU recipe's precision on CPU: fp32 master shards, bf16 compute, and the export in bf16 (the dtype
    `mixed_precision: bf16` trains everywhere else)."""
    out = tmp_path / "out"
    done = run_cli(_fsdp_env(shared_workspace, out, 1, 4, SANA_MIXED_PRECISION="bf16"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "fp32 master weights, bf16 compute" in done.stderr
    exported = load_file(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_runs_of_earlier_versions_keep_their_identity():
    """distributed_strategy did not exist before FSDP: a config without it is the same run as `ddp` (same Hub
    checkpoints, same completion marker, nothing reported as changed at resume); `fsdp` is another run."""
    config = dataclasses.asdict(TrainConfig())
    older = {k: v for k, v in config.items() if k != "distributed_strategy"}
    assert checkpoints.config_hash(config) == checkpoints.config_hash(older)
    assert checkpoints.config_hash({**config, "distributed_strategy": "fsdp"}) != checkpoints.config_hash(older)
    assert checkpoints.compare_configs(older, config) == ([], [])
