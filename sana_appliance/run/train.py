"""The training run: build everything, resume, loop, export, upload, close.

Reads top to bottom. Every random draw of the loop (caption dropout, sigmas, noise) comes
from one generator owned by the run and saved in checkpoints; data order comes from the
bucket sampler and the count of batches consumed. Same seed, data and config: same numbers,
and a resumed run continues the exact sequence of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import tracking
from ..config.resolve import Resolved
from ..config.schema import BUILTIN_DATASET
from ..core.errors import ApplianceError, ConfigError, DataError, DivergedError, PeerError, PeersLost
from ..data import demo, precompute
from ..data.precompute import CachedDataset
from ..distributed import fsdp, group
from ..distributed.stopping import Abandoned, StopFlag, StopVote
from ..model import adapters, optimizers
from ..model import parts as models
from ..model.flow import FlowSchedule
from . import checkpoints, report, runinfo, validation
from .state import TrainState
from .step import StepSetup, flow_loss, settle, train_step

log = logging.getLogger(__name__)

EVAL_SAMPLES = 8
HELD_OUT_SEEDS = 3  # the demo's colour score: each held-out prompt drawn from this many noises


def _ignore_stop_signals(_worker_id: int) -> None:
    # Workers must not die on the SIGTERM meant for the trainer (it saves, then stops them).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Run:
    def __init__(self, resolved: Resolved, stop: StopFlag, uploads=None, ranks: group.World | None = None):
        self.resolved = resolved
        self.ranks = ranks or group.World()  # this rank's place in the job (joined by train() before the Run)
        self.uploads = uploads  # hub/upload.py's background worker (rank 0 with push_to_hub), or None
        self._progress_at = time.monotonic()  # when validation images and metrics last went into the upload queue
        self.cfg = resolved.config
        self.output_dir = Path(self.cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.timings: dict[str, float] = {}
        self.stop = stop  # installed by the caller, before setup (distributed/stopping.py)
        self._pending: tuple[int, dict] | None = None  # (step, train_step's result) not yet settled
        self._consecutive_bad = 0  # non-finite steps in a row
        self._diverged: DivergedError | None = None  # found where only rank 0 settles; raised at the next settle
        self._vote: StopVote | None = None
        self._async_pending = False  # a background checkpoint write was started and not yet waited for
        self._inflight = None  # (BackgroundSave, config hash, start, loop's wait) on a checkpoint writer
        self._noted_foreground = False
        self._write_failure_noted = False

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step, in order: process, model and data, caches, state."""
        t0 = time.monotonic()
        generator = self._start_process()
        self._load_model_and_data()
        self.timings["setup_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        self._fill_caches()
        self.timings["cache_s"] = time.monotonic() - t0
        self.memory = {"caching_peak_gib": round(runinfo.peak_memory_gib(self.device), 3)}
        if self.device.type == "cuda":  # from here the allocator's peak is the training phase's
            torch.cuda.empty_cache()  # what caching held goes back to the device, not kept for the loop
            torch.cuda.reset_peak_memory_stats(self.device)
        self._build_state(generator)

    def _start_process(self) -> torch.Generator:
        """The process group and its disks, rank discipline, seeds; the checkpoint to resume; the dataloader
        config checked. Returns the loop's generator (the same on every rank: each takes its slice of the global
        batch's draws)."""
        from accelerate import Accelerator

        from ..model import optimizers

        cfg = self.cfg
        import diffusers
        import transformers

        # Per-file "Loading weights" bars would bury the one progress bar a person reads.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        topology = self.resolved.topology
        # Mixed precision is the run's own (autocast in run/step.py); accelerate only wraps the model for DDP.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:  # rank discipline: one process logs
            logging.getLogger("sana_appliance").setLevel(logging.WARNING)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        if self.world > 1:
            ranks = self.ranks
            log.info("%d processes on %d machine(s), launched by %s; workspace %s: %s; output_dir %s: %s%s", self.world,
                     ranks.nodes, ranks.launcher, self.resolved.workspace.root,
                     "shared by the machines" if ranks.shared_workspace else "node-local (each machine has its own)",
                     self.output_dir, "shared" if ranks.shared_output else "node-local",
                     "" if topology.restart == 0 else f"; restart {topology.restart} of the group")
        self.compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
        self.export_dtype = optimizers.weight_dtype(cfg)  # the final weights' dtype
        self.fsdp = cfg.distributed_strategy == "fsdp"
        self.plain = None  # FSDP: rank 0's unsharded copy of the transformer, for validation, eval and export
        self._full: tuple | None = None  # FSDP: (weights, EMA) gathered on rank 0 for a validation round
        # The demo's held-out colour score, measured each validation round (and before the first step).
        self.scores_colours = cfg.data_backend_config == BUILTIN_DATASET and bool(cfg.validation_steps)
        self.colour_score: dict | None = None  # the latest measurement
        if self.fsdp:
            fsdp.ensure_group()
            # The fp32 master weights are sharded; bf16 is the compute dtype FSDP casts each block to.
            self.weight_dtype = torch.float32
            log.info("distributed_strategy=fsdp: weights, gradients, AdamW state%s sharded across %d process(es); "
                     "fp32 master weights, %s compute", " and EMA" if cfg.use_ema else "", self.world,
                     "bf16" if cfg.mixed_precision == "bf16" else "fp32")
        else:
            self.weight_dtype = self.export_dtype
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        if cfg.push_checkpoints_to_hub and cfg.resume_from_checkpoint.lower() == "latest":
            # Rank 0 looks on the Hub; a Hub that cannot be reached stops every rank with its exit code.
            self.ranks.agree(lambda: self._fetch_checkpoint_from_hub() if self.is_main else None)
        self.accelerator.wait_for_everyone()
        self.resume_ref = self._choose_checkpoint()
        # Before any download: a missing or broken dataloader config fails in seconds (on every rank alike).
        self.ranks.agree(self._check_data_config)
        return generator

    def _fetch_checkpoint_from_hub(self) -> None:
        """An empty output (a new pod): download this run's newest complete checkpoint from the Hub, verified like a
        local one, so `latest` resumes from it (and the Hub's metrics.jsonl of that run, so its history stays whole).
        The run's identity is the config hash without neutral keys; its newest run id is taken."""
        import shutil

        from ..hub import upload

        valid, _ = checkpoints.list_checkpoints(self.ckpt_root)
        if valid:
            return
        config_hash = self._identity()
        found = upload.find_remote_checkpoints(self.resolved, config_hash)
        if not found:
            log.info("no local checkpoint, and %s holds none of this run (config hash %s): training starts at step 0",
                     self.cfg.hub_model_id, config_hash)
            return
        for remote in found:
            tmp = self.ckpt_root / f".hub-checkpoint-{remote.step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            log.info("no local checkpoint: downloading checkpoint-%d of this run from %s (config hash %s, run %s)",
                     remote.step, self.cfg.hub_model_id, config_hash, remote.run_id)
            folder = upload.download_checkpoint(self.resolved, config_hash, remote, tmp)
            problems = checkpoints.verify(checkpoints.CheckpointRef(folder, remote.step))
            if not problems:
                os.replace(folder, self.ckpt_root / f"checkpoint-{remote.step}")
                shutil.rmtree(tmp, ignore_errors=True)
                log.info("checkpoint-%d from the Hub is intact: resuming from it", remote.step)
                if not (self.output_dir / "metrics.jsonl").exists() and \
                        upload.download_records(self.resolved, remote.run_id, self.output_dir):
                    log.info("metrics.jsonl of run %s downloaded from %s: its history continues", remote.run_id,
                             self.cfg.hub_model_id)
                return
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("checkpoint-%d on %s does not match its marker (%s): trying an older one", remote.step,
                        self.cfg.hub_model_id, "; ".join(problems))
        log.warning("no intact checkpoint of this run on %s: training starts at step 0", self.cfg.hub_model_id)

    def _identity(self) -> str:
        return checkpoints.run_identity({**dataclasses.asdict(self.cfg), **adapters.identity_settings(self.cfg)},
                                        self.resolved.workspace.root)

    def _load_model_and_data(self) -> None:
        """The base model (downloaded or built once), the flow schedule, the data plan and eval samples."""
        from ..data.plan import build_plan

        cfg = self.cfg
        with self.ranks.fetchers_first():  # one rank per disk downloads or builds; the others then find it there
            model_path, self.model_info = models.locate_model(cfg.pretrained_model_name_or_path, cfg.revision, self.resolved,
                                                                 self.device)
        identity = models.model_identity(self.model_info)
        self.parts = models.load_parts(model_path, identity, self.weight_dtype)
        self.schedule = FlowSchedule.from_config(cfg, self.parts.scheduler_config)

        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.world
        self.plan = self.ranks.agree(lambda: build_plan(
            cfg.data_backend_config, self.resolved.workspace, size_multiple=self.parts.size_multiple, seed=cfg.seed,
            min_samples=per_step, hub=self.resolved.hub, credentials=self.resolved.credentials))
        self._check_same_plan()
        if self.is_main:
            self.plan.write_report(self.output_dir)
            self._quietly("the training data's contact sheet", lambda: report.contact_sheet(
                self.plan.samples, self.output_dir / "validation" / report.CONTACT_SHEET))
        if cfg.data_backend_config == BUILTIN_DATASET:
            from ..data.plan import demo_eval_samples

            self.eval_samples = demo_eval_samples(self.resolved.workspace, size_multiple=self.parts.size_multiple, seed=cfg.seed)
        else:  # no held-out split in a user's data: a fixed subset, still a fixed measurement
            self.eval_samples = self.plan.samples[:EVAL_SAMPLES]

    def _check_same_plan(self) -> None:
        """Every rank must train on the same scanned data: machines whose disks hold different files are an error."""
        if self.world == 1:
            return
        seen = self.ranks.gather((self.ranks.node, self.plan.fingerprint(), len(self.plan.samples)))
        if len({fingerprint for _, fingerprint, _ in seen}) > 1:
            by_node = {node: (fingerprint[:12], count) for node, fingerprint, count in seen}
            raise DataError(
                "the machines of this job scanned different datasets (" + "; ".join(
                    f"machine {node}: {count} samples, fingerprint {fp}" for node, (fp, count) in sorted(by_node.items()))
                + "): with node-local disks every machine needs the same files under the same paths; sync the dataset "
                "folders (and captions) or put them on a shared volume")

    def _build_state(self, generator: torch.Generator) -> None:
        """The TrainState (weights on the device, sampler, optimizer, schedule, scaler, EMA), resumed
        from the chosen checkpoint; the disk check for checkpoints; the trackers."""
        from ..data.sampler import BucketBatchSampler
        from ..model import optimizers

        cfg = self.cfg
        if self.fsdp and self.is_main:  # before sharding (and before the checkpointed forwards)
            self.plain = fsdp.plain_copy(self.parts.transformer)
        self.adapter = self._attach_adapter() if adapters.enabled(cfg) else None
        transformer = self.parts.transformer.to(self.device)
        if cfg.gradient_checkpointing:
            models.enable_block_checkpointing(transformer, cfg.gradient_checkpointing_interval)
        if cfg.compile_transformer:
            # Compiled kernels are kept in the workspace: a restart or a resume on the same volume reuses them.
            compiled = self.resolved.workspace.cache_dir / "torch-compile"
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compiled / "inductor"))
            os.environ.setdefault("TRITON_CACHE_DIR", str(compiled / "triton"))
            count = models.compile_blocks(transformer)
            log.info("compile_transformer: %d transformer blocks compiled with torch.compile (inductor); the first "
                     "step at each new shape compiles, validation runs eager", count)
        if self.fsdp:
            transformer, units = fsdp.shard(transformer, self.device, cfg.mixed_precision)
            log.info("FSDP: %d fully_shard units (the transformer's %s, and the root)", units,
                     ", ".join(transformer._no_split_modules))
        sampler = BucketBatchSampler(self.plan, cfg.train_batch_size, cfg.seed, num_replicas=self.world,
                                     rank=self.accelerator.process_index)
        micro_per_epoch = max(1, len(sampler))
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
        optimizer = optimizers.build_optimizer(cfg, [p for p in transformer.parameters() if p.requires_grad])
        lr_scheduler = optimizers.build_lr_scheduler(cfg, optimizer, self.max_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        # The EMA lives where it is used: rank 0 validates and exports with it, checkpoint writers save it;
        # under FSDP every rank keeps its shard of it.
        keeps_ema = cfg.use_ema and (self.fsdp or self.is_main or self.ranks.writes_checkpoints)
        ema = self._new_ema(transformer) if keeps_ema else None
        if self.world > 1:
            import warnings

            # DDP notes once per process that a conv weight's gradient layout differs from its bucket's: a
            # performance hint about diffusers' depthwise convs, not a problem of the run.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.model = self.accelerator.prepare(transformer) if self.world > 1 and not self.fsdp else transformer
        self.state = TrainState(transformer=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
                                generator=generator, sampler=sampler, ema=ema, sharded=self.fsdp,
                                adapter=self.adapter is not None)

        bytes_per_param = optimizers.optimizer_state_bytes_per_param(cfg)
        if self.adapter is not None:  # the adapter trains in fp32: its optimizer state is the fp32 kind
            bytes_per_param = optimizers.spec_of(cfg).state_bytes_fp32
        if self.adapter is None:
            n_params, weight_bytes = sum(p.numel() for p in transformer.parameters()), torch.finfo(self.weight_dtype).bits // 8
        else:  # a checkpoint holds the adapter (fp32) and its optimizer state, not the frozen base
            n_params, weight_bytes = self.adapter.params, 4
        self.ckpt_bytes = checkpoints.estimate_bytes(n_params, weight_bytes, bytes_per_param, cfg.use_ema)
        self.ranks.agree(lambda: checkpoints.check_disk(self.ckpt_root, self.ckpt_bytes) if self.ranks.writes_checkpoints
                         else None)

        self.last_saved_step: int | None = None
        self.eval_logged: tuple[int, float | None] = (-1, None)  # (step, value) of the last eval loss logged
        self._resume()
        if self.state.run_id is None:  # a run starting at step 0: its id names its checkpoints on the Hub
            self.state.run_id = self.ranks.broadcast(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        self.tracker = tracking.build(cfg, self.output_dir, self.resolved.redacted(), self.state.step,
                                      self.state.tracker_run_id, self.resolved.hub.wandb_mode, self.is_main)

    def _attach_adapter(self) -> adapters.Attached:
        """model_type lora: the base transformer frozen (and quantized), the adapter added. Its initial weights are
        drawn from the seed alone (not from what the run drew before), so every start and every rank builds the same."""
        cfg, transformer = self.cfg, self.parts.transformer
        if cfg.base_model_precision in adapters.QUANTIZED:
            t0 = time.monotonic()
            quantized = adapters.quantize_base(transformer, cfg, self.device)
            log.info("base transformer in %s (bitsandbytes, quantized on %s in %.1f s): %d linear layers of the blocks, "
                     "%.0f%% of its %s parameters; the rest stays %s", cfg.base_model_precision,
                     "the CPU" if quantized["where"] == "cpu" else self.device.type, time.monotonic() - t0,
                     quantized["layers"], 100 * quantized["quantized_params"] / max(1, quantized["params"]),
                     f"{quantized['params']:,}", str(self.weight_dtype).replace("torch.", ""))
        on_gpu = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=on_gpu):
            torch.manual_seed(cfg.seed)
            attached = adapters.attach(transformer, cfg)
        if self.world > 1 and adapters.module_dropout(attached):
            raise ConfigError(f"lycoris_config: module_dropout skips whole adapter modules at random, which DDP cannot "
                              f"synchronise across {self.world} processes; set module_dropout: 0 (dropout and "
                              "rank_dropout work), or train on one process")
        what = (f"LyCORIS {attached.config.get('algo', 'lokr')}" if attached.kind == adapters.LYCORIS else
                f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank:g}")
        log.info("model_type=lora: %s on %d modules, %s trainable parameters (fp32); the base transformer is frozen",
                 what, attached.modules, f"{attached.params:,}")
        return attached

    def _new_ema(self, transformer):
        from ..model.ema import EMA

        return EMA(transformer, self.cfg.ema_decay)

    @property
    def step(self) -> int:
        return self.state.step

    def _check_data_config(self) -> None:
        from ..data.backends import BACKEND_TYPES, load_data_config

        spec, workspace = self.cfg.data_backend_config, self.resolved.workspace
        if spec is None:
            raise ConfigError(
                f"data_backend_config is not set and {workspace.config_dir / 'multidatabackend.json'} does not exist: "
                "put your SimpleTuner multidatabackend.json there, or set DATALOADER_CONFIG=path/to/it "
                "(README: Training your own data)")
        backends, _ = load_data_config(spec, workspace)
        missing = [f"`{b.id}`: {b.instance_data_dir}" for b in backends
                   if BACKEND_TYPES[b.type].folder_exists_before_run and not b.instance_data_dir.is_dir()]
        if missing:
            raise DataError(f"dataset folders not found ({spec}): {'; '.join(missing)}. Put the images there or fix "
                            "instance_data_dir (relative paths resolve against WORKSPACE).")

    def _fill_caches(self) -> None:
        """Encode every caption and image not yet cached; then the frozen parts leave the accelerator.

        Checks for a stop per batch: entries are atomic, so the run just stops, and the next
        start finds what was written here."""
        try:
            with self.stop.deferred():
                prepared = precompute.prepare(self.cfg, self.parts, self.plan, self.eval_samples, device=self.device,
                                              compute_dtype=self.compute_dtype, rank=self.ranks.data_share[0],
                                              world=self.ranks.data_share[1], vote=self.vote)
        except Abandoned:
            raise self.stop.error("while filling the caches: nothing to save (cache entries already written are "
                                  "complete and are reused by the next start)") from None
        self.caches = prepared  # the text and latent caches, every sample's cache key, the validation prompts
        if self.is_main:
            stats = prepared.stats
            hits, misses = stats["latent_hits"], stats["latent_encoded"]
            log.info("caches: text embeddings %d hit / %d encoded; latents %d hit / %d encoded (hit rate %.0f%%)",
                     stats["text_hits"], stats["text_encoded"], hits, misses, 100.0 * hits / max(1, hits + misses))

    # ------------------------------------------------------------ state

    def _save_checkpoint(self, wait: bool = True) -> None:
        """Save this step, on every rank together. ``wait=False`` (the loop's periodic saves, without FSDP): the
        state is copied to the host, which is all the loop waits for, and a thread writes the folder while
        training goes on; the next save, a stop, finish() and close() wait for that write (one at a time), and
        its failure then stops every rank with the same error. Where the host copy would take more than half of
        the free host memory, the save is written at once instead (logged once)."""
        self._settle()  # the schedule position and skip count it saves include the last step
        self._wait_for_save()
        state = self.state
        rngs = [state.random_streams()]
        if self.world > 1:  # every rank's streams go into the one folder rank 0 writes
            mine, rngs = rngs[0], [None] * self.world
            torch.distributed.all_gather_object(rngs, mine)
        objects = state.objects(rngs)
        progress = state.progress(world_size=self.world, config_hash=self._identity(),
                                  workspace=str(self.resolved.workspace.root),
                                  config=self.resolved.redacted(), model=self.model_info)
        if self.adapter is not None:  # what the adapter is (a resume compares it: model/adapters.resume_problem)
            progress["adapter"] = {"kind": self.adapter.kind, "config": self.adapter.config}
        # The tracker may have started a run since the resume; rank 0's tracker is the one.
        progress["tracker_run_id"] = self.ranks.broadcast(self.tracker.run_id)
        # Weights are identical on every rank: one rank per output disk writes the folder (rank 0 on a shared
        # disk, each machine's local rank 0 on node-local disks, so every machine can resume). A failed save
        # (a full disk) stops every rank with the same error.
        t0 = time.monotonic()
        if wait or self.fsdp:
            sharded = self._save_shards(progress) if self.fsdp else None
            path = self.ranks.agree(lambda: self._write_checkpoint(progress, objects, sharded)
                                    if self.ranks.writes_checkpoints else None)
            if path is not None:
                self._saved(path, state.step, progress["config_hash"], time.monotonic() - t0, time.monotonic() - t0)
        else:
            result = self.ranks.agree(lambda: self._start_write(progress, objects)
                                      if self.ranks.writes_checkpoints else None)
            self._async_pending = True  # on every rank alike: each one waits for the write at the same point
            stall = time.monotonic() - t0
            if isinstance(result, checkpoints.BackgroundSave):
                self._inflight = (result, progress["config_hash"], t0, stall)
                self._write_failure_noted = False
            elif result is not None:  # written at once (host memory)
                self._saved(result, state.step, progress["config_hash"], stall, stall)
        self.last_saved_step = state.step
        self.accelerator.wait_for_everyone()

    def _start_write(self, progress: dict, objects: dict):
        """A checkpoint writer's part of a background save: the host copy, then the writing thread (or, short of
        host memory, the folder written now: its path)."""
        import copy

        tensors = self.state.tensors()
        size = checkpoints.tensor_bytes(tensors) + checkpoints.tensor_bytes(objects)
        free = checkpoints.host_memory_available()
        if free is not None and size > free // 2:
            if not self._noted_foreground:
                self._noted_foreground = True
                log.info("checkpoints are written before training goes on: a host copy of the state (%.1f GiB) "
                         "would take more than half of the free host memory (%.1f GiB)", size / 2**30, free / 2**30)
            return self._write_checkpoint(progress, objects)
        copied = checkpoints.host_copy({"tensors": tensors, "objects": objects})
        write = checkpoints.BackgroundSave(self.ckpt_root, self.state.step, self.cfg.checkpoints_total_limit,
                                           tensors=copied["tensors"], objects=copied["objects"],
                                           state=copy.deepcopy(progress))
        # Kept at once: should the ranks' agreement after this fail (a peer's error), close() still waits for it.
        self._inflight = (write, progress["config_hash"], time.monotonic(), 0.0)
        return write

    def _saved(self, path: Path, step: int, config_hash: str, total_s: float, stall_s: float) -> None:
        """A checkpoint is complete on this disk: timings, the log line, the Hub upload."""
        self.timings["last_checkpoint_save_s"] = round(total_s, 3)
        self.timings["last_checkpoint_stall_s"] = round(stall_s, 3)
        if self.is_main:
            if stall_s < total_s:
                log.info("saved %s (%.2f s, written while training went on; the loop waited %.2f s for the copy)",
                         path.name, total_s, stall_s)
            else:
                log.info("saved %s (%.1f s)", path.name, total_s)
        if self.is_main and self.uploads is not None and self.cfg.push_checkpoints_to_hub:
            self.uploads.add("checkpoint", step=step, config_hash=config_hash, run_id=self.state.run_id)
            self._queue_progress()

    def _poll_save(self) -> None:
        """Between steps, on this rank alone: a background write that has finished well is reported now (its log
        line and upload); a failed one waits for _wait_for_save, where every rank hears of it."""
        if self._inflight is None or self._inflight[0].reported or not self._inflight[0].done():
            return
        bg, config_hash, t0, stall = self._inflight
        if bg.error is not None:
            if not self._write_failure_noted:  # said now; every rank stops with it at the next save, stop or end
                self._write_failure_noted = True
                log.warning("writing checkpoint-%d failed (%s); training goes on, and the run stops with this error "
                            "at the next checkpoint, unless a stop comes first", bg.step, bg.error)
            return
        bg.reported = True
        self._saved(bg.result(), bg.step, config_hash, bg.finished - t0, stall)

    def _wait_for_save(self) -> None:
        """Every rank together: wait for the background write, if one was started; its failure is everyone's."""
        if not self._async_pending:
            return
        self._async_pending = False
        inflight, self._inflight = self._inflight, None
        path = self.ranks.agree(lambda: inflight[0].result() if inflight is not None else None)
        if inflight is not None and not inflight[0].reported:
            bg, config_hash, t0, stall = inflight
            bg.reported = True
            self._saved(path, bg.step, config_hash, bg.finished - t0, stall)

    def _save_shards(self, progress: dict) -> Path:
        """FSDP: every rank writes its shards into a folder beside the checkpoints, which the checkpoint writers
        then move into the checkpoint; with node-local disks the machines first exchange shards, so every
        machine's copy is whole."""
        import shutil

        from torch.distributed.checkpoint.api import CheckpointException

        staging = self.ckpt_root / f".checkpoint-{self.state.step}.sharded.tmp"

        def prepare() -> None:
            if self.ranks.writes_checkpoints:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)

        self.ranks.agree(prepare)
        try:
            progress["sharded"] = fsdp.save(staging, self.state.transformer, self.state.optimizer, self.state.ema)
        except (Exception, CheckpointException) as exc:
            disk = fsdp.disk_failure(exc)
            if disk is None:  # a lost peer or a crash: the launcher restarts the group from the last checkpoint
                raise PeersLost(f"saving the shards of checkpoint-{self.state.step} failed ({fsdp.describe(exc)})") \
                    from None
            raise DataError(f"saving the shards of checkpoint-{self.state.step} in {self.ckpt_root} failed ({disk}); "
                            "earlier checkpoints are intact. Free disk space or lower checkpoints_total_limit, then "
                            "restart to resume.") from None
        if not self.ranks.shared_output:
            self.ranks.share_files(staging)
        return staging

    def _write_checkpoint(self, progress: dict, objects: dict, sharded: Path | None = None) -> Path:
        path = checkpoints.save(self.ckpt_root, self.state.step, tensors=self.state.tensors(), objects=objects,
                                state=progress, sharded=sharded)
        checkpoints.prune(self.ckpt_root, self.cfg.checkpoints_total_limit)
        return path

    def _choose_checkpoint(self) -> checkpoints.CheckpointRef | None:
        """The checkpoint to resume from, the same step on every rank. Each checkpoint writer verifies its disk
        (moving damaged ones aside); the newest step any of them holds wins, and a machine that lacks it (a new or
        emptied node-local disk) receives it from one that has it."""
        ranks, setting = self.ranks, self.cfg.resume_from_checkpoint
        if self.world == 1:
            return checkpoints.find_resume(setting, self.ckpt_root)
        mine = None
        if ranks.writes_checkpoints:
            try:
                ref = checkpoints.find_resume(setting, self.ckpt_root)
                mine = None if ref is None else ("ref", ref.step, str(ref.path), ref.path.parent == self.ckpt_root)
            except ConfigError as exc:  # every rank must raise it, not wait for a choice
                mine = ("error", exc.problems)
        seen = ranks.gather((ranks.writes_checkpoints, mine))
        for _, choice in seen:
            if choice is not None and choice[0] == "error":
                raise ConfigError(choice[1])
        held = {rank: choice for rank, (_, choice) in enumerate(seen) if choice is not None}
        if not held:
            return None
        step = max(choice[1] for choice in held.values())
        source = min(rank for rank, choice in held.items() if choice[1] == step)
        if not held[source][3]:  # an explicit folder outside the checkpoints folder: every machine names its own copy
            return checkpoints.CheckpointRef(Path(held[source][2]), step)
        lacking = {rank for rank, (writes, choice) in enumerate(seen) if writes and (choice is None or choice[1] != step)}
        if lacking:
            if self.is_main:
                log.warning("checkpoint-%d is not on the disk of %d machine(s): sending it from rank %d", step,
                            len(lacking), source)
            ranks.send_folder(source, self.ckpt_root / f"checkpoint-{step}", lacking, self.ckpt_root)
        ranks.barrier()
        return checkpoints.CheckpointRef(self.ckpt_root / f"checkpoint-{step}", step)

    def _resume(self) -> None:
        """Load the chosen checkpoint; one that fails to load is moved aside and the next older one is tried."""
        ref = self.resume_ref
        while ref is not None:
            problems = []
            try:
                loaded = checkpoints.load(ref)
            except checkpoints.CheckpointDamaged as exc:
                loaded, problems = None, exc.problems
            # Every rank must have loaded the same step; the copy is moved aside only on the disks where it failed.
            seen = self.ranks.gather((self.ranks.disk_of_output, loaded is not None, problems))
            bad_disks = {disk for disk, ok, _ in seen if not ok}
            if not bad_disks:
                self._apply_checkpoint(ref, *loaded)
                return
            problems = problems or next(p for _, ok, p in seen if not ok)
            if self.cfg.resume_from_checkpoint.lower() != "latest":
                raise ConfigError(f"resume_from_checkpoint={self.cfg.resume_from_checkpoint!r}: {ref.path} is damaged "
                                  f"({'; '.join(problems)}); use `latest` or another checkpoint")
            if self.ranks.writes_checkpoints and self.ranks.disk_of_output in bad_disks and ref.path.is_dir():
                checkpoints.quarantine(ref, problems)
            self.accelerator.wait_for_everyone()
            ref = self.resume_ref = self._choose_checkpoint()

    def _apply_checkpoint(self, ref, tensors: dict, objects: dict, state: dict) -> None:
        saved_config = _moved_workspace(state.get("config", {}), state.get("workspace"), self.resolved.workspace.root)
        errors, notes = checkpoints.compare_configs(saved_config, self.resolved.redacted())
        saved_global = int((state.get("sampler") or {}).get("global_batch_size", 0))
        if saved_global == self.cfg.train_batch_size * self.world:  # another split of the same global batch
            errors = [e for e in errors if not e.startswith("train_batch_size:")]
        errors.extend(self._global_batch_problems(state))
        before = state.get("model") or {}
        if models.weights_identity(before) != models.weights_identity(self.model_info):
            errors.append(f"the base model changed since the checkpoint ({models.weights_identity(before)} -> "
                          f"{models.weights_identity(self.model_info)}): the trained transformer would be paired with "
                          "another VAE and text encoder. Pin revision to the checkpoint's commit")
        if self.adapter is not None:
            problem = adapters.resume_problem((state.get("adapter") or {}).get("config"), self.adapter)
            if problem:
                errors.append(problem)
        if state["step"] > self.max_steps:
            errors.append(f"the checkpoint is at step {state['step']}, past max_train_steps={self.max_steps}: raise "
                          "max_train_steps, or name an earlier checkpoint in resume_from_checkpoint")
        if errors:
            raise ConfigError([f"cannot resume from {ref.path}: {e}; or use resume_from_checkpoint=none or a new output_dir"
                               for e in errors])
        for note in notes if self.is_main else ():
            log.warning("resume: %s", note)
        current = self.resolved.redacted()
        old = {k: saved_config.get(k, checkpoints.OLD_DEFAULTS.get(k)) for k in set(saved_config) | set(current)}
        changed = {k: [old[k], current.get(k)] for k in sorted(old)
                   if old[k] != current.get(k) and k not in ("output_dir", "resume_from_checkpoint")}
        # What was trained with which settings: run.json and the model card list every change and its step.
        self.state.resume_history = list(state.get("resume_history", [])) + ([{"step": state["step"], "changed": changed}]
                                                                        if changed else [])
        from torch.distributed.checkpoint.api import CheckpointException

        sharded = None
        if self.fsdp:
            if not (ref.path / checkpoints.SHARDED).is_dir() or "sharded" not in state:
                raise ConfigError(f"cannot resume from {ref.path}: it holds no FSDP shards (written with "
                                  "distributed_strategy=ddp?); set distributed_strategy back to ddp, or use "
                                  "resume_from_checkpoint=none or a new output_dir")
            sharded = (ref.path / checkpoints.SHARDED, state["sharded"])
        elif "sharded" in state:
            raise ConfigError(f"cannot resume from {ref.path}: it was written with distributed_strategy=fsdp; set "
                              "distributed_strategy: fsdp to resume it (on any number of GPUs)")
        try:
            self.state.load_weights(tensors, objects, self._new_ema, sharded)
            self.state.load_training(objects, self.cfg, self.max_steps)
        except (RuntimeError, ValueError, KeyError,
                CheckpointException) as exc:  # shapes or optimizer layout of another model
            if any(group.is_peer_failure(e) for e in fsdp.failures(exc)):
                raise PeersLost(f"loading {ref.path.name} failed on another rank ({fsdp.describe(exc)})") from None
            raise ConfigError(f"cannot resume from {ref.path}: its state does not fit this model or optimizer "
                              f"({fsdp.describe(exc)}); use resume_from_checkpoint=none or a new output_dir") from None
        self._restore_streams(ref, objects, state, saved_config)

    def _global_batch_problems(self, state: dict) -> list[str]:
        """A resume on another process count continues exactly when the global batch (train_batch_size x processes)
        is the same; otherwise it is refused with the train_batch_size that keeps it."""
        saved_world = int(state.get("world_size", 1))
        saved_global = int((state.get("sampler") or {}).get("global_batch_size", 0)) or None
        now_global = self.cfg.train_batch_size * self.world
        if saved_world == self.world or saved_global is None or saved_global == now_global:
            if saved_world != self.world:
                log.info("resume: %d processes now, %d when the checkpoint was written; the global batch (%d) is the "
                         "same, so data order and random draws continue exactly", self.world, saved_world, now_global)
            return []
        fix = (f"set train_batch_size={saved_global // self.world} to keep it" if saved_global % self.world == 0 else
               f"use a process count that divides {saved_global}")
        return [f"the checkpoint was trained with a global batch of {saved_global} ({saved_world} process(es) x "
                f"train_batch_size {saved_global // saved_world}); {self.world} process(es) x train_batch_size "
                f"{self.cfg.train_batch_size} would make it {now_global} and change the data order: {fix}"]

    def _restore_streams(self, ref, objects: dict, progress: dict, saved_config: dict) -> None:
        seed = self.cfg.seed
        new_seed = None if saved_config.get("seed", seed) == seed else seed
        self.state.load_progress(objects, progress, new_seed=new_seed)
        self.last_saved_step = self.state.step
        log.info("resumed from %s (step %d); next step's learning rate %.3g", ref.path.name, self.state.step,
                 self.state.lr_scheduler.get_last_lr()[0])

    # ------------------------------------------------------------ loop

    def _cached_dataset(self, samples: list, keys: list[str]) -> CachedDataset:
        caches = self.caches
        return CachedDataset(samples, keys, caches.latent_caches, caches.text_cache, self.cfg.vae_cache_disable)

    def _batches(self) -> Iterator[dict]:
        """Batches in sampler order; after a resume the sampler continues at the saved position."""
        dataset = self._cached_dataset(self.plan.samples, self.caches.latent_keys)

        loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.state.sampler, num_workers=self.cfg.dataloader_num_workers,
                                             worker_init_fn=_ignore_stop_signals, pin_memory=self.device.type == "cuda")
        for batch in loader:
            self.state.batches_consumed += 1
            yield batch

    def _step_setup(self) -> StepSetup:
        # FSDP reduce-scatters every micro-batch's gradients: the accumulated gradients stay sharded (less memory
        # than skipping the sync, which would hold them unsharded).
        no_sync = (lambda: self.accelerator.no_sync(self.model)) if self.world > 1 and not self.fsdp \
            else contextlib.nullcontext
        return StepSetup(cfg=self.cfg, model=self.model, parts=self.parts, schedule=self.schedule, device=self.device,
                         compute_dtype=self.compute_dtype, weight_dtype=self.weight_dtype, empty=self.empty,
                         no_sync=no_sync, rank=self.ranks.rank, world=self.world, sharded=self.fsdp)

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Loss on fixed samples with fixed sigmas and noise: comparable across steps and runs."""
        dataset = self._cached_dataset(self.eval_samples, self.caches.eval_keys)
        count = min(EVAL_SAMPLES, len(dataset))
        generator = torch.Generator("cpu").manual_seed(1234)
        sigmas = torch.linspace(0.1, 0.9, count)
        transformer = self.plain if self.fsdp else self.state.transformer  # rank 0 alone runs it
        setup = dataclasses.replace(self._step_setup(), model=transformer)
        was_training = transformer.training
        transformer.eval()
        total = 0.0
        with self._plain_on_device(), self._eager():
            for i in range(count):
                item = dataset[i]
                batch = {k: v[None] for k, v in item.items()}
                total += float(flow_loss(setup, batch, generator, sigmas=sigmas[i:i + 1], dropout=False))
        transformer.train(was_training)
        return total / max(1, count)

    def _eager(self):
        """Compiled blocks run eager here (validation, the eval loss): their shapes (no grad, CFG pairs, other
        sizes) would otherwise each compile once more, for a few calls."""
        if not self.cfg.compile_transformer:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    def _adapter_autocast(self):
        """Validation with an adapter: its fp32 weights meet the frozen base's bf16 activations under the run's
        autocast, as in training (a full-rank run validates in its weights' dtype, as it always has)."""
        if self.adapter is None or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _plain_on_device(self):
        if not self.fsdp:
            return contextlib.nullcontext()
        return fsdp.on_device(self.plain, self.device)

    def _gather_full(self) -> None:
        """FSDP, on every rank together: the full weights (and EMA) gathered onto rank 0's CPU, the weights loaded
        into its plain copy. Without FSDP, nothing to do: rank 0 holds everything."""
        if not self.fsdp:
            return
        weights = fsdp.full_state(self.state.transformer, self.is_main)
        ema = fsdp.full_ema(self.state.ema, self.is_main) if self.state.ema is not None else None
        if self.is_main:
            self._full = (weights, ema)
        # A failure on rank 0 (host memory) reaches the others, which would otherwise wait in the next collective.
        self.ranks.agree(lambda: self.plain.load_state_dict(weights) if self.is_main else None)

    def _validate(self) -> validation.Round:
        if not self.caches.prompts and not self.scores_colours:
            return validation.Round({}, [], {})
        embeds = validation.encode_validation_prompts(self.caches.prompts, self.caches.text_cache)
        transformer, ema = self.state.transformer, self.state.ema
        if self.fsdp:
            transformer, context = self.plain, self._ema_in_plain()
        else:
            context = ema.swapped_into(transformer) if ema is not None else contextlib.nullcontext()
        with context, self._eager(), self._adapter_autocast():  # restores the training weights also when a stop abandons the round
            return validation.run_validation(step=self.step, cfg=self.cfg, transformer=transformer, parts=self.parts,
                                             prompts=embeds, empty=self.negative, out_dir=self.output_dir / "validation",
                                             device=self.device, dtype=self.weight_dtype, check=self.vote.check,
                                             extra=self._held_out_embeds(), extra_size=(demo.IMAGE_SIZE, demo.IMAGE_SIZE),
                                             extra_seeds=HELD_OUT_SEEDS)

    def _held_out_embeds(self) -> list:
        """The demo's held-out captions (cached with its eval images), for the colour score; none otherwise."""
        if not self.scores_colours:
            return []
        prompts = {f"held-out-{i}": caption for i, caption in enumerate(demo.held_out_prompts())}
        return validation.encode_validation_prompts(prompts, self.caches.text_cache)

    def _score_colours(self, pictures: dict) -> list[list[tuple[object, str]]]:
        """Log the held-out colour score of a round's pictures ({(caption, seed): image}); their grid rows."""
        rows: dict[str, list] = {}
        judged = []
        for (caption, seed), image in pictures.items():
            _, colour, background = demo.parse_caption(caption)
            got_background, got_shape = demo.image_colours(image)
            judged.append((caption, image))
            verdict = (f"background {got_background} ({'right' if got_background == background else 'wrong'}), "
                       f"shape {got_shape or 'none'} ({'right' if got_shape == colour else 'wrong'})")
            rows.setdefault(caption, []).append((image, f"held out: {caption}\nseed {seed}: {verdict}"))
        score = demo.colour_score(judged)
        self.colour_score = {"step": self.step, "background": score["background"], "shape": score["shape"],
                             "prompts": len(rows), "seeds": HELD_OUT_SEEDS, "pictures": len(judged), "chance": report.CHANCE}
        self.tracker.log(self.step, {"colour_score_background": score["background"], "colour_score_shape": score["shape"]})
        log.info("held-out colour score at step %d: the prompted background in %.0f%%, the prompted shape colour in %.0f%% "
                 "of %d pictures of never-trained prompts (chance %.0f%%)", self.step, 100 * score["background"],
                 100 * score["shape"], len(judged), 100 * report.CHANCE)
        return list(rows.values())

    def _quietly(self, what: str, work) -> None:
        """Pictures and the report only show the run: a failure to draw one is a warning, never the run's end."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 (matplotlib, PIL, a full disk: training goes on)
            log.warning("%s was not written (%s: %s); training goes on", what, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")

    def _write_report(self) -> None:
        self._quietly("output/report.html", lambda: report.write_report(self.output_dir, max_steps=self.max_steps))

    @contextlib.contextmanager
    def _ema_in_plain(self):
        """FSDP: the gathered EMA in rank 0's plain copy (on the device) for the block, the weights back after."""
        weights, ema = self._full
        with self._plain_on_device():
            if ema is not None:
                self.plain.load_state_dict(ema, strict=False)
            try:
                yield
            finally:
                if ema is not None:
                    self.plain.load_state_dict(weights)

    def _start_eval(self) -> None:
        """The held-out eval loss before the first step (a resumed run keeps reporting the first run's), measured
        by rank 0 and known to every rank (each checkpoint writer saves it)."""
        self._gather_full()
        state = self.state
        eval_now = self.ranks.broadcast(self.ranks.agree(lambda: self.eval_loss() if self.is_main else None))
        self._full = None
        if state.eval_first is None:
            state.eval_first = {"step": state.step, "value": eval_now}
        self.eval_start = state.eval_first["value"]
        self.eval_logged = (state.step, eval_now)
        if self.is_main:
            log.info("held-out eval loss at step %d: %.5f", state.step, eval_now)
            self.tracker.log(state.step, {"eval_loss": eval_now})

    def train(self) -> None:
        """The cadence around train_step: count skipped steps, log, checkpoint, validate, stop."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        text = self.caches.text_cache
        self.empty = text.load(text.empty_key())
        negative = cfg.validation_negative_prompt
        self.negative = text.load(text.negative_key(negative)) if negative and self.caches.prompts else self.empty
        self._start_eval()
        if self.scores_colours and state.step == 0 and self._validation_round():  # the demo's score before training
            raise self._stop_training()
        if self.scores_colours and self.colour_score is None and self.is_main:  # resumed: the last score measured
            self.colour_score = _last_colour_score(self.output_dir / "metrics.jsonl", state.step)
        setup, batches = self._step_setup(), self._batches()
        setup.params = [p for p in state.transformer.parameters() if p.requires_grad]
        setup.skip_on_device = optimizers.skips_on_device(state.optimizer)
        self._consecutive_bad = 0
        samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.world
        bar = tqdm(total=self.max_steps, initial=state.step, disable=not self.is_main, unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        t_loop, steps_run = time.monotonic(), 0
        while state.step < self.max_steps:
            out = train_step(setup, state, batches, before_update=self._settle)
            state.step += 1
            steps_run += 1
            self._pending = (state.step, out)
            if not out["deferred"]:
                self._settle()
            loss = out["loss"]
            if self.world > 1 and state.step % cfg.logging_steps == 0:  # the global batch's loss: the mean over ranks
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
                loss = loss / self.world
            bar.update(1)
            if state.step % cfg.logging_steps == 0:  # loss and grad norm are read back from the device only here
                self._settle()
                elapsed = time.monotonic() - t_loop
                metrics = {"loss": float(loss), "lr": out["lr"], "grad_norm": float(out["grad_norm"]),
                           "samples_per_s": samples_per_step * steps_run / max(elapsed, 1e-9), "elapsed_s": round(elapsed, 4),
                           "skipped_steps": state.nonfinite_total, "peak_mem_gib": runinfo.peak_memory_gib(self.device)}
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                sps=f"{metrics['samples_per_s']:.1f}", mem=f"{metrics['peak_mem_gib']:.1f}G", refresh=False)
                if self.is_main:
                    self.tracker.log(state.step, metrics)
            if self.uploads is not None and cfg.hub_sync_interval_s and \
                    time.monotonic() - self._progress_at >= cfg.hub_sync_interval_s:
                self._queue_progress()
            self._poll_save()
            if state.step % cfg.checkpointing_steps == 0 and state.step < self.max_steps:
                self._save_checkpoint(wait=False)
            if cfg.validation_steps and state.step % cfg.validation_steps == 0 and state.step < self.max_steps:
                self._validation_round()  # a stop abandons it; the vote below then stops every rank
            if self.vote.agree():
                bar.close()
                raise self._stop_training()
        self._settle()
        bar.close()
        self.timings["train_s"] = time.monotonic() - t_loop
        # The loop's peak (validation rounds inside it included); finish()'s validation and export come after.
        self.memory["training_peak_gib"] = round(runinfo.peak_memory_gib(self.device), 3)

    def _settle(self, raise_later: bool = False) -> None:
        """The host's part of the last step (step.settle): its finiteness read, the schedule advanced for an
        applied update, a skipped one counted and logged; max_nonfinite_steps skipped in a row end the run (exit
        5). Called after each step where the check waited for the device anyway, else at the next step's
        before_update and before anything reads the counters or saves them (logs, checkpoints, validation, the
        loop's end). ``raise_later``: from a path only some ranks take (rank 0's run.json for the Hub), a divergence
        is raised at the next settle instead, which every rank reaches."""
        if self._diverged is not None and not raise_later:
            error, self._diverged = self._diverged, None
            raise error
        if self._pending is None:
            return
        (step, out), self._pending = self._pending, None
        if settle(self.state, out):
            self._consecutive_bad = 0
            return
        self._consecutive_bad += 1
        self.state.nonfinite_total += 1
        log.warning("step %d: non-finite loss or gradients (loss=%s, grad_norm=%s); update skipped (%d in a row)",
                    step, float(out["loss"]), float(out["grad_norm"]), self._consecutive_bad)
        if self._consecutive_bad >= self.cfg.max_nonfinite_steps:
            error = DivergedError(
                f"training diverged: {self._consecutive_bad} consecutive steps with non-finite loss or gradients, "
                f"last at step {step}. The last checkpoint is intact; lower learning_rate, use mixed_precision=bf16, "
                "or raise max_nonfinite_steps.")
            if not raise_later:
                raise error
            self._diverged = error  # raised at the next settle every rank reaches, where the others raise theirs

    @property
    def vote(self) -> StopVote:
        if self._vote is None:
            self._vote = StopVote(self.stop, self.world, self.device)
        return self._vote

    def _stop_training(self) -> ApplianceError:
        """Every rank, together: checkpoint unsaved progress; the queued uploads get hub_stop_upload_s; the
        StopRequested to raise."""
        try:
            self._wait_for_save()  # a checkpoint still being written is complete before the stop says so
        except (DataError, PeerError) as exc:  # it failed (on some rank's disk): saving this step is still worth a try
            if exc.exit_code != DataError.exit_code:
                raise
            log.warning("%s; saving step %d instead", exc, self.step)
            self.last_saved_step = None
        if self.step > (self.last_saved_step or 0):
            self._save_checkpoint()
            saved = f" after saving checkpoint-{self.step}"
        else:
            saved = f"; checkpoint-{self.step} was already saved" if self.step else "; no training step had run, nothing to save"
        return self.stop.error(f"at step {self.step}{saved}{self._uploads_at_stop()}", self.step)

    def _uploads_at_stop(self) -> str:
        """Use the stop grace for the upload queue; what to say about it in the stop message."""
        if self.uploads is None or not self.uploads.pending():
            return ""
        unsent = self.uploads.drain(self.cfg.hub_stop_upload_s, why="before stopping")
        if not unsent:
            return "; every queued upload reached the Hub"
        return (f"; {len(unsent)} upload(s) not sent yet ({', '.join(u.split(':', 1)[0] for u in unsent)}): they stay "
                f"queued in {self.uploads.queue_path} and the next start sends them")

    def _queue_progress(self) -> None:
        """Validation images, metrics.jsonl and a run.json of the run so far go into the upload queue."""
        self._progress_at = time.monotonic()
        if self.uploads is None:
            return
        self._settle(raise_later=True)  # run.json's skip count includes the last step (rank 0 alone is here)
        self._write_run_json(status="training")
        self.uploads.add("progress")

    @functools.cached_property
    def datasets(self) -> list[dict]:
        """Per dataset: sample count and fingerprint (the plan does not change during a run)."""
        return [_dataset_summary(b.id, [s for s in self.plan.samples if s.backend_id == b.id]) for b in self.plan.backends]

    def _write_run_json(self, status: str) -> None:
        if status == "finished":
            eval_loss = self._eval_summary()
        else:  # the last eval loss measured so far
            eval_loss = {"start": self.eval_start, "start_step": self.state.eval_first["step"],
                         "end": self.eval_logged[1], "end_step": self.eval_logged[0]}
        runinfo.write(self.output_dir / "run.json", resolved=self.resolved, model_info=self.model_info, datasets=self.datasets,
                      timings=self.timings, extra={"status": status, "steps": self.step, "eval_loss": eval_loss,
                                                   "run_id": self.state.run_id, "config_hash": self._identity(),
                                                   "resume_history": self.state.resume_history, "caches": self.caches.stats,
                                                   "skipped_steps": self.state.nonfinite_total,
                                                   "memory": getattr(self, "memory", {}),
                                                   **({"colour_score": self.colour_score} if self.colour_score else {}),
                                                   "distributed": {**self.ranks.summary(),
                                                                   "world_size": self.world,
                                                                   "strategy": self.cfg.distributed_strategy}})

    def _validation_round(self) -> bool:
        """Rank 0 renders and measures while the other ranks wait; a stop on any rank abandons
        the round at the next sampler step (no images of it are logged). All ranks return the
        same answer: True when a stop was requested."""
        self._settle()  # run.json, written below, counts the last step's skip
        self._gather_full()
        if self.is_main:
            log.info("validation at step %d: rendering %d prompt(s)", self.step, len(self.caches.prompts))
            started = time.monotonic()
            try:
                pictures = self._validate()
                self.vote.check()
                if self.eval_logged[0] != self.step:  # measured once per step (a resumed run's start is this step)
                    eval_now = self.eval_loss()
                    self.tracker.log(self.step, {"eval_loss": eval_now})
                    self.eval_logged = (self.step, eval_now)
                rows = pictures.rows + (self._score_colours(pictures.extra) if pictures.extra else [])
                self._quietly(f"the validation grid of step {self.step}", lambda: report.image_grid(
                    rows, self.output_dir / "validation" / report.grid_name(self.step),
                    f"step {self.step}: validation prompts" + (", then held-out prompts (never trained)" if pictures.extra else "")))
                self.tracker.log_images(self.step, pictures.images)
                self.timings["last_validation_s"] = round(time.monotonic() - started, 3)
                self._write_run_json(status="training")
                self._write_report()
            except Abandoned:
                log.warning("validation at step %d abandoned: a stop was requested", self.step)
            except (RuntimeError, MemoryError, OSError) as exc:  # e.g. out of memory at a large validation_resolution
                # Validation only shows progress: losing a round must not lose the run, or loop its restarts.
                log.warning("validation at step %d failed and was skipped, training goes on (%s: %s); lower "
                            "validation_resolution or validation_num_inference_steps, or set validation_steps=0",
                            self.step, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        self._full = None
        return self.vote.finish()

    # ------------------------------------------------------------ finish

    def finish(self) -> None:
        """Save the final step, validate, export. From the save on, a stop loses nothing: the
        next start resumes at the final step and redoes only validation and export."""
        from . import export

        cfg = self.cfg
        self._wait_for_save()
        if self.last_saved_step != self.step:
            self._save_checkpoint()
        redo = (f"checkpoint-{self.step} holds the final weights: the next start validates and exports "
                "again without training")
        if cfg.validation_steps and self._validation_round():
            raise self.stop.error(f"during the final validation; {redo}", self.step)
        self._gather_full()  # FSDP: rank 0 exports from the gathered weights
        if not self.is_main:
            return
        if self.eval_logged[0] == self.step:  # the final validation round just measured it
            self.eval_end = self.eval_logged[1]
        else:
            self.eval_end = self.eval_loss()
            self.tracker.log(self.step, {"eval_loss": self.eval_end})
        log.info("held-out eval loss: %.5f at step %d (start) -> %.5f at step %d", self.eval_start, self.state.eval_first["step"],
                 self.eval_end, self.step)
        config = self.resolved.redacted()
        datasets = self.datasets
        samples = validation.latest_images(self.output_dir / "validation")
        card = export.model_card(config=config, model_info=self.model_info, datasets=datasets, steps=self.step,
                                 samples=[p.name for p in samples],
                                 eval_loss=self._eval_summary(), resume_history=self.state.resume_history,
                                 colour_score=self.colour_score, report_link=self._report_link(),
                                 adapter=None if self.adapter is None else self.adapter.config)
        ema, transformer = self.state.ema, self.state.transformer
        if self.adapter is not None:
            try:
                export.export_adapter(output_dir=self.output_dir, transformer=transformer, ema=ema, attached=self.adapter,
                                      parts=self.parts, card=card, sample_images=samples, dtype=self.export_dtype,
                                      merged=cfg.lora_export_merged, check=self.stop.check)
            except Abandoned:
                raise self.stop.error(f"during export (final/ was left as it was); {redo}", self.step) from None
            self._write_run_json(status="finished")
            self._write_report()
            return
        if not self.fsdp:
            ema_state = ema.to_state_dict_for_export(self.weight_dtype) if ema is not None else None
        else:  # the plain copy holds the gathered weights; exported in the dtype the config trains
            transformer = fsdp.cast_(self.plain, self.export_dtype)
            _, full_ema = self._full
            ema_state = None if full_ema is None else {k: v.to(self.export_dtype).contiguous() for k, v in full_ema.items()}
        try:
            export.export_final(output_dir=self.output_dir, transformer=transformer, ema_state=ema_state,
                                parts=self.parts, card=card, sample_images=samples, check=self.stop.check)
        except Abandoned:
            raise self.stop.error(f"during export (final/ was left as it was); {redo}", self.step) from None
        self._write_run_json(status="finished")
        self._write_report()

    def _report_link(self) -> dict[str, str]:
        """Where the model card links the report: beside final/ in the output folder, and under run/ in the Hub repo."""
        from ..hub.upload import RUN_DIR

        links = {"in the output folder, beside final/": f"../{report.REPORT}"}
        if self.cfg.push_to_hub:
            links["in the Hub repo"] = f"{RUN_DIR}/{report.REPORT}"
        return links

    def _eval_summary(self) -> dict:
        return {"start": self.eval_start, "start_step": self.state.eval_first["step"], "end": self.eval_end, "end_step": self.step}

    def close(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not inflight[0].reported:  # ending on an error: the checkpoint being written lands
            bg, config_hash, t0, stall = inflight
            try:
                path = bg.result()
            except Exception as exc:  # noqa: BLE001 - the error that ends the run is the one to report
                log.warning("checkpoint-%d could not be written (%s); earlier checkpoints are intact", bg.step, exc)
            else:
                bg.reported = True
                self._saved(path, bg.step, config_hash, bg.finished - t0, stall)  # logged, and queued for the Hub
        tracker, self.tracker = getattr(self, "tracker", None), None
        if tracker is not None:
            tracker.close()


# What a run writes into output_dir (set aside as a whole when a fresh run starts there).
RUN_OUTPUTS = ("checkpoints", "final", "validation", "metrics.jsonl", "run.json", "data_report.json", report.REPORT,
               report.PLOTS_DIR,
               "transformer.safetensors", "transformer_ema.safetensors", "adapter.safetensors", "adapter_ema.safetensors",
               runinfo.COMPLETE_MARKER, ".hub-uploads.json",
               *(spec.folder for spec in tracking.TRACKERS.values() if spec.folder))


def _moved_workspace(config: dict, saved_root: str | None, root: Path) -> dict:
    """A checkpoint's config with paths under the workspace it was written in moved to this run's workspace
    (a checkpoint from the Hub, or a volume mounted elsewhere, names the same files)."""
    if not saved_root or Path(saved_root) == root:
        return config
    old = saved_root.rstrip("/") + "/"
    return {k: f"{root}/{v[len(old):]}" if isinstance(v, str) and v.startswith(old) else v for k, v in config.items()}


def _set_aside_earlier_run(output_dir: Path) -> None:
    """resume_from_checkpoint=none in a used output folder: the earlier run's files move to
    previous-runs/<time>/ (nothing is deleted, and `latest` can never pick its checkpoints up)."""
    earlier = [output_dir / name for name in RUN_OUTPUTS if os.path.lexists(output_dir / name)]
    if not earlier:
        return
    target = output_dir / "previous-runs" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{n}")
        n += 1
    target.mkdir(parents=True)
    for path in earlier:
        os.replace(path, target / path.name)
    log.warning("resume_from_checkpoint=none: this output folder held an earlier run; its files (%s) were moved "
                "to %s, nothing was deleted", ", ".join(sorted(p.name for p in earlier)), target)


def _last_colour_score(metrics: Path, step: int) -> dict | None:
    """The demo's colour score last logged at or before `step` (a resumed run's run.json keeps reporting it)."""
    lines = [line for line in report.read_metrics(metrics) if "colour_score_shape" in line and line.get("step", 0) <= step]
    if not lines:
        return None
    line = lines[-1]
    prompts = len(demo.HELD_OUT)
    return {"step": line["step"], "background": line["colour_score_background"], "shape": line["colour_score_shape"],
            "prompts": prompts, "seeds": HELD_OUT_SEEDS, "pictures": prompts * HELD_OUT_SEEDS, "chance": report.CHANCE}


def _dataset_summary(backend_id: str, samples: list) -> dict:
    """Per dataset: sample count and a fingerprint of exactly what was trained (pixels + captions)."""
    import hashlib

    from ..data.images import sample_key

    digest = hashlib.sha256()
    for sample in sorted(samples, key=sample_key):
        digest.update(f"{sample_key(sample)}\t{sample.caption}\n".encode())
    return {"id": backend_id, "samples": len(samples), "fingerprint": digest.hexdigest()}


UPLOAD_STOPPED = (f"the upload is recorded as pending in {runinfo.COMPLETE_MARKER} and the queue is kept: the next start "
                  "uploads again (without training)")


def train(resolved: Resolved, stop: StopFlag | None = None) -> None:
    """The whole job. `stop` is the installed StopFlag (the CLI installs it before the heavy imports)."""
    owned = stop is None
    stop = stop or StopFlag().install()
    uploads = None
    try:
        cfg = resolved.config
        output_dir = Path(cfg.output_dir)
        with stop.immediate("the rendezvous with the other processes", "nothing to save yet"):
            ranks = _join(resolved)
        restarted = max(ranks.gather(resolved.topology.restart))
        if restarted and checkpoints.starts_fresh(cfg.resume_from_checkpoint):
            # A machine that joins a restarting group (a replaced node) continues the job like the others.
            log.info("resume_from_checkpoint=%s applies to the job's first start; this group is restarting: latest",
                     cfg.resume_from_checkpoint)
            resolved = dataclasses.replace(resolved, config=dataclasses.replace(cfg, resume_from_checkpoint="latest"))
            cfg = resolved.config
        if checkpoints.starts_fresh(cfg.resume_from_checkpoint):
            # Before anything reads this output (the upload queue included): the earlier run moves aside whole,
            # on every output disk of the job.
            if ranks.writes_checkpoints:
                _set_aside_earlier_run(output_dir)
            ranks.barrier()
        if cfg.push_to_hub and ranks.is_main:  # rank 0 owns every push
            from ..hub.upload import Uploader

            uploads = Uploader(resolved, output_dir).start()
        elif ranks.is_main:
            from ..hub.upload import QUEUE_FILE, queued

            left = queued(output_dir)
            if left:
                log.warning("push_to_hub is off: %d upload(s) queued by an earlier start (%s) are not sent; they stay in "
                            "%s for a start with push_to_hub: true", len(left), ", ".join(left), QUEUE_FILE)
        # Rank 0's output decides whether the job is already done, for every rank.
        earlier = ranks.broadcast(_earlier_run(resolved) if ranks.is_main else None)
        if earlier is None:
            _train_and_publish(resolved, stop, uploads, ranks)
        elif earlier[0] == "upload" and uploads is not None:  # rank 0 uploads; the other ranks have nothing to do
            log.info("this run already finished at step %d; uploading what the Hub lacks without retraining or "
                     "re-exporting", earlier[1])
            with stop.immediate("the Hub upload", UPLOAD_STOPPED):
                _publish(resolved, output_dir, earlier[1], uploads)
    finally:
        if uploads is not None:
            uploads.close()
        if owned:
            stop.restore()


def _join(resolved: Resolved) -> group.World:
    """This rank's process group and World (a World of one for a single process), the disks probed."""
    from ..data.backends import load_data_config

    topology, cfg = resolved.topology, resolved.config
    if topology.role != "worker":
        return group.World()
    group.join(topology, torch.cuda.is_available(), cfg.rendezvous_timeout_s)
    workspace = resolved.workspace
    data_folders = [workspace.root, workspace.hf_home, workspace.cache_dir]
    with contextlib.suppress(ApplianceError, OSError):  # a broken config is reported (on every rank) by the Run
        backends, text = load_data_config(cfg.data_backend_config, workspace)
        data_folders += [b.cache_dir_vae for b in backends] + [text.cache_dir]
    return group.describe(topology, data_folders, Path(cfg.output_dir))


def _earlier_run(resolved: Resolved) -> tuple[str, int] | None:
    """What this output already holds: ("done", step) for a finished job with nothing to do, ("upload", step) for one
    that only lacks its upload, None when there is training (or export) to do."""
    from ..hub import upload

    cfg = resolved.config
    output_dir = Path(cfg.output_dir)
    record = runinfo.completion_record(output_dir, cfg)
    if record is None:
        return None
    done = record["step"]
    if not upload.wanted(resolved, record.get("upload")):
        # A restarted container (RunPod/Vast restart policies) must not retrain or re-upload.
        log.info("this run already finished at step %d: outputs are in %s. Nothing to do; raise max_train_steps "
                 "to train further, or set resume_from_checkpoint=none to start over.", done, output_dir)
        pushed = record.get("upload")
        if isinstance(pushed, dict) and pushed.get("status") == "uploaded":
            log.info("final/ is on the Hub: %s at %s (commit %s)", pushed.get("repo"), pushed.get("endpoint"),
                     pushed.get("commit"))
        elif isinstance(pushed, dict):
            log.warning("final/ was not pushed to %s (%s); set push_to_hub=true to upload it", pushed.get("repo"),
                        pushed.get("status"))
        return ("done", done)
    problems = upload.end_problems(output_dir)
    if problems:
        log.warning("this run finished at step %d but its export is incomplete (%s): exporting it again from the "
                    "last checkpoint before uploading", done, "; ".join(problems))
        return None
    return ("upload", done)


def _train_and_publish(resolved: Resolved, stop: StopFlag, uploads, ranks: group.World) -> None:
    run = Run(resolved, stop, uploads, ranks)
    try:
        # Nothing to save until training starts; caching runs deferred inside (it checks per batch).
        with stop.immediate("setup (download, model load, dataset scan)", "nothing to save yet"):
            run.setup()
        run.train()
        run.finish()
        run.close()  # trackers flushed before the upload, which a signal may end abruptly
        if uploads is not None:
            with stop.immediate("the Hub upload", UPLOAD_STOPPED):
                _publish(resolved, run.output_dir, run.step, uploads)
        elif run.is_main:
            runinfo.mark_complete(run.output_dir, resolved.config, run.step)
    except ApplianceError:
        raise
    except Exception as exc:
        if not stop.requested:
            raise
        # E.g. a peer rank that stopped first closed the process group under this one: the
        # stop, not this error, is what happened.
        log.warning("after the stop request: %s: %s", type(exc).__name__, exc)
        raise stop.error("while the other processes were stopping") from None
    finally:
        run.close()


def _publish(resolved: Resolved, output_dir: Path, step: int, uploads) -> None:
    """Mark the run complete, queue the run's records and final/, and wait for the queue (hub_upload_wait_s).
    The marker says `pending` while the queue drains, `uploaded` when all of it is on the Hub, and `failed`
    (exit 6, with the list of what is unsent) otherwise, so the next start uploads without retraining."""
    cfg = resolved.config
    from ..hub import upload

    runinfo.mark_complete(output_dir, cfg, step, upload=upload.pending(resolved))
    uploads.add("progress")
    uploads.add("final")
    log.info("uploading to the Hub repo %s at %s: %s", cfg.hub_model_id, upload.hub_endpoint(resolved),
             ", ".join(uploads.pending()))
    unsent = uploads.drain(cfg.hub_upload_wait_s, why="at the end of the run")
    if unsent:
        error = uploads.unsent_error(unsent, waited_s=cfg.hub_upload_wait_s)
        record = {**upload.failed(resolved, unsent[0].split(": ", 1)[-1]), "unsent": [u.split(":", 1)[0] for u in unsent]}
        runinfo.mark_complete(output_dir, cfg, step, upload=record)
        raise error
    runinfo.mark_complete(output_dir, cfg, step, upload={**upload.pending(resolved), "status": "uploaded",
                                                         "commit": uploads.last_commit})
    log.info("everything is on the Hub: %s (commit %s)", cfg.hub_model_id, uploads.last_commit or "unchanged")
