"""One training step as a function: forward, flow-matching loss, backward, clip, optimizer, EMA.

:func:`train_step` advances a :class:`~sana_appliance.run.state.TrainState` by one optimizer
step over ``gradient_accumulation_steps`` micro-batches and returns the step's metrics as
tensors (plus the learning rate it applied). Whether to log, checkpoint, validate or stop is
the loop's business (``Run.train``); nothing here logs or touches the disk.

Random draws, in this order per micro-batch, all from ``state.generator``: caption dropout,
sigmas, noise. The order is part of reproducibility (a resumed run continues the same stream).
With several processes every rank holds the same generator and draws for the whole global
batch (``world`` x the batch), then takes its own slice: N processes x batch B draw exactly
what 1 process x batch N*B draws, and a resume on another process count continues the stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..model.flow import FlowSchedule
from .state import TrainState


@dataclass
class StepSetup:
    """What a step computes with; built once per run."""

    cfg: Any
    model: torch.nn.Module  # runs the forward pass (the data-parallel wrapper when world > 1)
    parts: Any  # model.parts.SanaParts: the VAE for uncached pixels, the VAE scale factor
    schedule: FlowSchedule
    device: torch.device
    compute_dtype: torch.dtype  # autocast dtype (fp32: no autocast)
    weight_dtype: torch.dtype  # the trained weights' dtype
    empty: tuple[torch.Tensor, torch.Tensor]  # the empty caption's (embeds, mask), for caption dropout
    no_sync: Callable[[], Any] = contextlib.nullcontext  # skips the gradient all-reduce of a non-final micro-batch
    rank: int = 0  # this process's slice of the global batch
    world: int = 1  # processes, each with one slice
    sharded: bool = False  # FSDP: parameters and gradients are DTensor shards (the norm is summed over them)
    params: list[torch.nn.Parameter] | None = None  # the trained parameters (listed once: walking the modules costs)
    skip_on_device: bool = False  # the optimizer skips a non-finite step on the device (optimizers.skips_on_device)


def flow_loss(setup: StepSetup, batch: dict, generator: torch.Generator, sigmas: torch.Tensor | None = None,
              dropout: bool = True) -> torch.Tensor:
    """The flow-matching MSE of one batch (latents or pixels, caption embeddings and masks)."""
    cfg = setup.cfg
    if "pixels" in batch:
        with torch.no_grad():
            vae = setup.parts.vae.to(setup.device)
            latents = vae.encode(batch["pixels"].to(setup.device, torch.float32)).latent * vae.config.scaling_factor
    else:
        latents = batch["latents"].to(setup.device, torch.float32, non_blocking=True)  # pinned by the DataLoader
    embeds, mask = batch["embeds"], batch["mask"]
    n = latents.shape[0]
    # Draws for the global batch; this rank's are rows [lo, hi). (Eval passes its own sigmas and one rank.)
    world = setup.world if sigmas is None else 1
    lo, hi = (setup.rank * n, (setup.rank + 1) * n) if world > 1 else (0, n)
    if dropout and cfg.caption_dropout_probability > 0:
        drop = (torch.rand(n * world, generator=generator) < cfg.caption_dropout_probability)[lo:hi]
        if drop.any():
            empty_e, empty_m = setup.empty
            embeds, mask = embeds.clone(), mask.clone()
            embeds[drop], mask[drop] = empty_e.to(embeds.dtype), empty_m
    if sigmas is None:
        h, w = latents.shape[-2] * setup.parts.vae_scale_factor, latents.shape[-1] * setup.parts.vae_scale_factor
        sigmas = setup.schedule.sample_sigmas(n * world, generator, setup.schedule.shift_for(h, w))[lo:hi]
    noise = torch.randn((n * world, *latents.shape[1:]), generator=generator, dtype=torch.float32)[lo:hi]
    if setup.device.type == "cuda":  # drawn on the CPU (the generator is saved in checkpoints); copied without a wait
        noise = noise.pin_memory()
        sigmas = sigmas.pin_memory() if sigmas.device.type == "cpu" else sigmas
    noise = noise.to(setup.device, non_blocking=True)
    sigmas = sigmas.to(setup.device, non_blocking=True)
    noisy, target = setup.schedule.noisy_and_target(latents, noise, sigmas)
    with torch.autocast(setup.device.type, dtype=setup.compute_dtype, enabled=setup.compute_dtype != torch.float32):
        pred = setup.model(noisy.to(setup.weight_dtype),
                           encoder_hidden_states=embeds.to(setup.device, setup.weight_dtype, non_blocking=True),
                           encoder_attention_mask=mask.to(setup.device, non_blocking=True), timestep=sigmas * 1000,
                           return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def train_step(setup: StepSetup, state: TrainState, batches: Iterator[dict],
               before_update: Callable[[], None] | None = None) -> dict[str, Any]:
    """One optimizer step over the next ``gradient_accumulation_steps`` batches.

    Returns ``loss`` and ``grad_norm`` (tensors), ``lr`` (the rate this step applied), ``finite`` and
    ``deferred``. A non-finite loss or gradient skips the update (the scaler still updates, the schedule
    and EMA do not move); the caller counts it. ``state.step`` is not advanced here.

    Where the optimizer skips on the device (``setup.skip_on_device``), nothing here waits for the
    device: ``finite`` is a 0-dim bool tensor, the optimizer and the EMA apply or skip the update on the
    device, and ``deferred`` is True: the caller reads ``finite`` later (at the next step's
    ``before_update``, which runs after that step's backward and before its rates are read, or at a
    log, checkpoint or stop) and then advances the schedule (:func:`settle`). Otherwise ``finite`` is
    read here (one wait for the device) and is a bool.
    """
    cfg = setup.cfg
    accumulation = cfg.gradient_accumulation_steps
    losses = []
    for micro in range(accumulation):
        batch = next(batches)
        last = micro == accumulation - 1
        with contextlib.nullcontext() if last else setup.no_sync():
            loss = flow_loss(setup, batch, state.generator)
            state.scaler.scale(loss / accumulation).backward()
        losses.append(loss.detach())
    loss = losses[0] if accumulation == 1 else torch.stack(losses).mean()
    state.scaler.unscale_(state.optimizer)
    trained = setup.params if setup.params is not None else list(state.transformer.parameters())
    params = [p for p in trained if p.grad is not None]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    if setup.sharded:
        from ..distributed import fsdp

        grad_norm = fsdp.grad_norm_and_clip(params, max_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)  # decided on the device
    if before_update is not None:
        before_update()  # the caller settles the previous step (its schedule step comes before this step's rate)
    lr = state.lr_scheduler.get_last_lr()[0]  # the rate this step applies (read before the schedule moves on)
    deferred = setup.skip_on_device and not state.scaler.is_enabled()
    if deferred:
        from ..model.optimizers import step_unless

        step_unless(state.optimizer, (~finite).float())
        if state.ema is not None:
            state.ema.update(state.transformer, applied=finite)
        if finite.device.type == "cuda":  # copied out without a wait; settle waits for this event only
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            finite_host = (host, event)
        else:
            finite_host = None
    else:
        finite = bool(finite)  # the one wait for the device
        if finite:
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.lr_scheduler.step()
            if state.ema is not None:
                state.ema.update(state.transformer)
        else:
            state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite, "deferred": deferred}
    if deferred and finite_host is not None:
        out["finite_host"] = finite_host
    return out


def settle(state: TrainState, out: dict[str, Any]) -> bool:
    """The host's part of a step whose update was decided on the device (``out["deferred"]``): read
    ``finite`` (by now long computed) and, for an applied update, advance the schedule and count the EMA
    update. Returns whether the step was finite. Idempotent per ``out``."""
    if not out["deferred"]:
        return bool(out["finite"])
    if "settled" not in out:
        if "finite_host" in out:  # CUDA: wait for the flag's copy only (a read of the tensor would wait for all)
            host, event = out["finite_host"]
            event.synchronize()
            finite = bool(host)
        else:
            finite = bool(out["finite"])
        out["settled"] = finite
        if finite:
            state.lr_scheduler.step()
            if state.ema is not None:
                state.ema.num_updates += 1
    return out["settled"]
