"""Engine overhead: steps/s of the real training loop vs a bare loop on the same model and data.

    python -m sana_appliance.benchmarks.engine                 # demo preset, 8 rounds x 10 timed steps
    python -m sana_appliance.benchmarks.engine --quick         # 1 round of 4 steps (smoke test)

The engine side is ``sana_appliance.run.train.Run`` on the demo preset, driven in-process in
a temporary WORKSPACE (or --workspace) with validation and periodic checkpoints off.
``Run.setup()`` fills the caches before anything is timed; a step's time is the interval
between two consecutive per-step tracker calls (logging_steps=1), so the held-out eval
loss and DataLoader start at the top of ``Run.train()`` are never inside a timed step.

The bare side is what a person writes to time a model: the same tiny transformer loaded
from the same folder, the same optimizer (optimizers.build_optimizer on the same config),
the same cached batches already collated in memory, and per step only sigmas + noise,
forward, MSE, backward, optimizer step, zero_grad. No sampler, DataLoader or tracker.

Between the two (unless --no-breakdown), the engine's extra work is added one piece at a
time (clip + LR schedule + EMA; then reading each batch from the cache through the
DataLoader), so an overhead is attributed to a cause rather than guessed at.

Variants run in interleaved short segments (round-robin, order rotated every round; the
first round is warm-up) and are compared by their fast-quartile step (see main): on a shared machine the
load changes within seconds, and this gives every variant the same share of it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import write_json

BARE = "bare loop (preloaded batches)"
ENGINE = "engine (Run.train)"


class StepClock:
    """Wraps the run's tracker; records when each step's metrics arrive (once per step)."""

    def __init__(self, inner):
        self.inner = inner
        self.run_id = inner.run_id
        self.times: dict[int, float] = {}

    def log(self, step: int, metrics: dict) -> None:
        if "loss" in metrics:
            self.times[step] = time.perf_counter()
        self.inner.log(step, metrics)

    def log_images(self, step: int, images: dict) -> None:
        self.inner.log_images(step, images)

    def close(self) -> None:
        self.inner.close()


def build_run(workspace: Path, total_steps: int, workers: int):
    """A demo-preset Run with caches filled, validation and periodic checkpoints disabled."""
    from ..config.resolve import CliArgs, resolve
    from ..distributed.stopping import StopFlag
    from ..run.train import Run

    workspace.mkdir(parents=True, exist_ok=True)
    output = tempfile.mkdtemp(prefix="out-", dir=workspace)  # fresh: a reused workspace must not resume
    env = {
        "WORKSPACE": str(workspace), "OUTPUT_DIR": output, "PRESET": "demo", "HF_HUB_OFFLINE": "1",
        "SANA_MAX_TRAIN_STEPS": str(total_steps),
        # The loop saves when step % checkpointing_steps == 0 and step < max_steps: never, here.
        "SANA_CHECKPOINTING_STEPS": str(total_steps), "SANA_VALIDATION_STEPS": "0",
        "SANA_DATALOADER_NUM_WORKERS": str(workers), "SANA_LOGGING_STEPS": "1",
    }
    run = Run(resolve(env, CliArgs()), StopFlag())  # not installed: a benchmark has no stop to honour
    run.setup()
    return run


def engine_segment(run, steps: int) -> list[float]:
    """Run `steps` more steps of Run.train(); the durations between consecutive step ends.

    Run.train() continues from run.step (same sampler position, generator, optimizer), so
    calling it again with a higher max_steps extends the same run. Its start (held-out eval
    loss, DataLoader creation) falls before the first step's end and is never timed."""
    clock = StepClock(run.tracker)
    run.tracker = clock
    run.max_steps = run.step + steps
    try:
        run.train()
    finally:
        run.tracker = clock.inner
    ends = [clock.times[s] for s in sorted(clock.times)]
    return [b - a for a, b in zip(ends, ends[1:])]


def cached_batches(run, count: int) -> list[dict]:
    """`count` collated batches in the engine's own sampler order, read from its caches now."""
    from ..data.precompute import CachedDataset
    from ..data.sampler import BucketBatchSampler

    dataset = CachedDataset(run.plan.samples, run.caches.latent_keys, run.caches.latent_caches, run.caches.text_cache, False)
    sampler = BucketBatchSampler(run.plan, run.cfg.train_batch_size, run.cfg.seed)
    batches, it = [], iter(sampler)
    for _ in range(count):
        batches.append(torch.utils.data.default_collate([dataset[i] for i in next(it)]))
    return batches


def batch_stream(run, workers: int):
    """Batches read from the cache every step, through a DataLoader as the engine does."""
    from ..data.precompute import CachedDataset
    from ..data.sampler import BucketBatchSampler

    dataset = CachedDataset(run.plan.samples, run.caches.latent_keys, run.caches.latent_caches, run.caches.text_cache, False)
    sampler = BucketBatchSampler(run.plan, run.cfg.train_batch_size, run.cfg.seed)
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)


class BareLoop:
    """A plain loop on a fresh copy of the run's model: forward, MSE, backward, optimizer step.

    extras=True adds what the engine does after backward besides the optimizer step:
    gradient clipping, the LR schedule and the EMA update (when the config uses them)."""

    def __init__(self, run, batches, *, extras: bool = False):
        from ..model import optimizers
        from ..model import parts as models
        from ..model.ema import EMA

        cfg = self.cfg = run.cfg
        self.run, self.batches, self.extras = run, batches, extras
        parts = models.load_parts(run.parts.path, run.parts.identity, run.weight_dtype)
        self.model = parts.transformer.to(run.device)
        if cfg.gradient_checkpointing:
            models.enable_block_checkpointing(self.model, cfg.gradient_checkpointing_interval)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizers.build_optimizer(cfg, self.params)
        self.scheduler = optimizers.build_lr_scheduler(cfg, self.optimizer, 10**6) if extras else None
        self.ema = EMA(self.model, cfg.ema_decay) if extras and cfg.use_ema else None
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def segment(self, steps: int) -> list[float]:
        """Run `steps` steps; the durations between consecutive step ends (as for the engine)."""
        run, ends = self.run, []
        for _ in range(steps):
            batch = next(self.batches)
            latents = batch["latents"].to(run.device, torch.float32)
            sigmas = run.schedule.sample_sigmas(latents.shape[0], self.generator, run.schedule.shift)
            noise = torch.randn(latents.shape, generator=self.generator)
            noisy, target = run.schedule.noisy_and_target(latents, noise, sigmas)
            pred = self.model(noisy.to(run.weight_dtype), encoder_hidden_states=batch["embeds"].to(run.device, run.weight_dtype),
                              encoder_attention_mask=batch["mask"].to(run.device), timestep=sigmas * 1000,
                              return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            if self.extras and self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
        return [b - a for a, b in zip(ends, ends[1:])]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (default 8)")
    parser.add_argument("--segment", type=int, default=11, help="steps per variant per round (default 11: 10 timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (demo preset: 0)")
    parser.add_argument("--workspace", type=Path, help="reuse this WORKSPACE (tiny model, data, caches)")
    parser.add_argument("--no-breakdown", action="store_true", help="only the engine and the bare loop")
    parser.add_argument("--quick", action="store_true", help="1 round of 4 steps (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.segment = 1, 4
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with contextlib.ExitStack() as stack:
        workspace = args.workspace or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-engine-")))
        run = build_run(workspace, args.segment, args.workers)
        stack.callback(run.close)
        preloaded = cached_batches(run, len(run.state.sampler))  # one epoch, in memory, cycled
        loops = {BARE: BareLoop(run, itertools.cycle(preloaded))}
        if not args.no_breakdown:
            loops["bare + clip, LR schedule, EMA"] = BareLoop(run, itertools.cycle(preloaded), extras=True)
            loops[f"... + cache reads via DataLoader ({args.workers} workers)"] = BareLoop(
                run, iter(batch_stream(run, args.workers)), extras=True)
        variants = {**{name: loop.segment for name, loop in loops.items()},
                    ENGINE: functools.partial(engine_segment, run)}
        # Round-robin short segments: a shared machine's load changes within seconds, and
        # interleaving gives every variant the same share of it. The first round warms up.
        durations: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_index in range(args.rounds + 1):
            shift = round_index % len(names)  # rotate the order too: no variant always follows the same one
            for name in names[shift:] + names[:shift]:
                taken = variants[name](args.segment)
                if round_index:
                    durations[name] += taken

    # Headline: the lower quartile of step times. Other processes only ever add time, and on a
    # shared machine they do so in bursts of seconds, so the fast quartile is the estimate of
    # a step's own cost least disturbed by them; medians and means are reported beside it.
    def quartile(taken: list[float]) -> float:
        return statistics.quantiles(taken, n=4)[0] if len(taken) > 1 else taken[0]

    base, base_median = quartile(durations[BARE]), statistics.median(durations[BARE])
    results = {"preset": "demo", "output_dir": str(run.output_dir), "batch_size": run.cfg.train_batch_size, "threads": args.threads,
               "rounds": args.rounds, "steps_per_segment": args.segment, "variants": {}}
    print(f"engine benchmark: demo preset (tiny Sana), batch {run.cfg.train_batch_size}, {args.threads} torch "
          f"thread(s), {args.rounds} interleaved rounds of {args.segment - 1} timed steps")
    print(f"  {'':<52} {'steps/s':>8}  ms/step: {'p25':>6} {'median':>7} {'mean':>7}   vs bare (p25, median)")
    for name, taken in durations.items():
        fast, median, mean = quartile(taken), statistics.median(taken), statistics.fmean(taken)
        results["variants"][name] = {"p25_step_s": fast, "median_step_s": median, "mean_step_s": mean,
                                     "steps_per_s": 1 / fast, "timed_steps": len(taken), "step_s": taken}
        print(f"  {name:<52} {1 / fast:8.2f}  {'':9}{1000 * fast:6.1f} {1000 * median:7.1f} {1000 * mean:7.1f}   "
              f"{100 * (fast / base - 1):+6.1f}% {100 * (median / base_median - 1):+6.1f}%")
    engine = durations[ENGINE]
    results.update(engine_steps_per_s=1 / quartile(engine), bare_steps_per_s=1 / base,
                   overhead_pct=100 * (quartile(engine) / base - 1),
                   overhead_pct_median=100 * (statistics.median(engine) / base_median - 1))
    print(f"  engine overhead: {results['overhead_pct']:+.1f}% (p25), {results['overhead_pct_median']:+.1f}% (median)")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
