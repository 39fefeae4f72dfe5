"""One process per device: the appliance launches its own data-parallel workers.

Users set `num_processes` (0 = one per visible GPU); no `accelerate launch` or `torchrun`
line to get right inside a container. The launcher starts N copies of the same command
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set (accelerate picks them
up: NCCL on GPUs, gloo on CPU), forwards SIGTERM/SIGINT to every worker so all ranks save
and stop together, and exits with the workers' code (0, 2-5, 130, 143).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)


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


def launch(count: int, argv: Sequence[str], env: dict[str, str], inherit_fds: Sequence[int] = (),
           grace_s: float = 60.0) -> int:
    """Run `python -m sana_appliance ARGV` `count` times as one job; return the job's exit code.

    ``inherit_fds`` (the output folder's lock) stay open in every worker: the lock then holds
    until the last process of the job is gone, even if the launcher itself is killed. When one worker
    fails or stops, the others get ``grace_s`` to finish (rank 0 may be saving and uploading) before they
    are killed."""
    port = str(_free_port())
    workers = []
    for rank in range(count):
        worker_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(count),
                      "LOCAL_WORLD_SIZE": str(count), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                      "APPLIANCE_LAUNCHER_PID": str(os.getpid())}
        workers.append(subprocess.Popen([sys.executable, "-m", "sana_appliance", *argv], env=worker_env,
                                        pass_fds=tuple(inherit_fds)))
    log.info("launched %d training processes", count)

    def forward(signum, _frame):
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes: list[int | None] = [None] * count
        while any(c is None for c in codes):
            for i, w in enumerate(workers):
                if codes[i] is None and w.poll() is not None:
                    codes[i] = w.returncode
                    if codes[i] != 0:
                        # A worker failed: give the others time to notice, then stop them.
                        deadline = time.monotonic() + grace_s
                        for other in workers:
                            while other.poll() is None and time.monotonic() < deadline:
                                time.sleep(0.2)
                            if other.poll() is None:
                                other.kill()
            time.sleep(0.2)
        codes = [w.wait() for w in workers]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A worker the signal reached before its handler was installed (during interpreter start)
    # dies of it: the job was still stopped by that signal, and says so (128 + signal number).
    codes = [128 - c if c in (-signal.SIGTERM, -signal.SIGINT) else c for c in codes]
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    # Prefer an appliance code (2-6, 130, 143) over a crash code (1, negative signals).
    meaningful = [c for c in failed if c in (2, 3, 4, 5, 6, 130, 143)]
    return meaningful[0] if meaningful else (failed[0] if failed[0] > 0 else 1)


