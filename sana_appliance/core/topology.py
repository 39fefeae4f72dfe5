"""Where this process stands in a job, from the environment alone (no torch import).

Three roles:

- ``worker``: another launcher started this process as one rank of a job (torchrun, accelerate
  launch, deepspeed, Ray Train, srun with one task per GPU, or the appliance's own launcher). It
  set ``RANK`` and ``WORLD_SIZE``; the process trains directly and never launches again.
- ``agent``: the appliance is the launcher: more than one process on this machine, or more than
  one machine. It runs torch's elastic agent (``distributed/launch.py``).
- ``single``: one process, trains in place.

Machines are described by the appliance's variables ``NUM_NODES``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``, or read from the platform: RunPod Instant Clusters (the same names, plus
``NUM_TRAINERS`` GPUs per node, ``NODE_ADDR``, and ``WORLD_SIZE`` = all GPUs of the cluster set
before any launcher runs: that alone does not make this process a worker), SkyPilot
(``SKYPILOT_NODE_IPS``, ``SKYPILOT_NODE_RANK``, ``SKYPILOT_NUM_NODES``, ``SKYPILOT_NUM_GPUS_PER_NODE``)
and Slurm (``SLURM_NNODES``, ``SLURM_NODEID``, ``SLURM_JOB_NODELIST``, ``SLURM_GPUS_ON_NODE``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    role: str  # "single" | "agent" | "worker"
    source: str  # where the description came from, for the log and run.json
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1  # processes this machine runs (agent); 0 = one per visible GPU, decided at launch
    master_addr: str | None = None
    master_port: int = DEFAULT_PORT
    local_addr: str | None = None  # this machine's address as the others reach it (when the platform says)
    # worker only: what the launcher set
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str | None = None  # who launched this worker
    local_size_known: bool = True  # the launcher said how many processes this machine runs (else counted later)
    restart: int = 0  # how often the launcher restarted this group (APPLIANCE_GROUP_START, TORCHELASTIC_RESTART_COUNT)

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def describe(self) -> str:
        if self.role == "worker":
            return (f"rank {self.rank} of {self.world_size} (local rank {self.local_rank} of {self.local_world_size}), "
                    f"launched by {self.launcher}")
        if self.role == "agent":
            where = (f"machine {self.node_rank} of {self.nnodes}, rendezvous at {self.master_addr}:{self.master_port}"
                     if self.multi_node else "one machine")
            return f"{where} ({self.source})"
        return "one process"


def _int(env: Mapping[str, str], name: str, problems: list[str], minimum: int = 0) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"\d+", raw) or int(raw) < minimum:
        problems.append(f"{name}={raw!r}: expected a whole number >= {minimum}")
        return None
    return int(raw)


def _launcher_name(env: Mapping[str, str]) -> str:
    if env.get("APPLIANCE_LAUNCHER_PID"):
        return "the appliance's launcher (torch elastic agent)"
    if any(k.startswith("ACCELERATE_") for k in env) and env.get("TORCHELASTIC_RUN_ID"):
        return "accelerate launch"
    if env.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    if any(k.startswith(("DEEPSPEED", "DS_")) for k in env) or env.get("CROSS_RANK"):
        return "deepspeed"
    if any(k.startswith("RAY_") for k in env):
        return "Ray Train"
    if env.get("SLURM_PROCID") and env.get("SLURM_NTASKS"):
        return "srun"
    return "RANK/WORLD_SIZE in the environment (no launcher)"


def slurm_first_host(nodelist: str) -> str | None:
    """The first host name of a Slurm node list such as ``gpu[003-005,9],cpu1`` (what
    ``scontrol show hostnames`` prints first)."""
    nodelist = nodelist.strip()
    if not nodelist:
        return None
    match = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return None
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_tasks_as_workers(env: Mapping[str, str]) -> dict[str, str]:
    """srun with one task per GPU is a launcher: its tasks' ranks, in torchrun's names."""
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or "1"}


def detect(env: Mapping[str, str], num_processes: int = 1) -> Topology:
    """The topology for this process; ConfigError when the variables contradict each other."""
    problems: list[str] = []
    env = dict(env)
    slurm_nodes = _int(env, "SLURM_NNODES", problems) or _int(env, "SLURM_JOB_NUM_NODES", problems)
    slurm_tasks = _int(env, "SLURM_NTASKS", problems)
    if not env.get("RANK") and env.get("SLURM_PROCID") and slurm_tasks and slurm_nodes and slurm_tasks > slurm_nodes:
        env = {**env, **_slurm_tasks_as_workers(env)}
        env.setdefault("MASTER_ADDR", slurm_first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")) or "")

    if env.get("RANK", "").strip() and env.get("WORLD_SIZE", "").strip():
        rank = _int(env, "RANK", problems)
        world = _int(env, "WORLD_SIZE", problems, minimum=1)
        local_rank = _int(env, "LOCAL_RANK", problems)
        local_world = _int(env, "LOCAL_WORLD_SIZE", problems, minimum=1) or _int(env, "LOCAL_SIZE", problems, minimum=1)
        local_known = local_world is not None
        if problems:
            raise ConfigError(problems)
        assert rank is not None and world is not None
        if rank >= world:
            raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}: the launcher's variables are inconsistent")
        launcher = _launcher_name(env)
        if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise ConfigError(
                f"RANK={rank} and WORLD_SIZE={world} are set, as a launcher sets them for its workers, but "
                "MASTER_ADDR and MASTER_PORT are not: there is no rendezvous to meet the other processes at. Start "
                "through a launcher (torchrun, accelerate launch), export MASTER_ADDR and MASTER_PORT for every rank, or "
                "let the appliance launch: unset RANK and WORLD_SIZE and set NUM_NODES, NODE_RANK and MASTER_ADDR "
                "(README: More than one machine)")
        port = _int(env, "MASTER_PORT", problems) or DEFAULT_PORT
        if problems:
            raise ConfigError(problems)
        if local_world is None:  # deepspeed and srun without the name: assume one machine's worth
            local_world = world if local_rank is None else max(local_rank + 1, 1)
        return Topology(role="worker" if world > 1 else "single", source=launcher, rank=rank, world_size=world,
                        local_rank=local_rank if local_rank is not None else rank % local_world,
                        local_world_size=local_world, launcher=launcher, master_addr=env.get("MASTER_ADDR") or None,
                        master_port=port, restart=_int(env, "APPLIANCE_GROUP_START", problems) or _int(env, "TORCHELASTIC_RESTART_COUNT", problems) or 0,
                        nnodes=max(1, world // local_world), local_size_known=local_known)

    # --- this process is the launcher, or alone
    nnodes = node_rank = gpus_per_node = None
    addr = local_addr = None
    port = _int(env, "MASTER_PORT", problems)
    source = "appliance variables"
    if env.get("NUM_NODES"):
        nnodes, node_rank = _int(env, "NUM_NODES", problems, minimum=1), _int(env, "NODE_RANK", problems)
        addr = env.get("MASTER_ADDR") or env.get("PRIMARY_ADDR")
        port = port or _int(env, "PRIMARY_PORT", problems)
        local_addr = env.get("NODE_ADDR") or None
        if env.get("NUM_TRAINERS") or env.get("PRIMARY_ADDR"):
            source = "RunPod Instant Cluster"
            gpus_per_node = _int(env, "NUM_TRAINERS", problems, minimum=1)
    elif env.get("SKYPILOT_NUM_NODES"):
        source = "SkyPilot"
        nnodes, node_rank = _int(env, "SKYPILOT_NUM_NODES", problems, minimum=1), _int(env, "SKYPILOT_NODE_RANK", problems)
        ips = [ip.strip() for ip in env.get("SKYPILOT_NODE_IPS", "").splitlines() if ip.strip()]
        addr = env.get("MASTER_ADDR") or (ips[0] if ips else None)
        if node_rank is not None and node_rank < len(ips):
            local_addr = ips[node_rank]
        gpus_per_node = _int(env, "SKYPILOT_NUM_GPUS_PER_NODE", problems, minimum=1)
    elif slurm_nodes and slurm_nodes > 1:
        source = "Slurm"
        nnodes, node_rank = slurm_nodes, _int(env, "SLURM_NODEID", problems)
        addr = env.get("MASTER_ADDR") or slurm_first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        gpus_per_node = _int(env, "SLURM_GPUS_ON_NODE", problems, minimum=1)
    if problems:
        raise ConfigError(problems)
    nnodes = nnodes or 1
    if nnodes > 1:
        missing = [name for name, value in (("the node rank (NODE_RANK)", node_rank), ("MASTER_ADDR", addr))
                   if value is None]
        if missing:
            raise ConfigError(f"{nnodes} machines ({source}) but {' and '.join(missing)} not set: every machine needs "
                              "NUM_NODES, its own NODE_RANK (0 on the machine that hosts the rendezvous) and the same "
                              "MASTER_ADDR (README: More than one machine)")
        assert node_rank is not None
        if node_rank >= nnodes:
            raise ConfigError(f"NODE_RANK={node_rank} is not below NUM_NODES={nnodes} ({source})")
    per_node = num_processes if num_processes != 0 else (gpus_per_node or 0)
    role = "agent" if nnodes > 1 or per_node != 1 else "single"
    return Topology(role=role, source=source, nnodes=nnodes, node_rank=node_rank or 0, nproc_per_node=per_node,
                    master_addr=addr, master_port=port or DEFAULT_PORT, local_addr=local_addr)
