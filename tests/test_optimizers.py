"""Optimizers, bf16 update fidelity, optimizer/EMA state round-trips and LR schedules.

Run: OMP_NUM_THREADS=1 pytest tests/test_optimizers.py -q

The fidelity tests train a tiny diffusers SanaTransformer2DModel (1 block, 3.9k
params) for 200 steps at LR 1e-5 on a fixed loss and compare how far the weights
moved with an fp32 run of the same optimizer: bf16 weights must move within 10% of
it. A negative control shows plain bf16 AdamW failing the same check.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from sana_appliance.benchmarks.gpu import SANA_1600M_PARAMETERS, VRAM_BUDGET_GIB
from sana_appliance.config import presets
from sana_appliance.config.resolve import CliArgs, resolve
from sana_appliance.config.schema import TrainConfig
from sana_appliance.core.errors import ConfigError
from sana_appliance.model.ema import EMA
from sana_appliance.model.optimizers import (
    EXTENDED,
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    fixed_bytes_per_param,
    optimizer_state_bytes_per_param,
    skips_on_device,
    step_unless,
    weight_dtype,
)
from sana_appliance.model.precision import ExtendedPrecision

FIDELITY_LR = 1e-5
FIDELITY_STEPS = 200
TOLERANCE = 0.10
# bitsandbytes keeps tensors under 4096 elements in 32-bit state; the tiny model's
# tensors are all smaller, so tests lower the threshold to exercise the 8-bit path.
MIN_8BIT = 0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sana(dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        num_layers=1, num_attention_heads=2, attention_head_dim=4, cross_attention_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=4, caption_channels=8,
        in_channels=4, out_channels=4, patch_size=1, sample_size=8, norm_elementwise_affine=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.to(dtype)


def fixed_batches(num: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """Deterministic flow-matching-shaped batches, identical for every run."""
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 3, 8, generator=g),
         torch.rand(1, generator=g) * 1000, torch.randn(1, 4, 4, 4, generator=g))
        for _ in range(num)
    ]


def loss_and_backward(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> float:
    x, enc, t, target = batch
    dtype = next(model.parameters()).dtype
    out = model(x.to(dtype), encoder_hidden_states=enc.to(dtype), timestep=t).sample
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    return loss.item()


def params_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def movement(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> float:
    """||w_end - w_start|| over all parameters, in fp64."""
    return math.sqrt(sum(((p.detach().double() - start[n].double()) ** 2).sum().item()
                         for n, p in model.named_parameters()))


def train_movement(cfg: TrainConfig, dtype: torch.dtype, make_optimizer=None) -> float:
    """Weight movement after FIDELITY_STEPS steps of the tiny Sana on the fixed batches."""
    model = tiny_sana(dtype)
    start = params_snapshot(model)
    opt = (make_optimizer or (lambda ps: build_optimizer(cfg, ps, min_8bit_size=MIN_8BIT)))(model.parameters())
    batches = fixed_batches()
    for step in range(FIDELITY_STEPS):
        opt.zero_grad(set_to_none=True)
        loss_and_backward(model, batches[step % len(batches)])
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return movement(model, start)


@pytest.fixture(scope="module")
def fidelity_runs():
    """train_movement(cfg at LR 1e-5, dtype), computed once per distinct optimizer setup
    (presets that share a setup, and the negative control, reuse runs)."""
    cache: dict[tuple, float] = {}

    def get(cfg: TrainConfig, dtype: torch.dtype) -> float:
        cfg = dataclasses.replace(cfg, mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
                                  learning_rate=FIDELITY_LR)
        key = (cfg.optimizer, dtype, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_weight_decay, cfg.adam_epsilon, cfg.seed)
        if key not in cache:
            cache[key] = train_movement(cfg, dtype)
        return cache[key]

    return get


def preset_config(name: str, tmp_path) -> TrainConfig:
    return resolve({"PRESET": name, "WORKSPACE": str(tmp_path)}, CliArgs()).config


# ------------------------------------------------------------------ fidelity


@pytest.mark.parametrize("preset", presets.available())
def test_preset_optimizer_keeps_every_update(preset, tmp_path, fidelity_runs):
    """Each preset's (optimizer, weight dtype) moves weights like fp32 at LR 1e-5."""
    cfg = preset_config(preset, tmp_path)
    reference = fidelity_runs(cfg, torch.float32)
    candidate = fidelity_runs(cfg, weight_dtype(cfg))
    assert reference > 100 * FIDELITY_LR  # the loss really moves the weights
    assert abs(candidate / reference - 1) < TOLERANCE, (preset, cfg.optimizer, candidate, reference)


def test_plain_bf16_adamw_fails_the_fidelity_check(fidelity_runs):
    """Negative control: torch AdamW straight on bf16 weights loses most updates."""
    cfg = dataclasses.replace(TrainConfig(), optimizer="adamw", learning_rate=FIDELITY_LR)
    reference = fidelity_runs(cfg, torch.float32)
    plain = train_movement(cfg, torch.bfloat16, lambda ps: torch.optim.AdamW(
        ps, lr=FIDELITY_LR, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=0.0))
    assert plain / reference < 1 - TOLERANCE, (plain, reference)


def random_gradient_movement(optimizer_factory, dtype: torch.dtype, steps: int = FIDELITY_STEPS) -> float:
    """Movement under a fixed stream of random gradients with a consistent direction.

    Covers every optimizer name cheaply: the weights are the tiny Sana's initial
    values (real magnitudes) in ONE flat tensor, which avoids the per-tensor overhead
    of bitsandbytes on CPU, and the gradients do not depend on the weights, so bf16
    and fp32 runs see the same gradients (rounded to the weight dtype)."""
    flat = torch.cat([p.detach().reshape(-1) for p in tiny_sana(torch.float32).parameters()])
    weight = torch.nn.Parameter(flat.to(dtype))
    start = weight.detach().double().clone()
    opt = optimizer_factory([weight])
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(weight.shape, generator=g)
    for _ in range(steps):
        weight.grad = (direction + 0.5 * torch.randn(weight.shape, generator=g)).to(dtype)
        opt.step()
    assert torch.isfinite(weight).all()
    return (weight.detach().double() - start).norm().item()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_keeps_every_update_in_bf16(name):
    cfg = dataclasses.replace(TrainConfig(), optimizer=name, learning_rate=FIDELITY_LR, adam_weight_decay=0.01)
    reference = random_gradient_movement(lambda ps: build_optimizer(cfg, ps, min_8bit_size=MIN_8BIT), torch.float32)
    bf16 = random_gradient_movement(lambda ps: build_optimizer(cfg, ps, min_8bit_size=MIN_8BIT), torch.bfloat16)
    assert abs(bf16 / reference - 1) < TOLERANCE, (name, bf16, reference)


def test_plain_bf16_lion8bit_fails_the_fidelity_check():
    """Negative control for the 8-bit Lion path: bitsandbytes alone on bf16 weights."""
    import bitsandbytes as bnb

    def make(ps):
        return bnb.optim.Lion8bit(ps, lr=FIDELITY_LR, betas=(0.9, 0.99), min_8bit_size=MIN_8BIT)

    ratio = random_gradient_movement(make, torch.bfloat16) / random_gradient_movement(make, torch.float32)
    assert ratio < 1 - TOLERANCE, ratio


# ------------------------------------------------------------------ smoke


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_trains_tiny_sana(name, dtype):
    # LR 1e-2 so that every stored bf16 weight changes (smaller updates may sit in the
    # extra precision bits until they add up to a bf16 step, which is the point).
    cfg = dataclasses.replace(TrainConfig(), optimizer=name, learning_rate=1e-2)
    model = tiny_sana(dtype)
    start = params_snapshot(model)
    opt = build_optimizer(cfg, model.parameters(), min_8bit_size=MIN_8BIT)
    batches = fixed_batches()
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss_and_backward(model, batches[step % len(batches)])
        opt.step()
    for n, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.isfinite(p).all(), n
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), start[n])]
    assert len(moved) == len(start), sorted(set(start) - set(moved))
    assert isinstance(opt, ExtendedPrecision) == (dtype == torch.bfloat16 and OPTIMIZERS[name].bf16_policy == EXTENDED)


def test_chunked_steps_match_one_big_step():
    """Bounding the fp32 working copies (chunks) changes nothing, bit for bit."""
    cfg = dataclasses.replace(TrainConfig(), optimizer="adamw8bit")
    results = []
    for max_elements in (1 << 25, 100):
        model = tiny_sana(torch.bfloat16)
        opt = build_optimizer(cfg, model.parameters(), min_8bit_size=MIN_8BIT, max_working_elements=max_elements)
        for batch in fixed_batches(3):
            opt.zero_grad(set_to_none=True)
            loss_and_backward(model, batch)
            opt.step()
        results.append(params_snapshot(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


# ------------------------------------------------------------------ state round-trip


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact(name, dtype):
    """Steps after save + load into fresh objects equal the steps of an uninterrupted run."""
    cfg = dataclasses.replace(TrainConfig(), optimizer=name, learning_rate=1e-3, lr_warmup_steps=3,
                              lr_scheduler="cosine", adam_weight_decay=0.01)
    batches = fixed_batches(5)

    def train(model, opt, sched, steps):
        for batch in steps:
            opt.zero_grad(set_to_none=True)
            loss_and_backward(model, batch)
            opt.step()
            sched.step()

    model = tiny_sana(dtype)
    opt = build_optimizer(cfg, model.parameters(), min_8bit_size=MIN_8BIT)
    sched = build_lr_scheduler(cfg, opt, num_training_steps=10)
    train(model, opt, sched, batches[:3])
    saved = _round_trip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    train(model, opt, sched, batches[3:])

    resumed = tiny_sana(dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(cfg, resumed.parameters(), min_8bit_size=MIN_8BIT)
    sched2 = build_lr_scheduler(cfg, opt2, num_training_steps=10)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(resumed, opt2, sched2, batches[3:])

    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    if isinstance(opt2, ExtendedPrecision):  # the schedule still reaches the inner optimizer
        assert opt2.inner.param_groups[0]["lr"] == opt.inner.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_adamw_state_stays_fp32_for_bf16_weights_after_load():
    """torch casts loaded state to the param dtype; the fp32 moments must survive that."""
    cfg = dataclasses.replace(TrainConfig(), optimizer="adamw")
    model = tiny_sana(torch.bfloat16)
    opt = build_optimizer(cfg, model.parameters())
    loss_and_backward(model, fixed_batches(1)[0])
    opt.step()
    opt.load_state_dict(_round_trip(opt.state_dict()))
    p = next(model.parameters())
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def _tensor_bytes(obj, found: dict[int, int]) -> dict[int, int]:
    """Bytes of every distinct tensor inside obj (nested dicts), keyed by storage pointer."""
    if isinstance(obj, torch.Tensor):
        found[obj.data_ptr()] = obj.numel() * obj.element_size()
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensor_bytes(value, found)
    return found


def test_state_bytes_table_matches_measured_state():
    """optimizer_state_bytes_per_param (used for memory/disk estimates) is the real size."""
    for name in OPTIMIZERS:
        for mixed, dtype in (("no", torch.float32), ("bf16", torch.bfloat16)):
            cfg = dataclasses.replace(TrainConfig(), optimizer=name, mixed_precision=mixed)
            weight = torch.nn.Parameter(torch.randn(512, 1024).to(dtype))
            opt = build_optimizer(cfg, [weight])
            weight.grad = torch.randn_like(weight)
            opt.step()
            found = _tensor_bytes(dict(opt.state), {})
            if isinstance(opt, ExtendedPrecision):
                _tensor_bytes(opt.state_dict()["residuals"], found)
            measured = sum(found.values()) / weight.numel()
            assert measured == pytest.approx(optimizer_state_bytes_per_param(cfg), abs=0.01), (name, mixed)


def _table_row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one table row for {first_cell}"
    return rows[0]


def test_documented_fixed_memory_matches_the_memory_model(tmp_path):
    """Every "GiB fixed" figure of a GPU preset (README table, preset file, docs/recipe.md) is the
    memory model's (optimizers.fixed_bytes_per_param x Sana 1.6B's parameters, to 0.1 GiB), and
    lowest-vram's fixed memory + its documented activations leave the headroom docs/recipe.md
    states within the 12 GiB the preset is for."""
    root = Path(__file__).resolve().parent.parent
    readme, recipe = (root / "README.md").read_text(), (root / "docs" / "recipe.md").read_text()
    fixed_gib = {}
    for name in ("lowest-vram", "24g", "multi-gpu"):
        cfg = preset_config(name, tmp_path)
        assert weight_dtype(cfg) == torch.bfloat16, name
        fixed_gib[name] = SANA_1600M_PARAMETERS * fixed_bytes_per_param(cfg) / 2**30
        preset = presets.load(name)
        header = "\n".join(line for line in preset.path.read_text().splitlines() if line.startswith("#"))
        documented = {
            "README presets table": re.findall(r"~([\d.]+) GiB fixed", _table_row(readme, f"`{name}`")),
            f"presets/{name}.yaml memory": re.findall(r"~([\d.]+) GiB fixed", preset.memory),
            f"presets/{name}.yaml header": re.findall(r"~([\d.]+) GiB fixed", header),
            "docs/recipe.md memory table": re.findall(r"\*\*([\d.]+) GiB\*\*", _table_row(recipe, f"`{name}`" + (
                " (per GPU)" if name == "multi-gpu" else ""))),
        }
        for where, figures in documented.items():
            assert figures and all(float(f) == round(fixed_gib[name], 1) for f in figures), (
                f"{where} says {figures} GiB fixed for {name}; the memory model gives {fixed_gib[name]:.2f}")
    activations = re.search(r"<([\d.]+) GiB activations", presets.load("lowest-vram").memory)
    headroom = re.search(r"leaves ~([\d.]+) GiB of a ([\d.]+) GiB card", recipe)
    assert activations and headroom
    budget = float(headroom.group(2))
    assert budget == VRAM_BUDGET_GIB
    left = budget - fixed_gib["lowest-vram"] - float(activations.group(1))
    assert round(left) == float(headroom.group(1)) and left > 2, left


def test_weight_dtype_policy():
    assert weight_dtype(dataclasses.replace(TrainConfig(), mixed_precision="bf16")) == torch.bfloat16
    assert weight_dtype(dataclasses.replace(TrainConfig(), mixed_precision="fp16")) == torch.float32
    assert weight_dtype(dataclasses.replace(TrainConfig(), mixed_precision="no")) == torch.float32


# ------------------------------------------------------------------ EMA


def test_ema_is_fp32_exact_decay_and_tracks_bf16_weights():
    model = tiny_sana(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    start = {n: t.clone() for n, t in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # about one bf16 spacing; the EMA moves 1e-5 per update
    target = {n: p.detach().float() for n, p in model.named_parameters()}
    for _ in range(10):
        ema.update(model)
    factor = 1 - 0.999**10  # no hidden warmup: exactly decay from the first update
    for n, t in ema.shadow.items():
        expected = start[n] + factor * (target[n] - start[n])
        assert torch.allclose(t, expected, atol=1e-6, rtol=0), n
    assert ema.num_updates == 10


def test_ema_update_in_groups_equals_one_lerp_per_parameter(monkeypatch):
    """The grouped foreach update (bf16 weights upcast a group at a time) computes what lerp_ per tensor does."""
    from sana_appliance.model import ema as ema_module

    model = tiny_sana(torch.bfloat16)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i % 7))
    reference, grouped = EMA(model, decay=0.9), EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    for name, p in model.named_parameters():
        reference.shadow[name].lerp_(p.detach().float(), 0.1)
    monkeypatch.setattr(ema_module, "UPDATE_GROUP_BYTES", 4096)  # many small groups
    grouped.update(model)
    assert not all(torch.equal(grouped.shadow[n], EMA(model, decay=0.9).shadow[n]) for n in grouped.shadow)
    assert all(torch.equal(grouped.shadow[n], reference.shadow[n]) for n in reference.shadow)


def _tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor in a (nested) state dict, in a fixed order."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors_of(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors_of(x)]
    return []


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_skips_a_nonfinite_step_on_the_device_bit_exactly(dtype):
    """adamw is fused (in bf16: inside ExtendedPrecision), so a non-finite step is skipped by the kernel from
    a flag on the device, with no host sync: with NaN gradients and found_inf=1 the weights, the optimizer state
    and the residuals keep every bit. With found_inf=0 it is a plain step. In fp32 the run then goes on exactly
    as one that never saw the skipped step; in bf16 only the rounding stream moved on."""
    import copy

    cfg = dataclasses.replace(TrainConfig(), optimizer="adamw", learning_rate=1e-3,
                              mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    skipping, plain = tiny_sana(dtype), tiny_sana(dtype)
    opts = [build_optimizer(cfg, m.parameters()) for m in (skipping, plain)]
    assert all(skips_on_device(o) for o in opts)
    assert isinstance(opts[0], ExtendedPrecision) == (dtype == torch.bfloat16)
    batches = fixed_batches()

    def both_step(batch) -> None:
        for model, opt in zip((skipping, plain), opts):
            opt.zero_grad(set_to_none=True)
            loss_and_backward(model, batch)
        step_unless(opts[0], torch.tensor(0.0))
        opts[1].step()

    for batch in batches[:3]:  # moments, step counts and residuals exist
        both_step(batch)
    assert _same_bits(list(skipping.parameters()), list(plain.parameters()))
    weights = [p.detach().clone() for p in skipping.parameters()]
    def kept_state() -> list[torch.Tensor]:  # all but the rounding stream's position (ExtendedPrecision)
        return _tensors_of({k: v for k, v in copy.deepcopy(opts[0].state_dict()).items() if k != "generator"})

    state = kept_state()
    for p in skipping.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_unless(opts[0], torch.tensor(1.0))
    assert _same_bits(list(skipping.parameters()), weights)
    assert _same_bits(kept_state(), state)
    both_step(batches[3])
    if dtype == torch.float32:
        assert _same_bits(list(skipping.parameters()), list(plain.parameters()))
    assert all(torch.isfinite(p).all() for p in skipping.parameters())


def test_only_fused_adamw_skips_on_the_device():
    """The optimizers without a found_inf path are stepped after one read of the flag (model.optimizers)."""
    model = tiny_sana(torch.bfloat16)
    for name in OPTIMIZERS:
        cfg = dataclasses.replace(TrainConfig(), optimizer=name, mixed_precision="bf16")
        assert skips_on_device(build_optimizer(cfg, model.parameters(), min_8bit_size=MIN_8BIT)) == (name == "adamw"), name


def test_ema_update_not_applied_keeps_the_shadow_exactly():
    """update(applied=False) (a step the optimizer skipped on the device) leaves every shadow bit and the
    count as they were; applied=True is the plain update, counted by the caller."""
    model = tiny_sana(torch.bfloat16)
    skipped, plain, masked = EMA(model, decay=0.9), EMA(model, decay=0.9), EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    before = {n: t.clone() for n, t in skipped.shadow.items()}
    skipped.update(model, applied=torch.tensor(False))
    assert all(torch.equal(skipped.shadow[n], before[n]) for n in before) and skipped.num_updates == 0
    plain.update(model)
    masked.update(model, applied=torch.tensor(True))
    assert all(torch.equal(masked.shadow[n], plain.shadow[n]) for n in before)
    assert not all(torch.equal(plain.shadow[n], before[n]) for n in before)


def test_ema_swapped_into_restores_training_weights_exactly():
    model = tiny_sana(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    ema.update(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_into(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n].to(torch.bfloat16)), n
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="validation failed"), ema.swapped_into(model):
        raise RuntimeError("validation failed")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ema_state_round_trip_and_export():
    """The state splits into safetensors-ready tensors + plain values (as the trainer
    saves it) and loads back exactly; export gives CPU tensors of the asked dtype."""
    from safetensors.torch import load, save

    model = tiny_sana(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update(model)
    state = ema.state_dict()
    tensors = load(save({k: v for k, v in state.items() if torch.is_tensor(v)}))
    plain = _round_trip({k: v for k, v in state.items() if not torch.is_tensor(v)})
    restored = EMA(tiny_sana(torch.bfloat16), decay=0.9)
    restored.load_state_dict({**tensors, **plain})
    ema.update(model)
    restored.update(model)
    assert restored.num_updates == 2
    assert all(torch.equal(ema.shadow[n], restored.shadow[n]) for n in ema.shadow)
    exported = ema.to_state_dict_for_export(torch.bfloat16)
    assert exported.keys() == dict(model.named_parameters()).keys()
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in exported.values())
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        EMA(torch.nn.Linear(2, 2), decay=0.9).load_state_dict(ema.state_dict())


# ------------------------------------------------------------------ LR schedule


def _lrs(cfg: TrainConfig, steps: int) -> list[float]:
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(4))])
    sched = build_lr_scheduler(cfg, opt, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "cosine", "linear"])
def test_lr_warmup_is_linear_then_follows_the_schedule(schedule):
    cfg = dataclasses.replace(TrainConfig(), mixed_precision="no", optimizer="adamw", learning_rate=1e-3,
                              lr_scheduler=schedule, lr_warmup_steps=10)
    lrs = _lrs(cfg, 50)
    assert lrs[:11] == pytest.approx([1e-3 * k / 10 for k in range(11)])
    if schedule.startswith("constant"):
        assert lrs[10:] == pytest.approx([1e-3] * 40)
    else:
        assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
        assert lrs[-1] < 1e-4


def test_lr_schedule_drives_the_bf16_wrapper():
    cfg = dataclasses.replace(TrainConfig(), optimizer="bnb-lion8bit", learning_rate=1e-3, lr_warmup_steps=4)
    weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = build_optimizer(cfg, [weight])
    sched = build_lr_scheduler(cfg, opt, num_training_steps=8)
    seen = []
    for _ in range(5):
        seen.append(opt.inner.param_groups[0]["lr"])
        weight.grad = torch.ones_like(weight)
        opt.step()
        sched.step()
    assert seen == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_lion8bit_on_cuda_is_faithful_and_resumes_exactly():
    import bitsandbytes as bnb

    cfg = dataclasses.replace(TrainConfig(), optimizer="bnb-lion8bit-paged", learning_rate=FIDELITY_LR)

    def gradients(weight, steps):
        g = torch.Generator(device="cuda").manual_seed(1)
        direction = torch.randn(weight.shape, device="cuda", generator=g)
        for _ in range(steps):
            yield (direction + 0.5 * torch.randn(weight.shape, device="cuda", generator=g)).to(weight.dtype)

    def new_weight(dtype):
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(1024, 1024, device="cuda").mul(0.3).to(dtype))

    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = new_weight(dtype)
        start = weight.detach().double().clone()
        opt = build_optimizer(cfg, [weight])
        for grad in gradients(weight, FIDELITY_STEPS):
            weight.grad = grad
            opt.step()
        moved[dtype] = (weight.detach().double() - start).norm().item()
    assert isinstance(opt.inner, bnb.optim.PagedLion8bit)
    assert abs(moved[torch.bfloat16] / moved[torch.float32] - 1) < TOLERANCE, moved

    # resume: the rounding's step count and the residuals round-trip bit-exactly
    weight = new_weight(torch.bfloat16)
    opt = build_optimizer(cfg, [weight])
    grads = list(gradients(weight, 5))
    for grad in grads[:3]:
        weight.grad = grad
        opt.step()
    saved = _round_trip({"weight": weight.detach().clone(), "opt": opt.state_dict()})
    assert saved["opt"]["rounding"] == {"scheme": "hash32-v1", "step": 3}
    for grad in grads[3:]:
        weight.grad = grad
        opt.step()
    resumed = torch.nn.Parameter(saved["weight"])
    opt2 = build_optimizer(cfg, [resumed])
    opt2.load_state_dict(saved["opt"])
    for grad in grads[3:]:
        resumed.grad = grad
        opt2.step()
    assert torch.equal(weight, resumed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ema_on_cuda_restores_bf16_weights_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).to("cuda", torch.bfloat16)
    ema = EMA(model, decay=0.99)
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in ema.shadow.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    ema.update(model)
    before = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_into(model):
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_documented_fsdp_memory_per_gpu_is_the_memory_models(tmp_path):
    """README's per-GPU figures for FSDP on 8 GPUs (Sharded training) are optimizers.fsdp_bytes_per_gpu's for
    Sana 1.6B, to 0.1 GiB, and FSDP's fixed memory is the data-parallel figure's fraction it claims."""
    from sana_appliance.benchmarks import gpu
    from sana_appliance.model.optimizers import fsdp_bytes_per_gpu

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Sharded training (FSDP)"):]
    section = section[:section.index("\n## ")]
    figures = {}
    for ema in (True, False):
        cfg = dataclasses.replace(TrainConfig(), use_ema=ema, optimizer="adamw", distributed_strategy="fsdp")
        fixed, gathered = fsdp_bytes_per_gpu(cfg, gpu.SANA_1600M_PARAMETERS, 8, gpu.SANA_1600M_BLOCK_PARAMETERS,
                                             gpu.SANA_1600M_ROOT_PARAMETERS)
        figures[ema] = (round(fixed / 2**30, 1), round(gathered / 2**30, 1))
    flat = " ".join(section.split())
    assert f"**~{figures[True][0]} GiB fixed** with `use_ema`" in flat, figures
    assert f"~{figures[False][0]} GiB without EMA" in flat, figures
    assert f"~{figures[True][1]} GiB of gathered blocks" in flat, figures


def test_rounding_noise_is_a_fixed_uniform_hash_of_place_and_step():
    """The stochastic rounding's noise: the same bits for the same (element, step) on every call, rank and
    device type, new bits at the next step, and uniform over [0, 2^shift)."""
    from sana_appliance.model import precision

    key0, key1 = precision.round_key(0, 0), precision.round_key(0, 1)
    a = precision._noise(1 << 16, 1000, key0, 12, torch.device("cpu"))
    assert torch.equal(a, precision._noise(1 << 16, 1000, key0, 12, torch.device("cpu")))
    assert torch.equal(a[10:], precision._noise((1 << 16) - 10, 1010, key0, 12, torch.device("cpu")))  # by place
    b = precision._noise(1 << 16, 1000, key1, 12, torch.device("cpu"))
    assert (a != b).float().mean() > 0.99
    assert int(a.min()) >= 0 and int(a.max()) < 4096
    counts = torch.bincount(a >> 8, minlength=16).float()  # 16 bins of 4096 expected each
    assert (counts - 4096).abs().max() < 5 * 64  # ~5 sigma
    assert abs(a.float().mean().item() / 4095 - 0.5) < 0.01


def test_compiled_rounding_matches_the_eager_code_bit_for_bit(monkeypatch):
    """On a GPU the compose and rounding kernels run compiled; the compiled code (inductor, here on the CPU) gives
    the eager code's bits for both residual widths and odd sizes, and a wrapped 8-bit Lion trains to the same
    weights with it as without it."""
    from sana_appliance.model import precision

    monkeypatch.setattr(precision, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(precision, "_KERNELS", {})
    fused = precision.kernels(torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    for bits in (4, 8):
        for n in (1001, 4096):
            value = torch.randn(n, generator=g) * 0.1
            key = precision.round_key(7, n)
            weight, residual = fused.decompose(value, bits, 123, key)  # the first call checks the compiled kernel
            assert fused.fused["decompose"] is True
            again = fused.decompose(value, bits, 123, key)  # compiled
            want = precision._decompose(value, bits, 123, key)
            assert precision._same_bits(again, want) and precision._same_bits((weight,), want[:1])
            composed = fused.compose(weight, residual, bits)
            assert precision._same_bits((fused.compose(weight, residual, bits),), (composed,))
            assert precision._same_bits((composed,), (precision._compose(weight, residual, bits),))
            assert composed.dtype == torch.float32 and fused.fused["compose"] is True
    assert precision._same_bits((torch.tensor([0.0]),), (torch.tensor([0.0]),))
    assert not precision._same_bits((torch.tensor([0.0]),), (torch.tensor([-0.0]),))  # bits, not values
    assert precision._same_bits((torch.tensor([float("nan")]),), (torch.tensor([float("nan")]),))

    cfg = dataclasses.replace(TrainConfig(), optimizer="bnb-lion8bit", learning_rate=1e-4, mixed_precision="bf16")

    def trained(devices: tuple[str, ...]) -> list[torch.Tensor]:
        monkeypatch.setattr(precision, "FUSED_DEVICES", devices)
        monkeypatch.setattr(precision, "_KERNELS", {})
        model = tiny_sana(torch.bfloat16)
        opt = build_optimizer(cfg, model.parameters(), min_8bit_size=MIN_8BIT)
        for batch in fixed_batches():
            opt.zero_grad(set_to_none=True)
            loss_and_backward(model, batch)
            opt.step()
        assert precision.kernels(torch.device("cpu")).fused["decompose"] is (devices == ("cpu",))
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(trained(("cpu",)), trained(())))


def test_rounding_in_slices_is_the_rounding_in_one_piece(monkeypatch):
    """The eager rounding works a slice at a time: slices of 7 elements give the bits of one piece, for odd sizes
    and both residual widths, and an old checkpoint's residual layout (pairs, low nibble first) decodes as before."""
    from sana_appliance.model import precision

    g = torch.Generator().manual_seed(5)
    for bits in (4, 8):
        for n in (1, 13, 64, 1001):
            value = torch.randn(n, generator=g)
            whole = precision._decompose(value, bits, 99, precision.round_key(1, 2))
            monkeypatch.setattr(precision, "NOISE_SLICE", 7)
            sliced = precision._decompose(value, bits, 99, precision.round_key(1, 2))
            monkeypatch.undo()
            assert precision._same_bits(sliced, whole), (bits, n)
    extra = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int32)
    packed = precision._pack(extra, 4)
    assert packed.tolist() == [(0) | (15 << 4), (8) | (7 << 4), 11]
    assert torch.equal(precision._unpack(packed, 4, 5), extra)
