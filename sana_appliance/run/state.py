"""TrainState: everything a checkpoint saves and a resume restores, in one place.

The stateful objects of training (weights, EMA, optimizer, schedule, loss scaler, the loop's
random generator, the sampler) and the counters of progress. ``Run`` builds one in setup;
:func:`sana_appliance.run.step.train_step` advances it; ``tensors``, ``objects``,
``random_streams`` and ``progress`` (to a checkpoint) and the ``load_*`` methods (from one) are
the only translation to and from a checkpoint folder (run.checkpoints writes and
verifies the files).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    transformer: torch.nn.Module  # the trained weights (unwrapped: what is saved and exported)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # a torch LR scheduler; its only saved state is its step count
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of the loop: caption dropout, sigmas, noise
    sampler: Any  # data.sampler.BucketBatchSampler: data order, resumable
    ema: Any = None  # model.ema.EMA when use_ema
    step: int = 0  # optimizer steps taken (skipped non-finite steps count)
    batches_consumed: int = 0  # micro-batches drawn from the sampler
    nonfinite_total: int = 0  # steps whose update was skipped (non-finite loss or gradients)
    tracker_run_id: str | None = None  # the wandb run a resumed run continues
    eval_first: dict | None = None  # {"step", "value"}: the first run's starting eval loss
    resume_history: list[dict] = field(default_factory=list)  # each resume's step and changed settings
    run_id: str | None = None  # when the run started at step 0 (UTC): names its checkpoints on the Hub
    sharded: bool = False  # FSDP: weights, optimizer state and EMA are saved as DCP shards (distributed/fsdp.py)
    adapter: bool = False  # model_type lora: only the adapter's (trainable) weights are saved, not the frozen base

    # ------------------------------------------------------------ to a checkpoint

    def tensors(self) -> dict:
        if self.sharded:  # in the checkpoint's sharded/ folder (distributed.fsdp.save)
            return {}
        if self.adapter:
            from ..model.adapters import trainable_state

            tensors = {"adapter": trainable_state(self.transformer)}
        else:
            tensors = {"transformer": self.transformer.state_dict()}
        if self.ema is not None:
            tensors["ema"] = {k: v for k, v in self.ema.state_dict().items() if torch.is_tensor(v)}
        return tensors

    def objects(self, rngs: list[dict]) -> dict:
        """Optimizer, schedule position, scaler and every rank's random streams (``rngs``, by rank)."""
        # The schedule's only state is its step count: its rates come from the config (see load_training).
        objects = {"lr_scheduler": {"last_epoch": self.lr_scheduler.last_epoch},
                   "scaler": self.scaler.state_dict(), **{f"rng_rank{i}": r for i, r in enumerate(rngs)}}
        if not self.sharded:
            objects["optimizer"] = self.optimizer.state_dict()
        if self.ema is not None:
            objects["ema_meta"] = {k: v for k, v in self.ema.state_dict().items() if not torch.is_tensor(v)}
        return objects

    def random_streams(self) -> dict:
        """This process's random streams (global ones and the loop's generator)."""
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "generator": self.generator.get_state()}

    def progress(self, **run_facts: Any) -> dict:
        """trainer_state.json: the counters and the sampler position, with the run's facts
        (world size, config and its hash, model identity) in between, as checkpoints have always held."""
        return {"step": self.step, "batches_consumed": self.batches_consumed, "world_size": run_facts["world_size"],
                "sampler": self.sampler.state_dict(batches_consumed=self.batches_consumed),
                "config_hash": run_facts["config_hash"], "config": run_facts["config"],
                "tracker_run_id": self.tracker_run_id, "nonfinite_total": self.nonfinite_total,
                "model": run_facts["model"], "eval_loss_first": self.eval_first, "resume_history": self.resume_history,
                "run_id": self.run_id, "workspace": run_facts["workspace"]}

    # ------------------------------------------------------------ from a checkpoint

    def load_weights(self, tensors: dict, objects: dict, make_ema, sharded: tuple | None = None) -> None:
        """Weights and EMA. ``make_ema()`` builds a fresh EMA when EMA was switched on at resume
        (it averages from the resumed weights, not the base model's). ``sharded``: (folder, saved names) of a
        sharded checkpoint, which also holds the optimizer state (loaded here, onto any number of ranks)."""
        if self.sharded:
            from ..distributed import fsdp

            folder, saved = sharded
            if fsdp.load(folder, saved, self.transformer, self.optimizer, self.ema):
                if self.ema is not None:
                    self.ema.num_updates = int(objects.get("ema_meta", {}).get("num_updates", 0))
            else:
                self.ema = make_ema(self.transformer)
            return
        if self.adapter:
            from ..model.adapters import load_trainable

            if "adapter" not in tensors:
                raise ValueError("the checkpoint holds full-rank transformer weights, not an adapter")
            load_trainable(self.transformer, tensors["adapter"])
        else:
            self.transformer.load_state_dict(tensors["transformer"])
        if self.ema is not None:
            if "ema" in tensors:
                self.ema.load_state_dict({**tensors["ema"], **objects.get("ema_meta", {})})
            else:
                self.ema = make_ema(self.transformer)

    def load_training(self, objects: dict, cfg, max_steps: int) -> None:
        """Optimizer and scaler state; the hyperparameters and the schedule come from cfg again
        (the loaded state carries the checkpoint's)."""
        from ..model import optimizers

        if not self.sharded:  # a sharded optimizer state came with the weights
            optimizers.load_optimizer_state(self.optimizer, objects["optimizer"])
        optimizers.apply_hyperparameters(cfg, self.optimizer)
        self.lr_scheduler = optimizers.build_lr_scheduler(cfg, self.optimizer, max_steps,
                                                          completed_steps=int(objects["lr_scheduler"]["last_epoch"]))
        self.scaler.load_state_dict(objects["scaler"])

    def load_progress(self, objects: dict, progress: dict, *, new_seed: int | None) -> None:
        """Random streams, counters and the sampler position. ``new_seed``: the seed changed since the
        checkpoint, so the loop's generator starts a fresh stream (still a function of seed and step).

        Every rank continues rank 0's streams: the loop's draws are made for the global batch on every rank
        alike (each takes its slice), so a resume on another process count continues the same numbers."""
        rng = objects["rng_rank0"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.batches_consumed = progress["step"], progress["batches_consumed"]
        if new_seed is None:
            self.generator.set_state(rng["generator"])
        else:
            self.generator.manual_seed(new_seed + 1_000_003 * self.step)
        self.sampler.load_state_dict(progress["sampler"])
        self.tracker_run_id, self.nonfinite_total = progress.get("tracker_run_id"), progress.get("nonfinite_total", 0)
        self.eval_first = progress.get("eval_loss_first")
        self.run_id = progress.get("run_id") or "run"  # checkpoints written before run ids existed
