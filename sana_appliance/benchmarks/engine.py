"""Engine overhead: steps/s of the real training loop vs a bare loop on the same model and data.

    python -m sana_appliance.benchmarks.engine                 # demo preset, 60 timed steps
    python -m sana_appliance.benchmarks.engine --quick         # a few steps (smoke test)

The engine side is ``sana_appliance.train.Run`` on the demo preset, driven in-process in
a temporary WORKSPACE (or --workspace) with validation and periodic checkpoints off.
``Run.setup()`` fills the caches before anything is timed; the loop is timed from the
tracker's per-step calls (one per step, logging_steps=1), skipping --warmup steps, so
the first DataLoader start and the held-out eval loss stay out of the number.

The bare side is what a person writes to time a model: the same tiny transformer loaded
from the same folder, the same optimizer (optimizers.build_optimizer on the same config),
the same cached batches already collated in memory, and per step only sigmas + noise,
forward, MSE, backward, optimizer step, zero_grad. No sampler, DataLoader or tracker.

Between the two, ``--breakdown`` (on by default) adds the engine's extra work one piece at
a time (clip + LR schedule + EMA; then reading each batch from the cache through the
DataLoader), so an overhead is attributed to a cause rather than guessed at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch


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
    from sana_appliance.resolve import CliArgs, resolve
    from sana_appliance.train import Run

    env = {
        "WORKSPACE": str(workspace), "OUTPUT_DIR": str(workspace / "out"), "PRESET": "demo", "HF_HUB_OFFLINE": "1",
        "SANA_MAX_TRAIN_STEPS": str(total_steps),
        # The loop saves when step % checkpointing_steps == 0 and step < max_steps: never, here.
        "SANA_CHECKPOINTING_STEPS": str(total_steps), "SANA_VALIDATION_STEPS": "0",
        "SANA_DATALOADER_NUM_WORKERS": str(workers), "SANA_LOGGING_STEPS": "1",
    }
    run = Run(resolve(env, CliArgs()))
    run.setup()
    return run


def time_engine(run, warmup: int, steps: int) -> list[float]:
    """Seconds of each of Run.train()'s steps after `warmup` steps."""
    clock = StepClock(run.tracker)
    run.tracker = clock
    run.train()
    return [clock.times[s + 1] - clock.times[s] for s in range(warmup, warmup + steps)]


def cached_batches(run, count: int) -> list[dict]:
    """`count` collated batches in the engine's own sampler order, read from its caches now."""
    from sana_appliance.sampler import BucketBatchSampler
    from sana_appliance.train import CachedDataset

    dataset = CachedDataset(run.plan.samples, run.latent_keys, run.latent_caches, run.text_cache, False)
    sampler = BucketBatchSampler(run.plan, run.cfg.train_batch_size, run.cfg.seed)
    batches, it = [], iter(sampler)
    for _ in range(count):
        batches.append(torch.utils.data.default_collate([dataset[i] for i in next(it)]))
    return batches


def batch_stream(run, workers: int):
    """Batches read from the cache every step, through a DataLoader as the engine does."""
    from sana_appliance.sampler import BucketBatchSampler
    from sana_appliance.train import CachedDataset

    dataset = CachedDataset(run.plan.samples, run.latent_keys, run.latent_caches, run.text_cache, False)
    sampler = BucketBatchSampler(run.plan, run.cfg.train_batch_size, run.cfg.seed)
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)


def time_bare(run, batches, warmup: int, steps: int, *, extras: bool = False) -> list[float]:
    """Seconds of each step of a plain loop on a fresh copy of the run's model, after `warmup`.

    extras=True adds what the engine does after backward besides the optimizer step:
    gradient clipping, the LR schedule and the EMA update (when the config uses them)."""
    from sana_appliance import models, optimizers
    from sana_appliance.ema import EMA

    cfg = run.cfg
    parts = models.load_parts(run.parts.path, run.parts.identity, run.weight_dtype)
    model = parts.transformer.to(run.device)
    if cfg.gradient_checkpointing:
        models.enable_block_checkpointing(model, cfg.gradient_checkpointing_interval)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizers.build_optimizer(cfg, params)
    scheduler = optimizers.build_lr_scheduler(cfg, optimizer, warmup + steps) if extras else None
    ema = EMA(model, cfg.ema_decay) if extras and cfg.use_ema else None
    generator = torch.Generator().manual_seed(cfg.seed)
    times = [time.perf_counter()]
    for batch in batches:  # timed like the engine: from one step's end to the next one's
        if len(times) > warmup + steps:
            break
        latents = batch["latents"].to(run.device, torch.float32)
        sigmas = run.schedule.sample_sigmas(latents.shape[0], generator, run.schedule.shift)
        noise = torch.randn(latents.shape, generator=generator)
        noisy, target = run.schedule.noisy_and_target(latents, noise, sigmas)
        pred = model(noisy.to(run.weight_dtype), encoder_hidden_states=batch["embeds"].to(run.device, run.weight_dtype),
                     encoder_attention_mask=batch["mask"].to(run.device), timestep=sigmas * 1000, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        if extras and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--workers", type=int, default=0, help="engine DataLoader workers (demo preset: 0)")
    parser.add_argument("--workspace", type=Path, help="reuse this WORKSPACE (tiny model, data, caches)")
    parser.add_argument("--no-breakdown", action="store_true", help="only the engine and the bare loop")
    parser.add_argument("--quick", action="store_true", help="3 warmup + 5 timed steps (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 3, 5
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with contextlib.ExitStack() as stack:
        workspace = args.workspace or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-engine-")))
        total = args.warmup + args.steps
        run = build_run(workspace, total, args.workers)
        try:
            batches = cached_batches(run, total)
            # The bare loop runs before and after the engine; its steps are pooled, so a burst of
            # load from elsewhere on a shared machine cannot favour one side.
            bare = time_bare(run, batches, args.warmup, args.steps)
            engine = time_engine(run, args.warmup, args.steps)
            bare += time_bare(run, batches, args.warmup, args.steps)
            rows = {"bare loop (preloaded batches)": bare}
            if not args.no_breakdown:
                rows["bare + clip, LR schedule, EMA"] = time_bare(run, batches, args.warmup, args.steps, extras=True)
                rows[f"... + cache reads via DataLoader ({args.workers} workers)"] = time_bare(
                    run, batch_stream(run, args.workers), args.warmup, args.steps, extras=True)
            rows["engine (Run.train)"] = engine
        finally:
            run.close()

    # Medians: robust to other processes' bursts; the means are reported beside them.
    base = statistics.median(bare)
    results = {"preset": "demo", "batch_size": run.cfg.train_batch_size, "threads": args.threads,
               "warmup_steps": args.warmup, "timed_steps": args.steps, "variants": {}}
    print(f"engine benchmark: demo preset (tiny Sana), batch {run.cfg.train_batch_size}, {args.steps} timed steps "
          f"after {args.warmup} warmup, {args.threads} torch thread(s); median (mean) ms/step")
    for name, durations in rows.items():
        median, mean = statistics.median(durations), statistics.fmean(durations)
        results["variants"][name] = {"median_step_s": median, "mean_step_s": mean, "steps_per_s": 1 / median}
        print(f"  {name:<52} {1 / median:7.2f} steps/s  {1000 * median:7.1f} ({1000 * mean:7.1f}) ms/step  "
              f"{100 * (median / base - 1):+6.1f}% vs bare")
    engine_median = statistics.median(engine)
    results.update(engine_steps_per_s=1 / engine_median, bare_steps_per_s=1 / base,
                   overhead_pct=100 * (engine_median / base - 1))
    print(f"  engine overhead: {results['overhead_pct']:+.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
