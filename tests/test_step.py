"""The step without host waits: a non-finite step skipped on the device and settled later, exactly as the
host-checked step would have done it (run/step.py, model/optimizers.py, model/ema.py).

Run: pytest tests/test_step.py   (seconds)
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sana_appliance.config.schema import TrainConfig
from sana_appliance.model import optimizers
from sana_appliance.model.ema import EMA
from sana_appliance.model.precision import ExtendedPrecision
from sana_appliance.run import step as step_module
from sana_appliance.run.state import TrainState


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value back to the host (aten._local_scalar_dense: item(), bool(), a
    0-dim tensor turned into a Python number), the wait a GPU step must not have."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _linear(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4)).to(dtype)


def _cfg(dtype: torch.dtype, **changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), optimizer="adamw", learning_rate=1e-2,
                               mixed_precision="bf16" if dtype == torch.bfloat16 else "no", **changes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_device_skip_and_the_ema_read_nothing_back_to_the_host(dtype):
    model = _linear(dtype)
    opt = optimizers.build_optimizer(_cfg(dtype), model.parameters())
    ema = EMA(model, 0.9)
    model(torch.randn(2, 8, dtype=dtype)).float().pow(2).mean().backward()
    flag = torch.tensor(True)
    with HostReads() as reads:
        optimizers.step_unless(opt, (~flag).float())
        ema.update(model, applied=flag)
    assert reads.count == 0
    with HostReads() as reads:  # the probe sees a read when there is one
        bool(flag)
    assert reads.count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_state_of_a_non_fused_build_loads_and_still_skips_on_the_device(dtype):
    """Checkpoints written before AdamW was fused hold fused=None in their param groups, which torch's
    load_state_dict would restore (and the found_inf skip would then fail): load_optimizer_state keeps this
    build's kernel flags, and the loaded optimizer skips a NaN step exactly."""
    cfg = _cfg(dtype)
    model = _linear(dtype)
    old = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)  # how adamw was built before
    if dtype == torch.bfloat16:
        old = ExtendedPrecision(old, residual_bits=8, seed=cfg.seed, max_working_elements=1 << 25)
    for _ in range(2):
        old.zero_grad(set_to_none=True)
        model(torch.randn(4, 8, dtype=dtype)).float().pow(2).mean().backward()
        old.step()
    saved = old.state_dict()
    plain = optimizers.build_optimizer(cfg, model.parameters())
    plain.load_state_dict(saved)
    assert not optimizers.skips_on_device(plain)  # the trap: the saved flags switch the fused kernel off
    new = optimizers.build_optimizer(cfg, model.parameters())
    optimizers.load_optimizer_state(new, saved)
    assert optimizers.skips_on_device(new)
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    optimizers.step_unless(new, torch.tensor(1.0))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    new.zero_grad(set_to_none=True)
    model(torch.randn(4, 8, dtype=dtype)).float().pow(2).mean().backward()
    optimizers.step_unless(new, torch.tensor(0.0))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


POISONED = {2, 3, 7, 8, 9, 14}  # steps whose loss is NaN


def _drive(monkeypatch, on_device: bool, logging_steps: int, steps: int = 16):
    """train_step + settle driven the way Run.train drives them (before_update, a settle after each step when
    the check was on the host, at each log step and at the end), on a small model with NaN losses at POISONED."""

    def loss_of(setup, batch, generator, sigmas=None, dropout=True):
        loss = setup.model(batch["x"]).float().pow(2).mean()
        return loss * float("nan") if batch["poisoned"] else loss

    monkeypatch.setattr(step_module, "flow_loss", loss_of)
    cfg = _cfg(torch.float32, lr_scheduler="cosine", lr_warmup_steps=4, max_grad_norm=1.0)
    model = _linear(torch.float32)
    opt = optimizers.build_optimizer(cfg, model.parameters())
    state = TrainState(transformer=model, optimizer=opt, lr_scheduler=optimizers.build_lr_scheduler(cfg, opt, steps),
                       scaler=torch.amp.GradScaler("cpu", enabled=False), generator=torch.Generator().manual_seed(0),
                       sampler=None, ema=EMA(model, 0.9))
    setup = step_module.StepSetup(cfg=cfg, model=model, parts=None, schedule=None, device=torch.device("cpu"),
                                  compute_dtype=torch.float32, weight_dtype=torch.float32, empty=None,
                                  no_sync=contextlib.nullcontext, params=list(model.parameters()),
                                  skip_on_device=on_device and optimizers.skips_on_device(opt))
    data = torch.Generator().manual_seed(1)
    batches = ({"x": torch.randn(8, 8, generator=data), "poisoned": i in POISONED} for i in range(1, 10**6))
    pending, skipped, rates, deferred = [], [], [], []

    def settle():
        while pending:
            number, out = pending.pop()
            if not step_module.settle(state, out):
                skipped.append(number)

    for number in range(1, steps + 1):
        out = step_module.train_step(setup, state, batches, before_update=settle)
        pending.append((number, out))
        deferred.append(out["deferred"])
        if not out["deferred"]:
            settle()
        rates.append(out["lr"])
        if number % logging_steps == 0:
            settle()
    settle()
    return {"rates": rates, "last_epoch": state.lr_scheduler.last_epoch, "ema_updates": state.ema.num_updates,
            "skipped": skipped, "weights": [p.detach().clone() for p in model.parameters()],
            "ema": [t.clone() for t in state.ema.shadow.values()], "deferred": set(deferred)}


def test_settling_later_gives_the_schedule_ema_and_skips_of_the_host_checked_step(monkeypatch):
    """Skips decided on the device and settled at the next step (logging every 4 steps) apply, step for step,
    the rates, schedule position, EMA count, skip list, weights and EMA of the step that waited for the host."""
    host = _drive(monkeypatch, on_device=False, logging_steps=1)
    device = _drive(monkeypatch, on_device=True, logging_steps=4)
    assert host["deferred"] == {False} and device["deferred"] == {True}
    assert device["rates"] == host["rates"] and len(set(host["rates"])) > 4  # warmup and cosine: rates move
    assert device["last_epoch"] == host["last_epoch"] == 16 - len(POISONED)
    assert device["ema_updates"] == host["ema_updates"] == 16 - len(POISONED)
    assert device["skipped"] == host["skipped"] == sorted(POISONED)
    assert all(torch.equal(a, b) for a, b in zip(device["weights"], host["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(device["ema"], host["ema"]))
