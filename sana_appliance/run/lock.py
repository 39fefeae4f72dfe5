"""One run per output folder: an exclusive advisory lock held for the whole run.

`flock` locks belong to the open file, so the kernel drops them when the holder dies in
any way (kill -9 included): there is never a stale lock to clean up. The file's contents
(pid, host, start time) only serve the message a second run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..core.errors import ConfigError

LOCK_NAME = ".sana-appliance.lock"


class OutputLock:
    def __init__(self, fd: int, path: Path):
        self._fd, self.path = fd, path

    @property
    def fd(self) -> int:
        """The open lock file; a child that inherits it keeps the lock held while it lives."""
        return self._fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = -1


def lock_name(node: int = 0) -> str:
    """Machine 0 (and a job on one machine) holds LOCK_NAME; machine k of a multi-machine job sharing the
    output folder holds its own, so the machines of one job do not lock each other out."""
    return LOCK_NAME if node == 0 else f".sana-appliance.node{node}.lock"


def acquire(output_dir: Path, node: int = 0) -> OutputLock:
    """Lock `output_dir` for this process (machine `node` of its job), or raise ConfigError naming the run
    that holds it."""
    path = output_dir / lock_name(node)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"output_dir={str(output_dir)!r}: cannot create {LOCK_NAME} there ({exc.strerror}); "
                          "make the folder writable by this user or choose another output_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(
            f"output_dir={str(output_dir)!r} is in use by another run ({holder}). Two runs on one output folder "
            "would overwrite each other's checkpoints: wait for that run to finish, stop it, or set another "
            "output_dir (env OUTPUT_DIR)") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
    return OutputLock(fd, path)


def _read_holder(fd: int) -> str:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {doc['pid']} on host {doc['host']}, started {doc['started_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has only just started"
