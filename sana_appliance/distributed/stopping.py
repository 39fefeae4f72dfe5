"""Stop signals: SIGTERM/SIGINT end a run quickly in every phase, with exit 143/130.

The flag is installed before the heavy imports and stays until the process ends. What a
signal does depends on the phase (README "Stopping, resuming, preemption"):

- phases with nothing to save and no clean way to abandon them (imports, downloads, model
  load, dataset scan, the Hub upload) run `immediate`: the signal ends the process at once.
  Everything they write is atomic or resumable, so nothing is left half-done;
- everywhere else the signal only records itself and the work checks the flag at fine grain
  (between training steps, per cache batch, per validation sampler step, between export
  files), raises `Abandoned`, and the run checkpoints what is unsaved and stops.

With several processes every rank must take the same decision at the same point, or one
rank waits forever in a collective the others never join. `StopVote` makes a phase in which
ranks do unequal work (rank 0 validates alone; each rank caches its own share) end with one
agreed answer, without a blocking barrier: the idle ranks keep polling, so a signal that
reaches any rank is seen by the busy ones at their next check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from ..core.errors import ExitCode, StopRequested

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Abandoned(Exception):
    """Internal: a phase stopped early because a stop was requested. Never reaches a user:
    the run turns it into StopRequested (exit 143/130) with what was saved."""


def exit_code(signum: int) -> ExitCode:
    return ExitCode.SIGINT if signum == signal.SIGINT else ExitCode.SIGTERM


class StopFlag:
    """Records the first SIGTERM/SIGINT; in an `immediate` phase it ends the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}
        self._immediate: tuple[str, str] | None = None  # (phase, what the next start does)
        self._announced = False

    def install(self) -> StopFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        if self.signum is not None and not self._announced:
            # Logged here, not in the handler: a handler that writes to a stream the signal
            # interrupted mid-write raises "reentrant call" (and logging prints a traceback).
            self._announced = True
            log.warning("received %s: stopping at the next safe point (a checkpoint is written if training "
                        "progressed since the last one)", self.name)
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def error(self, detail: str, step: int | None = None) -> StopRequested:
        return StopRequested(self.name, exit_code(self.signum or signal.SIGTERM), step, detail)

    def adopt(self, signum: int) -> None:
        """A stop another rank received: this rank stops for it, and reports the same signal and code."""
        if self.signum is None:
            self.signum = signum
            self._announced = True  # the rank that received it says so

    def check(self) -> None:
        """This process's flag only (rank-0-only work such as export); see StopVote for ranks."""
        if self.requested:
            raise Abandoned

    @contextlib.contextmanager
    def immediate(self, phase: str, after: str) -> Iterator[None]:
        """Inside: a signal ends the process at once. `after` tells the user what the next start does."""
        outer = self._immediate
        if self.requested:  # arrived just before this phase: stop instead of starting it
            raise self.error(f"before {phase}; {after}")
        self._immediate = (phase, after)
        try:
            yield
        finally:
            self._immediate = outer

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: a signal is only recorded; the work checks it (and raises Abandoned)."""
        outer, self._immediate = self._immediate, None
        try:
            yield
        finally:
            self._immediate = outer
        if outer is not None and self.requested:  # arrived after the work's last check
            self._exit_now(*outer)

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self._immediate is not None:
            self._exit_now(*self._immediate)

    def _exit_now(self, phase: str, after: str) -> None:
        # os._exit, not an exception: downloads and uploads run in thread pools that an
        # exception would wait for (minutes for a large file), and there is nothing to save.
        for stream in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # e.g. the signal interrupted a write to that stream
                stream.flush()
        # os.write, not print: the handler may have interrupted a print on this very stream.
        with contextlib.suppress(OSError):
            os.write(2, f"sana-appliance: stopped by {self.name} during {phase}; {after}\n".encode())
        os._exit(int(exit_code(self.signum or signal.SIGTERM)))


class StopVote:
    """Every rank reaches the same stop decision at the same point of a phase.

    Each `poll` is one all-reduce of (SIGTERM here, SIGINT here, work left here), so all ranks
    see the same sums; a rank that received no signal adopts the others' (same message, same
    exit code on every rank). A busy rank polls between work items (`check`); a rank whose work is done
    polls in `finish` until no rank is busy, which also makes `finish` the phase's barrier.
    Ranks therefore call all-reduce the same number of times whatever their share of work.
    """

    def __init__(self, flag: StopFlag, world: int, device) -> None:
        self.flag, self.world, self.device = flag, world, device

    def poll(self, busy: bool) -> tuple[bool, bool]:
        """(any rank asked to stop, any rank still busy)."""
        if self.world == 1:
            return self.flag.requested, busy  # no tensor, no device sync
        import torch
        import torch.distributed as dist

        signum = self.flag.signum if self.flag.requested else None
        votes = torch.tensor([float(signum == signal.SIGTERM), float(signum == signal.SIGINT), float(busy)],
                             device=self.device)
        dist.all_reduce(votes)
        sigterm, sigint, busy_any = votes.tolist()
        if sigterm or sigint:
            self.flag.adopt(signal.SIGTERM if sigterm else signal.SIGINT)
        return bool(sigterm or sigint), busy_any > 0

    def check(self) -> None:
        """Between two work items of a busy rank: raise Abandoned when any rank asked to stop."""
        if self.poll(busy=True)[0]:
            raise Abandoned

    def finish(self) -> bool:
        """After this rank's work (done or abandoned): wait for the others; True when any rank asked to stop."""
        while True:
            stop, busy = self.poll(busy=False)
            if not busy:
                return stop

    def agree(self) -> bool:
        """One vote where no rank has work left (e.g. between training steps)."""
        return self.poll(busy=False)[0]
