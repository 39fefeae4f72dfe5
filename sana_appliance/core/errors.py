"""Typed user-facing errors and the documented process exit codes.

User errors are exceptions carrying an exit code; the CLI turns them into a
message and that code. ``assert`` stays for programmer mistakes.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    CONFIG = 2  # the configuration is invalid
    ASSET = 3  # a model or dataset could not be fetched (auth, 404, network)
    DATA = 4  # the dataset is unusable, or the disk cannot hold the run
    DIVERGED = 5  # training produced non-finite values too many steps in a row
    UNSENT = 6  # training finished, every output is local, but uploads to the Hub did not all complete
    PEERS = 7  # a multi-process job lost a process or never met (rendezvous); restarted up to max_restarts first
    SIGINT = 130  # stopped by SIGINT (after saving a checkpoint when training progressed)
    SIGTERM = 143  # stopped by SIGTERM (likewise)


class ApplianceError(Exception):
    """Base class: an error a user can fix, with the exit code it maps to."""

    exit_code: ExitCode = ExitCode.CONFIG

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(ApplianceError):
    """One or more configuration problems, reported together."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        head = "configuration error" if count == 1 else f"{count} configuration errors"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}:\n{body}")


class AssetError(ApplianceError):
    """A model, dataset or other remote asset could not be obtained."""

    exit_code = ExitCode.ASSET


class DataError(ApplianceError):
    """The training data (or the disk that holds outputs) cannot support the run."""

    exit_code = ExitCode.DATA


class DivergedError(ApplianceError):
    """Training produced non-finite loss or gradients too many steps in a row."""

    exit_code = ExitCode.DIVERGED


class UploadsUnsent(ApplianceError):
    """The run finished, but the Hub did not receive everything queued for it (hub/upload.py)."""

    exit_code = ExitCode.UNSENT


class PeersLost(ApplianceError):
    """The processes of a multi-process job could not meet, or one of them is gone (core/topology.py,
    distributed/group.py): the launcher restarts the group; alone, the job exits 7."""

    exit_code = ExitCode.PEERS


class PeerError(ApplianceError):
    """An error another rank of the job hit (distributed/group.py `World.agree`): every rank stops with its exit code."""

    def __init__(self, message: str, exit_code: int):
        self.exit_code = ExitCode(exit_code)
        super().__init__(message)


class StopRequested(ApplianceError):
    """A stop signal arrived; `detail` says in which phase and what was saved (distributed/stopping.py)."""

    def __init__(self, signal_name: str, exit_code: ExitCode, step: int | None, detail: str):
        self.exit_code = exit_code
        self.step = step
        super().__init__(f"stopped by {signal_name} {detail}")
