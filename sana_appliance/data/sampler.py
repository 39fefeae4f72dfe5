"""Bucketed, deterministic, resumable batch sampler over a DataPlan.

Epoch semantics (SimpleTuner's): in one epoch every dataset's images appear
``repeats + 1`` times. ``probability`` is a dataset's weight when the next batch
is drawn: it decides how datasets interleave, and a dataset whose batches are
used up leaves the draw until the epoch ends.

How one epoch's order is built, from ``(seed, epoch)`` alone:

1. Group sample indices by (dataset, bucket size). Each group becomes
   ``repeats + 1`` independent permutations laid end to end (so one image rarely
   appears twice in a batch), padded with the start of a further permutation to
   a whole number of *global* batches (``batch_size x num_replicas``). Padding,
   not dropping: an image in a small bucket is still trained every epoch.
2. Each dataset's global batches are shuffled; datasets are interleaved by a
   weighted draw over those that still have batches.
3. Rank ``r`` takes positions ``[r*batch_size, (r+1)*batch_size)`` of each global
   batch, so ranks always work on the same bucket and never on the same slot.

The epoch length does not depend on the shuffle, so a single counter (global
batches done) is the exact position: ``state_dict`` saves it and a resumed
sampler continues the same sequence. Iteration is infinite (epoch after epoch);
``len()`` is the number of batches per epoch and ``epoch`` the current one.

With a prefetching DataLoader the sampler runs ahead of training: save
``state_dict(batches_consumed=n)`` with the number of batches the loop has
actually used (counted from the start of the run), not the sampler's own count.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator

import numpy as np

from .plan import DataPlan

log = logging.getLogger(__name__)
STATE_VERSION = 1


class BucketBatchSampler:
    """Yields lists of indices into ``plan.samples``; every batch from one bucket (same size)."""

    def __init__(self, plan: DataPlan, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size} num_replicas={num_replicas} rank={rank}")
        if not plan.samples:
            raise ValueError("the plan has no samples")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.global_batch_size = batch_size * num_replicas
        self._fingerprint = plan.fingerprint()
        backend_order = {b.id: i for i, b in enumerate(plan.backends)}
        grouped: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for index, sample in enumerate(plan.samples):
            grouped[(backend_order[sample.backend_id], tuple(sample.size))].append(index)
        # (backend index, size, indices, passes per epoch), in a fixed order.
        self._groups = [
            (bi, size, np.asarray(indices, dtype=np.int64), plan.backends[bi].repeats + 1)
            for (bi, size), indices in sorted(grouped.items())
        ]
        self._weights = [b.probability for b in plan.backends]
        self._num_backends = len(plan.backends)
        self.batches_per_epoch = sum(
            math.ceil(len(idx) * passes / self.global_batch_size) for _, _, idx, passes in self._groups
        )
        self._position = 0  # global batches yielded since the start of the run
        self._cached: tuple[int, list[np.ndarray]] | None = None

    # ------------------------------------------------------------ order

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**63, *tags])

    def epoch_order(self, epoch: int) -> list[np.ndarray]:
        """All global batches of one epoch (each ``global_batch_size`` indices), in order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        per_backend: list[list[np.ndarray]] = [[] for _ in range(self._num_backends)]
        g = self.global_batch_size
        for gi, (bi, _size, indices, passes) in enumerate(self._groups):
            rng = self._rng(epoch, 1, gi)
            total = len(indices) * passes
            padded = math.ceil(total / g) * g
            runs = [rng.permutation(indices) for _ in range(math.ceil(padded / len(indices)))]
            seq = np.concatenate(runs)[:padded]
            per_backend[bi].extend(seq.reshape(-1, g))
        for bi, batches in enumerate(per_backend):
            perm = self._rng(epoch, 2, bi).permutation(len(batches))
            per_backend[bi] = [batches[i] for i in perm]
        order: list[np.ndarray] = []
        cursor = [0] * self._num_backends
        remaining = [len(b) for b in per_backend]
        draw = self._rng(epoch, 3)
        while len(order) < self.batches_per_epoch:
            live = [bi for bi in range(self._num_backends) if remaining[bi]]
            weights = np.asarray([self._weights[bi] for bi in live], dtype=np.float64)
            cumulative = np.cumsum(weights)
            slot = int(np.searchsorted(cumulative, draw.random() * cumulative[-1], side="right"))
            pick = live[min(slot, len(live) - 1)]
            order.append(per_backend[pick][cursor[pick]])
            cursor[pick] += 1
            remaining[pick] -= 1
        self._cached = (epoch, order)
        return order

    # ------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._position // self.batches_per_epoch

    @property
    def batches_done(self) -> int:
        return self._position

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while True:
            epoch, offset = divmod(self._position, self.batches_per_epoch)
            batch = self.epoch_order(epoch)[offset]
            self._position += 1
            yield [int(i) for i in batch[lo:hi]]

    # ------------------------------------------------------------ resume

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """The exact position; pass ``batches_consumed`` when a DataLoader prefetches ahead."""
        done = self._position if batches_consumed is None else int(batches_consumed)
        return {
            "version": STATE_VERSION,
            "batches_done": done,
            "epoch": done // self.batches_per_epoch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "plan_fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off: exactly, when data, seed and batch layout match.

        If they differ (other GPU count, batch size, seed or data), the exact
        sequence no longer exists: we keep the epoch number and the fraction of
        it already done, and log which values changed.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
        done = int(state["batches_done"])
        same = (
            state["seed"] == self.seed
            and state["global_batch_size"] == self.global_batch_size
            and state["batches_per_epoch"] == self.batches_per_epoch
            and state["plan_fingerprint"] == self._fingerprint
        )
        if same:
            self._position = done
            return
        changed = [
            key for key, now in (
                ("seed", self.seed), ("global_batch_size", self.global_batch_size),
                ("batches_per_epoch", self.batches_per_epoch), ("plan_fingerprint", self._fingerprint),
            ) if state[key] != now
        ]
        epoch, offset = divmod(done, int(state["batches_per_epoch"]))
        fraction = offset / int(state["batches_per_epoch"])
        self._position = epoch * self.batches_per_epoch + int(fraction * self.batches_per_epoch)
        log.warning(
            "data order: the checkpoint's %s differ from this run, so its exact batch sequence cannot continue; "
            "resuming at epoch %d, %.0f%% through it, with this run's order (the current values win)",
            ", ".join(changed), epoch, 100 * fraction,
        )
