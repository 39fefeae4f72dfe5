"""The appliance's launcher: torch's elastic agent, on one machine or many.

Users set `num_processes` (0 = one per visible GPU) and, for several machines, `NUM_NODES`,
`NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT` (or their platform sets the equivalents:
core/topology.py). This process then becomes a torch elastic agent (the engine behind
`torchrun`): the machines meet in a c10d rendezvous (`rendezvous_timeout_s`), every agent starts
its workers (`python -m sana_appliance` with RANK, LOCAL_RANK, WORLD_SIZE, ... set), and a worker that
crashes or is killed makes the whole group restart from the last checkpoint, up to `max_restarts`
times. A worker that exits with an appliance code (a stop, a config, asset, data or upload error)
is not restarted: doing it again would end the same way.

Signals: SIGTERM/SIGINT to the agent reach every worker (they checkpoint together and exit
143/130), and the agent waits `grace_s` for them. The job exits with the documented code (0,
2-7, 130, 143). If the agent itself is killed (kill -9), its workers die with it
(`bind_to_parent`, run by each worker first thing).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import ExitCode
from ..core.topology import Topology

log = logging.getLogger(__name__)

# Exit codes a restart would only repeat: a stop, or an error that names a fix.
DELIBERATE = frozenset({int(ExitCode.CONFIG), int(ExitCode.ASSET), int(ExitCode.DATA), int(ExitCode.DIVERGED),
                        int(ExitCode.UNSENT), int(ExitCode.SIGINT), int(ExitCode.SIGTERM)})
PR_SET_PDEATHSIG = 1
FREE_RESTARTS = 10  # restarts after only losing a peer (exit 7) that do not count against max_restarts


def process_count(setting: int, visible_gpus: int | None = None) -> int:
    """Processes for `num_processes`: the setting, or for 0 one per visible GPU (at least one).
    `visible_gpus` defaults to torch's count (CUDA_VISIBLE_DEVICES applies)."""
    if setting != 0:
        return setting
    if visible_gpus is None:
        import torch

        visible_gpus = torch.cuda.device_count()
    return max(1, visible_gpus)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_to_parent() -> None:
    """In a worker of the appliance's launcher: die when the launcher dies, even by kill -9 (Linux
    PR_SET_PDEATHSIG), so no orphan keeps training and writing beside a restarted job."""
    parent = os.environ.get("APPLIANCE_LAUNCHER_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the launcher died before the line above
        os._exit(int(ExitCode.SIGTERM))


def job_exit_code(codes: Sequence[int]) -> int:
    """One code for the job from its processes' codes: an appliance code first (2-6, 130, 143); a process that
    crashed, was killed or lost its peers (with no restart left) makes it 7."""
    codes = [128 - c if c in (-signal.SIGTERM, -signal.SIGINT) else c for c in codes]
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    meaningful = [c for c in failed if c in DELIBERATE]
    return meaningful[0] if meaningful else int(ExitCode.PEERS)


def _deliberate(codes: Sequence[int]) -> bool:
    """A group ended on purpose: some process exited with an appliance code (a stop or an error that names its fix)
    and the others only followed it (they stopped too, or lost it as a peer)."""
    codes = [128 - c if c in (-signal.SIGTERM, -signal.SIGINT) else c for c in codes]
    followers = {0, int(ExitCode.PEERS), int(ExitCode.SIGTERM), int(ExitCode.SIGINT)}
    return any(c in DELIBERATE for c in codes) and all(c in DELIBERATE or c in followers for c in codes)


def _agent_class(multi_node: bool):
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class ApplianceAgent(LocalElasticAgent):
        """torch's local agent, except that a deliberate exit (DELIBERATE) is final: no restart."""

        free_restarts = FREE_RESTARTS if multi_node else 0
        starts = 0

        def _start_workers(self, worker_group):
            # Every start after the first is a restart of the job's group, whatever made the agent restart it
            # (its own worker's crash or another machine's): the workers then resume instead of starting over.
            os.environ["APPLIANCE_GROUP_START"] = str(self.starts)
            self.starts += 1
            return super()._start_workers(worker_group)

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.is_failed() and result.failures:
                codes = [f.exitcode for f in result.failures.values()]
                if _deliberate(codes):
                    self._remaining_restarts = 0
                    return result
                if all(code == ExitCode.PEERS for code in codes) and self.free_restarts > 0:
                    # These workers only lost a peer: the machine whose worker crashed counts the restart.
                    self.free_restarts -= 1
                    self._remaining_restarts += 1
                if self._remaining_restarts > 0:
                    log.warning("a training process ended with exit code %s: restarting the group from the last "
                                "checkpoint (%d restart(s) left of max_restarts=%d)", ", ".join(map(str, codes)),
                                self._remaining_restarts, worker_group.spec.max_restarts)
            return result

    return ApplianceAgent


def launch(topology: Topology, count: int, argv: Sequence[str], *, grace_s: float, max_restarts: int,
           rendezvous_timeout_s: float, exit_wait_s: float = 300.0, run_id: str | None = None) -> int:
    """Run `python -m sana_appliance ARGV` as this machine's `count` workers of the job; return the job's exit code."""
    from torch.distributed.elastic.agent.server import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    for name in ("torch.distributed.elastic", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if topology.multi_node:
        endpoint = f"{topology.master_addr}:{topology.master_port}"
        local_addr = topology.local_addr or (topology.master_addr if topology.node_rank == 0 else None)
        # The same run id on every machine: the rendezvous is keyed by it (and by the endpoint).
        run_id = run_id or os.environ.get("APPLIANCE_RUN_ID") or f"sana-{topology.master_addr}-{topology.master_port}"
    else:
        endpoint, local_addr, run_id = f"127.0.0.1:{_free_port()}", "127.0.0.1", run_id or f"sana-{uuid.uuid4().hex[:12]}"
    os.environ["APPLIANCE_LAUNCHER_PID"] = str(os.getpid())  # the workers inherit it (bind_to_parent)
    # The workers import the very package this launcher runs (a source checkout, not some other installed copy).
    here = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    # SIGHUP/SIGQUIT (a closed terminal, some schedulers) stop the job like SIGTERM: checkpoint, then 143.
    for sig in (signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT"
    # Each round's workers meet at a fresh store on rank 0 (group.join): the agent's shared store keeps the
    # previous round's keys, and a restarted group would read its dead peers' addresses from it.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    params = RendezvousParameters(backend="c10d", endpoint=endpoint, run_id=run_id, min_nodes=topology.nnodes,
                                  max_nodes=topology.nnodes, local_addr=local_addr,
                                  join_timeout=int(rendezvous_timeout_s), read_timeout=int(rendezvous_timeout_s),
                                  is_host=topology.node_rank == 0)
    try:
        handler = rdzv_registry.get_rendezvous_handler(params)
    except Exception as exc:  # e.g. this machine hosts the rendezvous and MASTER_PORT is taken
        log.error("cannot open the rendezvous at %s (%s: %s): check MASTER_ADDR/MASTER_PORT on machine %d",
                  endpoint, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", topology.node_rank)
        return int(ExitCode.PEERS)
    spec = WorkerSpec(role="trainer", local_world_size=count, entrypoint=sys.executable,
                      args=("-m", "sana_appliance", *argv), rdzv_handler=handler, max_restarts=max_restarts,
                      monitor_interval=0.5, local_addr=local_addr)
    # At the end the other machines' agents wait for rank 0's (export, then up to hub_upload_wait_s of uploads).
    agent = _agent_class(topology.multi_node)(spec=spec, logs_specs=DefaultLogsSpecs(), start_method="spawn",
                                              exit_barrier_timeout=exit_wait_s, shutdown_timeout=int(grace_s))
    log.info("launching %d training process(es) on %s", count, topology.describe())
    closed = True
    try:
        result = agent.run()
    except SignalException as exc:
        closed = False  # a stopped agent leaves the rendezvous open: the restarted job joins it again
        return 128 + int(exc.sigval)
    except Exception as exc:  # rendezvous timeout or closed, store unreachable
        if type(exc).__name__ == "RendezvousClosedError":
            log.error("the job's rendezvous at %s was closed: another machine's launcher ended the job (its log says "
                      "why)", endpoint)
            return int(ExitCode.PEERS)
        log.error("the machines did not meet: %s: %s. Every machine needs the same NUM_NODES and MASTER_ADDR:"
                  "MASTER_PORT, reachable from the others; rendezvous_timeout_s=%d", type(exc).__name__,
                  str(exc).splitlines()[0][:300] if str(exc) else "", int(rendezvous_timeout_s))
        return int(ExitCode.PEERS)
    finally:
        if closed:
            with contextlib.suppress(Exception):
                handler.shutdown()
    if result is None:  # the rendezvous was closed for good (another machine's agent gave up)
        log.error("the job's rendezvous at %s was closed by another machine: see that machine's log", endpoint)
        return int(ExitCode.PEERS)
    if result.is_failed():
        return job_exit_code([f.exitcode for f in result.failures.values()])
    return 0
