"""The process group of a multi-process job, as the run sees it: who is where, and which disks are shared.

`join` meets the other processes: under a torch elastic agent (the appliance's launcher,
torchrun, accelerate launch) the agent's store already holds the rendezvous; with only RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment (deepspeed, a platform) the ranks meet
at a TCP store with a deadline (`rendezvous_timeout_s`), so a rank whose peers never come fails
with a message instead of waiting forever. A process group an outside framework already
initialised (Ray Train) is used as it is.

`World` says which machine each rank is on and whether the workspace and the output folder are
shared by the machines or local to each (a probe file written by rank 0, looked for by every
rank). What depends on it:

- downloads and the built-in model: once per shared disk (rank 0 first) or once per machine
  (each machine's local rank 0 first);
- caches: the ranks sharing a disk split the work; each machine's cache is complete;
- checkpoints: written once per output disk (rank 0, or each machine's local rank 0), so every
  machine can resume; a machine without the chosen checkpoint receives it over the group.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..core.errors import ApplianceError, ConfigError, DataError, PeerError, PeersLost
from ..core.topology import Topology

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a checkpoint of the real model on a slow disk, while the others wait
PROBE = ".sana-appliance-probe-"
CHUNK = 64 << 20  # bytes per broadcast when a checkpoint is sent to a machine that lacks it


def join(topology: Topology, use_cuda: bool, timeout_s: float) -> None:
    """Initialise torch.distributed for this worker (no-op when already done or alone)."""
    import torch
    import torch.distributed as dist

    if topology.role != "worker" or dist.is_initialized():
        return
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(topology.local_rank)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent's store is up: rendezvous is done
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        return
    where = f"{topology.master_addr}:{topology.master_port}"
    try:
        _meet(topology, timeout_s, where, backend)
    except PeersLost as exc:
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            # The launchers did meet; their workers cannot reach rank 0: the network between the machines, not a
            # moment's absence. A restart would wait the same way, so this ends the job (exit 2).
            raise ConfigError(f"{exc.message}. The launchers met at their rendezvous, so the machines reach each "
                              "other there but not on the port rank 0's process opened: allow TCP between the "
                              "machines on all ports, or set NODE_ADDR on each machine to an address the others "
                              "reach") from None
        raise


def _meet(topology: Topology, timeout_s: float, where: str, backend: str) -> None:
    import torch.distributed as dist

    if topology.rank != 0:
        _wait_until_reachable(topology, timeout_s, where)
    try:
        store = dist.TCPStore(topology.master_addr, topology.master_port, topology.world_size,
                              is_master=topology.rank == 0, timeout=timedelta(seconds=timeout_s), wait_for_workers=True)
    except Exception as exc:  # DistStoreError / DistNetworkError / RuntimeError, by torch version
        role = ("waited for the other ranks to connect" if topology.rank == 0
                else "could not reach rank 0's rendezvous")
        raise PeersLost(
            f"rank {topology.rank} of {topology.world_size} (started by {topology.launcher}) {role} at {where} "
            f"for {timeout_s:.0f} s ({type(exc).__name__}: {_first_line(exc)}). Start every rank with the same "
            "MASTER_ADDR/MASTER_PORT, reachable from all of them, or start through a launcher (torchrun); "
            "rendezvous_timeout_s sets the wait") from None
    dist.init_process_group(backend, store=store, rank=topology.rank, world_size=topology.world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def _wait_until_reachable(topology: Topology, timeout_s: float, where: str) -> None:
    """Rank 0's rendezvous port accepts connections within `timeout_s`, or PeersLost (one plain line: torch's own
    store client would print a C++ backtrace at each failed try)."""
    import time

    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            with socket.create_connection((topology.master_addr, topology.master_port), timeout=2.0):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise PeersLost(
                f"rank {topology.rank} of {topology.world_size} (started by {topology.launcher}) could not reach rank "
                f"0's rendezvous at {where} for {timeout_s:.0f} s ({last.strerror or last}). Start every rank with the "
                "same MASTER_ADDR/MASTER_PORT, reachable from all of them, or start through a launcher (torchrun); "
                "rendezvous_timeout_s sets the wait")
        time.sleep(0.5)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no detail"


def is_peer_failure(exc: BaseException) -> bool:
    """An error of the process group itself: a peer died or the connection broke (not a bug of the run)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("Gloo", "gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe", "ProcessGroup", "Socket Timeout"))


@dataclass
class World:
    """This rank's place in the job; a single process is a World of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: int = 0  # index of this rank's machine (0..nodes-1)
    nodes: int = 1
    shared_workspace: bool = True  # the machines see one workspace (always true on one machine)
    shared_output: bool = True  # likewise for output_dir
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def data_share(self) -> tuple[int, int]:
        """(index, count) of this rank among the ranks that fill one cache disk."""
        return (self.rank, self.size) if self.shared_workspace else (self.local_rank, self.local_size)

    @property
    def fetches(self) -> bool:
        """This rank downloads and builds for its disk (the others wait, then find it there)."""
        return self.is_main if self.shared_workspace else self.is_local_main

    @property
    def writes_checkpoints(self) -> bool:
        return self.is_main if self.shared_output else self.is_local_main

    @property
    def disk_of_output(self) -> int:
        """Which output disk this rank writes to: one for the job when shared, else its machine's."""
        return 0 if self.shared_output else self.node

    def summary(self) -> dict:
        return {"world_size": self.size, "nodes": self.nodes, "processes_per_node": self.local_size,
                "launcher": self.launcher, "workspace_disk": "shared" if self.shared_workspace else "node-local",
                "output_disk": "shared" if self.shared_output else "node-local"}

    # ------------------------------------------------------------ collectives

    def gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, work):
        """Run `work()` on this rank; when it raises on any rank, every rank raises: the failing one its own error,
        the others one with its exit code (7 for a crash) and message, instead of waiting in the next collective.
        `work` must not itself communicate with the other ranks."""
        try:
            result, failure = work(), None
        except Exception as exc:  # noqa: BLE001 - every rank must hear of any failure, then it is raised as it was
            result, failure = None, exc
        if self.size == 1:
            if failure is not None:
                raise failure
            return result
        if failure is None:
            mine = None
        elif isinstance(failure, ApplianceError):
            mine = (self.rank, self.node, int(failure.exit_code), failure.message)
        else:  # a crash: the others stop as having lost a peer; the launcher restarts the group
            mine = (self.rank, self.node, int(PeersLost.exit_code), f"{type(failure).__name__}: {failure}")
        seen = self.gather(mine)
        failed = [f for f in seen if f is not None]
        if failure is not None:
            raise failure
        if failed:
            rank, node, code, message = failed[0]
            raise PeerError(f"rank {rank} (machine {node}) stopped: {message}", code)
        return result

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def fetchers_first(self) -> Iterator[None]:
        """The body runs on the fetching rank of each disk first, then on the others (who find its work there)."""
        if not self.fetches:
            self.barrier()
        try:
            yield
        finally:
            if self.fetches:
                self.barrier()

    # ------------------------------------------------------------ checkpoints across machines

    def send_folder(self, src: int, folder: Path, receivers: set[int], root: Path) -> None:
        """Copy `folder` from rank `src` to the same place under `root` on every rank in `receivers` (each a
        machine's checkpoint writer). It is written into a temp folder and renamed, so it is whole or absent; a
        folder of that name already there (an interrupted save, without its marker) is moved aside first. A
        receiver that cannot write (a full disk) keeps taking part until the end, then every rank raises DataError."""
        import shutil

        listing = None
        if self.rank == src:
            listing = [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]
        listing = self.broadcast(listing, src)
        receiving = self.rank in receivers
        tmp = folder.with_name(folder.name + ".receiving")
        problem = None
        if receiving:
            try:
                for stale in root.glob("*.receiving"):  # an earlier transfer that was cut off
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
                need, free = sum(size for _, size in listing), shutil.disk_usage(root).free
                if free < need * 1.05:
                    problem = f"{free / 2**30:.2f} GiB free in {root}, the checkpoint needs {need / 2**30:.2f} GiB"
            except OSError as exc:
                problem = f"{tmp}: {exc.strerror or exc}"
        for rel, _size in listing:
            problem = self._stream(src, folder / rel, tmp / rel if receiving else None, problem)
        if receiving and problem is None:
            try:
                if folder.exists():
                    aside = folder.with_name(f"{folder.name}.incomplete-{uuid.uuid4().hex[:6]}")
                    os.replace(folder, aside)
                    log.warning("%s had no complete checkpoint (an interrupted save): moved to %s", folder, aside.name)
                os.replace(tmp, folder)
            except OSError as exc:
                problem = f"{folder}: {exc.strerror or exc}"
        if receiving and problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        problems = [p for p in self.gather(problem) if p]
        if problems:
            raise DataError(f"the checkpoint could not be copied to every machine ({'; '.join(problems)}): free space "
                            "or fix the checkpoints folder on that machine, then start again")

    def _stream(self, src: int, source: Path, dest: Path | None, problem: str | None) -> str | None:
        """Send the file `source` of rank `src` in chunks to every rank; a rank with a `dest` (and no earlier
        `problem`) writes it there and fsyncs it. Every rank takes part to the end, also after a write failed.
        Returns the problem (the first one) of this rank."""
        handle = open(source, "rb") if self.rank == src else None  # noqa: SIM115
        out = None
        if dest is not None and problem is None:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                out = open(dest, "wb")  # noqa: SIM115
            except OSError as exc:
                problem = f"{dest}: {exc.strerror or exc}"
        try:
            while True:
                chunk = handle.read(CHUNK) if handle is not None else None
                chunk = self.broadcast(chunk, src)
                if not chunk:
                    break
                if out is not None and problem is None:
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        problem = f"{dest}: {exc.strerror or exc}"
        finally:
            if handle is not None:
                handle.close()
            if out is not None:
                with contextlib.suppress(OSError):
                    out.flush()
                    os.fsync(out.fileno())
                out.close()
        return problem

    def share_files(self, folder: Path) -> None:
        """Make `folder` on every output disk hold every file any checkpoint writer's copy holds (a sharded
        checkpoint on node-local disks: each machine wrote its own ranks' shards). Files a writer lacks are sent
        from the lowest rank that has them; a receiver that cannot write makes every rank raise DataError."""
        mine = None
        if self.writes_checkpoints:
            mine = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        seen = self.gather(mine)
        writers = {rank: set(files) for rank, files in enumerate(seen) if files is not None}
        problem = None
        for rel in sorted(set().union(*writers.values())):
            src = min(rank for rank, files in writers.items() if rel in files)
            if all(rel in files for files in writers.values()):
                continue
            receiving = self.writes_checkpoints and rel not in writers[self.rank]
            problem = self._stream(src, folder / rel, folder / rel if receiving else None, problem)
        problems = [p for p in self.gather(problem) if p]
        if problems:
            raise DataError(f"the sharded checkpoint could not be copied to every machine ({'; '.join(problems)}): "
                            "free space in output_dir on that machine, then start again (the previous checkpoint is "
                            "intact)")

def describe(topology: Topology, data_folders: list[Path], output_dir: Path) -> World:
    """The World of this process: machines from the launcher's variables (or the host names), disks probed.
    The workspace counts as shared only when every folder of `data_folders` (the workspace, HF_HOME, the caches)
    is shared."""
    if topology.role != "worker":
        return World()
    world = World(rank=topology.rank, size=topology.world_size, local_rank=topology.local_rank,
                  local_size=topology.local_world_size, launcher=topology.launcher or "unknown")
    # Which machine: torch elastic's group rank when there is one, else the host name.
    group_rank = os.environ.get("GROUP_RANK")
    key = f"group-{group_rank}" if group_rank and group_rank.isdigit() else f"host-{socket.gethostname()}"
    keys = world.gather(key)
    order = list(dict.fromkeys(keys))
    world.node, world.nodes = order.index(key), len(order)
    if not topology.local_size_known:  # the launcher did not say: count this machine's ranks
        mine = [rank for rank, k in enumerate(keys) if k == key]
        world.local_rank, world.local_size = mine.index(world.rank), len(mine)
    if world.nodes > 1:
        folders = list(dict.fromkeys(data_folders))
        count = min(world.gather(len(folders)))  # every rank probes the same number of folders
        world.shared_workspace = all([_shared(world, folder) for folder in folders[:count]])
        world.shared_output = _shared(world, output_dir)
    return world


def _shared(world: World, folder: Path) -> bool:
    """True when every rank sees the probe file rank 0 wrote into `folder` (one disk for all machines)."""
    token = world.broadcast(uuid.uuid4().hex if world.is_main else None)
    probe = folder / f"{PROBE}{token}"
    wrote = False
    if world.is_main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text(hashlib.sha256(token.encode()).hexdigest())
            wrote = True
        except OSError:  # a read-only workspace: treat it as each machine's own
            pass
    wrote = world.broadcast(wrote)
    world.barrier()
    seen = world.gather(wrote and probe.is_file())
    world.barrier()
    if world.is_main and wrote:
        with contextlib.suppress(OSError):
            probe.unlink()
    return all(seen)
