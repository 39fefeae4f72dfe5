"""Optimizers, their precision policy and the learning-rate schedule.

Precision policy (``weight_dtype``): with ``mixed_precision: bf16`` the trainable
transformer weights are STORED in bf16 (pure-bf16 training, no fp32 master copy);
otherwise (``no``, or ``fp16`` = fp32 master weights + fp16 autocast + GradScaler in
the trainer) they are fp32.

Pure bf16 silently loses small updates: a bf16 weight near 0.25 has a spacing of
~1e-3, so an update of 1e-5 (LR 1e-5) rounds away entirely (docs/recipe.md: plain bf16
AdamW moved weights 100x too little). Every optimizer built here is faithful with bf16
weights:

- ``optimi-adamw`` and ``lion`` use torch-optimi with ``kahan_sum=True``: a bf16
  compensation buffer carries what each bf16 write-back dropped.
- ``adamw``, ``adamw8bit``, ``bnb-lion8bit`` and ``bnb-lion8bit-paged`` have no
  compensation of their own, so :class:`ExtendedPrecision` wraps them: each bf16
  weight keeps k extra mantissa bits in a side buffer (k=8 for the AdamWs, k=4
  for the 8-bit Lions, which must stay within ~1.5 bytes/param of state). The inner
  optimizer steps an fp32 working copy of (bf16 + extra bits), a chunk of parameters
  at a time, and the result is stochastically rounded to 8+k mantissa bits. The
  stored weight is then unbiased (no update is lost, however small) and its rounding
  noise is 2^-k of a bf16 spacing. The random bits are a hash of (``seed``, the step
  count, the element's place among the parameters), the step count is saved in
  ``state_dict()``, so resume is bit-exact, and every data-parallel rank (and device type)
  draws the same bits, which keeps replicas identical.

The table :data:`OPTIMIZERS` is the one place an optimizer is declared: its name (and
SimpleTuner spellings), how the library optimizer is built, its bf16 policy and its state
bytes per parameter. The config's choices, the memory model and the tests all read it.

Optimizer state in bytes per trainable parameter (``optimizer_state_bytes_per_param``;
add 2 B/param weights + 2 B/param grads for bf16, 4 + 4 for fp32):

====================  ============  =====================================================
optimizer             fp32 weights  bf16 weights
====================  ============  =====================================================
optimi-adamw          8             6    (bf16 m, v + bf16 Kahan buffer)
adamw                 8             9    (fp32 m, v + 8-bit residual)
adamw8bit             2             3    (8-bit m, v + 8-bit residual)
bnb-lion8bit(-paged)  1             1.5  (8-bit m + 4-bit residual): 5.5 B/param in all
lion                  4             4    (bf16 m + bf16 Kahan buffer)
====================  ============  =====================================================

The 8-bit states add one fp32 scale per 256 values (0.016 B/param per state), and
bitsandbytes keeps tensors under 4096 elements in 32-bit state (biases, norms:
negligible in a large model). Temporaries during ``step`` are bounded per chunk
(default 2^25 elements: 256 MiB of fp32 weights + grads, plus ~14 B per element of
the largest tensor while it is rounded eagerly, 2.5 B compiled), never a full fp32 copy.
Measured on an H200 with Sana-1.6B-shaped bf16 tensors, with the earlier eager rounding
(torch.randint noise, ~13 small kernels per parameter): paged 8-bit Lion steps in ~180 ms
through the wrapper vs ~50 ms for bitsandbytes alone (which loses the updates), peak
temporaries ~460 MiB. The noise is now a hash (model/precision.py), ~30 small kernels per
parameter eagerly (slower than before), one compiled kernel each for compose and rounding
on a GPU. Not measured on a GPU yet: benchmarks/rounding.py in the GPU session does.

Gradients are consumed by ``step``: torch-optimi's Kahan path uses ``.grad`` as
scratch space, so read gradient norms before stepping, never after.

Skipping a non-finite step: torch's fused AdamW (``adamw``, alone or inside ExtendedPrecision)
takes a ``found_inf`` flag on the device and skips there (:func:`step_unless`), so the step never
waits for the host. torch-optimi and bitsandbytes have no such flag: for them the trainer reads
the flag back once per step (:func:`skips_on_device` says which). A device-side skip for them
would mean snapshotting each chunk's weights and state before the step (1-16 B/param more memory
traffic per step, ~1-8 ms on 1.6B on an H200), more than the one read it saves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when an optimizer is built: config resolution stays light
    import torch

KAHAN = "kahan"  # the library compensates bf16 write-backs itself (torch-optimi kahan_sum)
EXTENDED = "extended-precision"  # wrapped in model.precision.ExtendedPrecision with residual_bits extra bits


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters every optimizer is built from (taken from the config)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float
    min_8bit_size: int


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: the entry of :data:`OPTIMIZERS`."""

    name: str
    doc: str
    # (params, hyperparameters, weights are bf16) -> the library optimizer
    make: Callable[[list, Hyper, bool], Any]
    bf16_policy: str  # KAHAN or EXTENDED
    state_bytes_fp32: float  # optimizer state bytes per parameter with fp32 weights
    state_bytes_bf16: float  # ... with bf16 weights (compensation included)
    residual_bits: int | None = None  # EXTENDED: extra mantissa bits kept per bf16 weight
    aliases: tuple[str, ...] = ()  # SimpleTuner spellings of the same optimizer


def _optimi_adamw(params, h: Hyper, bf16: bool):
    import optimi

    return optimi.AdamW(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay, eps=h.eps, kahan_sum=bf16)


def _optimi_lion(params, h: Hyper, bf16: bool):
    import optimi

    return optimi.Lion(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay, kahan_sum=bf16)


def _torch_adamw(params, h: Hyper, bf16: bool):
    import torch
    from torch.distributed.tensor import DTensor

    # The fused kernel (one launch per group of tensors) takes found_inf: a non-finite step is skipped on the
    # device, with no wait for the host (see step_unless). FSDP's DTensor shards keep the default path.
    fused = all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay, eps=h.eps,
                             fused=fused or None)


def _bnb_adamw8bit(params, h: Hyper, bf16: bool):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay, eps=h.eps,
                               min_8bit_size=h.min_8bit_size)


def _bnb_lion8bit(params, h: Hyper, bf16: bool):
    import bitsandbytes as bnb

    return bnb.optim.Lion8bit(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay,
                              min_8bit_size=h.min_8bit_size)


def _bnb_lion8bit_paged(params, h: Hyper, bf16: bool):
    # Paging (state in CUDA unified memory, evicted to RAM under pressure) exists only
    # on CUDA; elsewhere bitsandbytes falls back to plain Lion8bit with a warning, so
    # ask for plain Lion8bit directly: same algorithm, same state.
    if all(p.device.type == "cuda" for p in params):
        import bitsandbytes as bnb

        return bnb.optim.PagedLion8bit(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay,
                                       min_8bit_size=h.min_8bit_size)
    return _bnb_lion8bit(params, h, bf16)


_SCALE_8BIT = 4 / 256  # one fp32 scale per 256 values of an 8-bit state

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("optimi-adamw", "torch-optimi AdamW; Kahan summation keeps bf16 weights exact", _optimi_adamw,
                  KAHAN, 8.0, 6.0, aliases=("adamw_bf16", "optimi_adamw")),
    OptimizerSpec("adamw", "torch AdamW", _torch_adamw, EXTENDED, 8.0, 9.0, residual_bits=8),
    OptimizerSpec("adamw8bit", "bitsandbytes 8-bit AdamW", _bnb_adamw8bit, EXTENDED,
                  2.0 + 2 * _SCALE_8BIT, 3.0 + 2 * _SCALE_8BIT, residual_bits=8, aliases=("bnb-adamw8bit",)),
    OptimizerSpec("bnb-lion8bit", "bitsandbytes 8-bit Lion", _bnb_lion8bit, EXTENDED,
                  1.0 + _SCALE_8BIT, 1.5 + _SCALE_8BIT, residual_bits=4),
    OptimizerSpec("bnb-lion8bit-paged", "bitsandbytes 8-bit Lion, state paged to RAM under pressure on CUDA",
                  _bnb_lion8bit_paged, EXTENDED, 1.0 + _SCALE_8BIT, 1.5 + _SCALE_8BIT, residual_bits=4,
                  aliases=("bnb-lion8bit_paged",)),
    OptimizerSpec("lion", "torch-optimi Lion with Kahan summation", _optimi_lion, KAHAN, 4.0, 4.0,
                  aliases=("optimi-lion",)),
)}
# SimpleTuner spelling -> our name, derived from the table.
ALIASES = {alias: spec.name for spec in OPTIMIZERS.values() for alias in spec.aliases}

# Learning-rate schedules (diffusers' get_scheduler names); the config's choices.
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


def spec_of(cfg) -> OptimizerSpec:
    try:
        return OPTIMIZERS[cfg.optimizer]
    except KeyError:
        raise ConfigError(f"optimizer={cfg.optimizer!r} is not supported: use one of {', '.join(OPTIMIZERS)}") from None


def weight_dtype(cfg) -> torch.dtype:
    """The dtype the trainable transformer weights are stored in (see module docstring)."""
    import torch

    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def optimizer_state_bytes_per_param(cfg) -> float:
    """Optimizer state bytes per trainable parameter for cfg (memory and disk estimates)."""
    spec = spec_of(cfg)
    return spec.state_bytes_bf16 if cfg.mixed_precision == "bf16" else spec.state_bytes_fp32


def fixed_bytes_per_param(cfg) -> float:
    """Device bytes per trainable parameter held for the whole run: weights and gradients in
    weight_dtype, optimizer state, and the fp32 EMA shadow when use_ema (it lives beside the
    weights). Activations come on top. The memory model of docs/recipe.md; the presets' and the
    README's "GiB fixed" figures are this times the parameter count (tested)."""
    weight_bytes = 2 if cfg.mixed_precision == "bf16" else 4
    return 2 * weight_bytes + optimizer_state_bytes_per_param(cfg) + (4.0 if cfg.use_ema else 0.0)



def fsdp_bytes_per_gpu(cfg, parameters: int, world: int, largest_unit: int, root_unit: int) -> tuple[float, float]:
    """FSDP's memory model per GPU (distributed/fsdp.py), in bytes: (fixed, gathered).

    fixed: what each of ``world`` GPUs holds for the whole run, 1/world of the fp32 master weights, fp32
    gradients, AdamW's two fp32 moments and (use_ema) the fp32 EMA: 16 or 20 B/param over world.
    gathered: the transient full copies FSDP makes, estimated for the backward of the largest unit (its
    bf16 weights and gradients, the gradients' fp32 copy for the reduce-scatter: 8 B/param), the next unit
    prefetched (2 B/param) and the root unit's bf16 weights (2 B/param). Activations come on top."""
    state = 4 + 4 + 8 + (4 if cfg.use_ema else 0)
    return state * parameters / world, (2 + 2 + 4 + 2) * largest_unit + 2 * root_unit

def build_optimizer(
    cfg,
    params: Iterable[torch.nn.Parameter],
    *,
    min_8bit_size: int = 4096,
    max_working_elements: int = 1 << 25,
) -> torch.optim.Optimizer:
    """The optimizer cfg.optimizer over the trainable params, faithful for bf16 weights.

    ``min_8bit_size``: bitsandbytes keeps smaller tensors in 32-bit state (its default);
    tests lower it so tiny models exercise the 8-bit path. ``max_working_elements``
    bounds the fp32 working copies ExtendedPrecision makes during one inner step.
    """
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer got no trainable parameters")
    dtypes = {p.dtype for p in params}
    if not dtypes <= {torch.float32, torch.bfloat16}:
        raise ValueError(f"trainable weights must be fp32 or bf16 (see weight_dtype), got {sorted(map(str, dtypes))}")
    has_bf16 = torch.bfloat16 in dtypes
    spec = spec_of(cfg)
    hyper = Hyper(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon, min_8bit_size=min_8bit_size)
    inner = spec.make(params, hyper, has_bf16)
    if spec.bf16_policy == KAHAN or not has_bf16:
        return inner
    from .precision import ExtendedPrecision

    return ExtendedPrecision(inner, residual_bits=spec.residual_bits, seed=cfg.seed,
                             max_working_elements=max_working_elements)


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer, num_training_steps: int,
                       completed_steps: int = 0):
    """cfg.lr_scheduler after cfg.lr_warmup_steps of linear warmup (diffusers' schedules),
    positioned after ``completed_steps`` scheduler steps.

    The rates always come from cfg: every group's base rate is set to cfg.learning_rate
    (a loaded optimizer state carries the checkpoint's), so a resumed run with a changed
    learning rate, warmup, schedule or length follows the new schedule at once. The only
    schedule state worth saving is the step count (``scheduler.last_epoch``).

    ``constant`` with warmup steps means ``constant_with_warmup``: the schema documents
    lr_warmup_steps as applying to every schedule, while diffusers' ``constant`` would
    silently ignore it.
    """
    from diffusers.optimization import get_scheduler

    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"lr_scheduler={cfg.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    name = cfg.lr_scheduler
    if name == "constant" and cfg.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
    # torch schedulers step once on construction: last_epoch=k-1 lands on step k.
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=num_training_steps,
                         last_epoch=completed_steps - 1)


def skips_on_device(optimizer) -> bool:
    """True when ``optimizer`` can skip a step on the device (:func:`step_unless`): torch's fused Adam/AdamW,
    alone or as ExtendedPrecision's inner optimizer."""
    inner = getattr(optimizer, "inner", optimizer)
    # The groups decide how torch steps (load_optimizer_state keeps this build's flags in them).
    return getattr(inner, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in inner.param_groups)


# Param-group entries that say how this build steps, not what the config asks: a loaded state keeps ours.
KERNEL_GROUP_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, keeping this optimizer's kernel flags (KERNEL_GROUP_KEYS).

    torch restores the param groups as saved, flags included: a checkpoint written by a build that stepped
    otherwise (before AdamW was fused) would switch the fused kernel off, and the found_inf skip with it.
    With the flags kept, torch also puts the loaded step counts where the fused kernel wants them."""
    from .precision import ExtendedPrecision

    def adopt(live_groups: list[dict], state: dict) -> dict:
        groups = [dict(g) for g in state["param_groups"]]
        for group, live in zip(groups, live_groups):
            group.update({key: live[key] for key in KERNEL_GROUP_KEYS if key in live})
        return {**state, "param_groups": groups}

    if isinstance(optimizer, ExtendedPrecision):
        saved = {**saved, "inner": adopt(optimizer.inner.param_groups, saved["inner"])}
    else:
        saved = adopt(optimizer.param_groups, saved)
    optimizer.load_state_dict(saved)


def step_unless(optimizer, found_inf) -> None:
    """``optimizer.step()`` that changes nothing (weights, state, step counts) where ``found_inf`` (a 0-dim
    float tensor on the device) is 1.0, decided by the kernel: no host sync. Needs :func:`skips_on_device`."""
    from .precision import ExtendedPrecision, with_found_inf

    if isinstance(optimizer, ExtendedPrecision):
        optimizer.step(found_inf=found_inf)
    else:
        with_found_inf(optimizer, found_inf)


# Param-group entries that come from the config (each library uses some of them).
CONFIG_GROUP_KEYS = frozenset({"lr", "betas", "beta1", "beta2", "weight_decay", "eps"})


def apply_hyperparameters(cfg, optimizer: torch.optim.Optimizer) -> None:
    """Overwrite the hyperparameters in ``optimizer``'s param groups with cfg's.

    ``load_state_dict`` restores the checkpoint's param groups (learning rate, betas,
    weight decay, epsilon); after it the config must decide again. The values come from
    a throwaway optimizer built from cfg over the same parameters, so each library's own
    key names (optimi's beta1/beta2, torch's betas) are filled in the way it expects.
    Only CONFIG_GROUP_KEYS are copied: other group entries are loaded state (optimi's
    ``step`` and ``setup`` flag) that a fresh optimizer would reset."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    template = build_optimizer(cfg, params)
    if len(template.param_groups) != len(optimizer.param_groups):
        raise ValueError("optimizer layout changed between build and resume")
    for group, fresh in zip(optimizer.param_groups, template.param_groups):
        for key in CONFIG_GROUP_KEYS & fresh.keys():
            group[key] = fresh[key]
