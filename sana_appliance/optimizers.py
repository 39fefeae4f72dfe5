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
  noise is 2^-k of a bf16 spacing. The random bits come from a torch.Generator seeded
  from ``seed`` and saved in ``state_dict()``, so resume is bit-exact, and every
  data-parallel rank draws the same bits, which keeps replicas identical.

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
(default 2^25 elements: 256 MiB of fp32 weights + grads, plus ~8 B per element of
the largest tensor while it is rounded), never a full fp32 copy. Measured on an H200
with Sana-1.6B-shaped bf16 tensors: paged 8-bit Lion steps in ~180 ms through the
wrapper vs ~50 ms for bitsandbytes alone (which loses the updates), peak temporaries
~460 MiB.

Gradients are consumed by ``step``: torch-optimi's Kahan path uses ``.grad`` as
scratch space, so read gradient norms before stepping, never after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import ConfigError
from .schema import LR_SCHEDULERS, TrainConfig

# Extra mantissa bits kept beside each bf16 weight by ExtendedPrecision.
RESIDUAL_BITS = {"adamw": 8, "adamw8bit": 8, "bnb-lion8bit": 4, "bnb-lion8bit-paged": 4}
# Optimizer state bytes per parameter, keyed by (optimizer, weights are bf16).
_STATE_BYTES = {
    ("optimi-adamw", False): 8.0,
    ("optimi-adamw", True): 6.0,
    ("adamw", False): 8.0,
    ("adamw", True): 9.0,
    ("adamw8bit", False): 2.0 + 2 * 4 / 256,
    ("adamw8bit", True): 3.0 + 2 * 4 / 256,
    ("bnb-lion8bit", False): 1.0 + 4 / 256,
    ("bnb-lion8bit", True): 1.5 + 4 / 256,
    ("bnb-lion8bit-paged", False): 1.0 + 4 / 256,
    ("bnb-lion8bit-paged", True): 1.5 + 4 / 256,
    ("lion", False): 4.0,
    ("lion", True): 4.0,
}


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the trainable transformer weights are stored in (see module docstring)."""
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def optimizer_state_bytes_per_param(cfg: TrainConfig) -> float:
    """Optimizer state bytes per trainable parameter for cfg (memory and disk estimates)."""
    return _STATE_BYTES[(cfg.optimizer, weight_dtype(cfg) == torch.bfloat16)]


def fixed_bytes_per_param(cfg: TrainConfig) -> float:
    """Device bytes per trainable parameter held for the whole run: weights and gradients in
    weight_dtype, optimizer state, and the fp32 EMA shadow when use_ema (it lives beside the
    weights). Activations come on top. The memory model of docs/recipe.md; the presets' and the
    README's "GiB fixed" figures are this times the parameter count (tested)."""
    weight_bytes = torch.finfo(weight_dtype(cfg)).bits // 8
    return 2 * weight_bytes + optimizer_state_bytes_per_param(cfg) + (4.0 if cfg.use_ema else 0.0)


def build_optimizer(
    cfg: TrainConfig,
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
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer got no trainable parameters")
    dtypes = {p.dtype for p in params}
    if not dtypes <= {torch.float32, torch.bfloat16}:
        raise ValueError(f"trainable weights must be fp32 or bf16 (see weight_dtype), got {sorted(map(str, dtypes))}")
    has_bf16 = torch.bfloat16 in dtypes
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    lr, wd, eps = cfg.learning_rate, cfg.adam_weight_decay, cfg.adam_epsilon
    name = cfg.optimizer

    if name in ("optimi-adamw", "lion"):
        import optimi

        if name == "optimi-adamw":
            return optimi.AdamW(params, lr=lr, betas=betas, weight_decay=wd, eps=eps, kahan_sum=has_bf16)
        return optimi.Lion(params, lr=lr, betas=betas, weight_decay=wd, kahan_sum=has_bf16)

    inner = _uncompensated(name, params, lr, betas, wd, eps, min_8bit_size)
    if not has_bf16:
        return inner
    return ExtendedPrecision(
        inner, residual_bits=RESIDUAL_BITS[name], seed=cfg.seed, max_working_elements=max_working_elements
    )


def _uncompensated(name, params, lr, betas, wd, eps, min_8bit_size) -> torch.optim.Optimizer:
    """The library optimizer behind a name, as is (no bf16 compensation)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, eps=eps)
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=wd, eps=eps, min_8bit_size=min_8bit_size)
    if name == "bnb-lion8bit":
        return bnb.optim.Lion8bit(params, lr=lr, betas=betas, weight_decay=wd, min_8bit_size=min_8bit_size)
    if name == "bnb-lion8bit-paged":
        # Paging (state in CUDA unified memory, evicted to RAM under pressure) exists only
        # on CUDA; elsewhere bitsandbytes falls back to plain Lion8bit with a warning, so
        # ask for plain Lion8bit directly: same algorithm, same state.
        if all(p.device.type == "cuda" for p in params):
            return bnb.optim.PagedLion8bit(params, lr=lr, betas=betas, weight_decay=wd, min_8bit_size=min_8bit_size)
        return bnb.optim.Lion8bit(params, lr=lr, betas=betas, weight_decay=wd, min_8bit_size=min_8bit_size)
    raise ConfigError(f"optimizer={name!r} is not supported: use one of optimi-adamw, adamw, adamw8bit, "
                      "bnb-lion8bit, bnb-lion8bit-paged, lion")


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, num_training_steps: int,
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


# Param-group entries that come from the config (each library uses some of them).
CONFIG_GROUP_KEYS = frozenset({"lr", "betas", "beta1", "beta2", "weight_decay", "eps"})


def apply_hyperparameters(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
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


# ----------------------------------------------------------- extended precision


def _compose(weight: torch.Tensor, residual: torch.Tensor | None, bits: int) -> torch.Tensor:
    """fp32 value of a bf16 weight plus its extra mantissa bits (exact)."""
    value = weight.float()
    if residual is None:
        return value
    extra = _unpack(residual, bits, weight.numel()).view(weight.shape)
    return (value.view(torch.int32) + (extra << (16 - bits))).view(torch.float32)


def _decompose(value: torch.Tensor, bits: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastically round fp32 to 8+bits mantissa bits; split into (bf16, packed residual).

    Consumes ``value`` (its storage is reused).

    Integer arithmetic on the fp32 bit pattern acts on the magnitude for both signs, so
    adding uniform noise below the kept bits then truncating rounds each magnitude up
    with probability equal to the dropped fraction: unbiased. The bf16 part is the
    round-to-nearest of the kept value, so the forward pass sees the closest bf16.
    """
    shift = 16 - bits
    # In place on value's storage (a working copy the caller discards) to keep the
    # temporaries at two int32 tensors the size of one parameter.
    kept = value.contiguous().view(torch.int32)
    kept.add_(torch.randint(0, 1 << shift, kept.shape, dtype=torch.int32, device=kept.device, generator=generator))
    kept.bitwise_and_(-(1 << shift))
    high = kept + 0x8000
    high.bitwise_and_(-0x10000)
    extra = kept.sub_(high).bitwise_right_shift_(shift)  # in [-2^(bits-1), 2^(bits-1) - 1]
    return high.view(torch.float32).to(torch.bfloat16), _pack(extra, bits)


def _pack(extra: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return extra.to(torch.int8)
    assert bits == 4, bits
    flat = (extra.reshape(-1) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return packed.to(torch.int32).reshape(-1)
    low, high = packed & 15, packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel].to(torch.int32) - 8


def _restore_dtypes(saved: Any, loaded: Any) -> Any:
    """torch and bitsandbytes cast loaded floating state to the param dtype (bf16 here);
    the inner optimizer keeps fp32 state for bf16 params, so put the saved tensors back."""
    if isinstance(saved, torch.Tensor) and isinstance(loaded, torch.Tensor):
        return saved.to(device=loaded.device, copy=True) if saved.dtype != loaded.dtype else loaded
    if isinstance(saved, dict) and isinstance(loaded, dict):
        return {k: _restore_dtypes(saved[k], v) if k in saved else v for k, v in loaded.items()}
    return loaded


class ExtendedPrecision(torch.optim.Optimizer):
    """Runs an inner optimizer on bf16 weights without losing updates (module docstring).

    fp32 parameters pass straight through to the inner optimizer. ``param_groups`` and
    ``state`` are the inner optimizer's, so LR schedulers, ``zero_grad`` and gradient
    clipping work as usual.
    """

    def __init__(self, inner: torch.optim.Optimizer, *, residual_bits: int, seed: int, max_working_elements: int):
        if residual_bits not in (4, 8):
            raise ValueError(f"residual_bits must be 4 or 8, got {residual_bits}")
        super().__init__([p for g in inner.param_groups for p in g["params"]], dict(inner.defaults))
        self.inner = inner
        self.residual_bits = residual_bits
        self.seed = seed
        self.max_working_elements = max_working_elements
        self._residuals: dict[torch.Tensor, torch.Tensor] = {}
        self._generator: torch.Generator | None = None
        self._link()

    def _link(self) -> None:
        # The inner optimizer replaces its param_groups and state on load_state_dict.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "inner"):  # called by Optimizer.__init__ before linking
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)

    def _rng(self, device: torch.device) -> torch.Generator:
        # Created on first use so that it lives on the device the params were moved to.
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for p in self._params() if p.grad is not None]
        # Hide every gradient; each chunk's inner step then sees (and updates) only its params.
        grads = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        try:
            chunk: list[torch.Tensor] = []
            size = 0
            for p in params:
                if chunk and size + p.numel() > self.max_working_elements:
                    self._step_chunk(chunk, grads)
                    chunk, size = [], 0
                chunk.append(p)
                size += p.numel()
            if chunk:
                self._step_chunk(chunk, grads)
        finally:
            for p, g in grads.items():
                p.grad = g
        return loss

    def _step_chunk(self, chunk: list[torch.Tensor], grads: dict[torch.Tensor, torch.Tensor]) -> None:
        stored: dict[torch.Tensor, torch.Tensor] = {}
        for p in chunk:
            if p.dtype == torch.bfloat16:
                stored[p] = p.data
                p.data = _compose(p.data, self._residuals.get(p), self.residual_bits)
                p.grad = grads[p].float()
            else:
                p.grad = grads[p]
        done = False
        try:
            self.inner.step()
            done = True
        finally:
            for p in chunk:
                p.grad = None
                if p in stored:
                    value, p.data = p.data, stored[p]
                    if done:  # write back in place: the bf16 storage stays the same object
                        weight, self._residuals[p] = _decompose(value, self.residual_bits, self._rng(value.device))
                        p.data.copy_(weight)

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self._params())}
        generator = None
        if self._generator is not None:
            generator = {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        return {
            "inner": self.inner.state_dict(),
            "residual_bits": self.residual_bits,
            "residuals": {index[p]: r for p, r in self._residuals.items()},
            "generator": generator,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("residual_bits") != self.residual_bits:
            raise ValueError(
                f"optimizer state has residual_bits={state_dict.get('residual_bits')}, this optimizer uses "
                f"{self.residual_bits}: the checkpoint was written with another optimizer or precision"
            )
        self.inner.load_state_dict(state_dict["inner"])
        saved = state_dict["inner"]["state"]
        for i, p in enumerate(self._params()):
            if p in self.inner.state and i in saved:
                self.inner.state[p] = _restore_dtypes(saved[i], self.inner.state[p])
        self._link()
        params = self._params()
        self._residuals = {params[int(i)]: r.to(params[int(i)].device, copy=True)
                           for i, r in state_dict["residuals"].items()}
        self._generator = None
        generator = state_dict["generator"]
        if generator is not None:
            device = next((p.device for p in params if p.dtype == torch.bfloat16), torch.device("cpu"))
            if device.type == generator["device_type"]:
                self._rng(device).set_state(generator["state"].cpu())
            # On another device type the saved stream cannot continue: it restarts from the
            # seed. Training stays faithful; only bit-exactness across device types is lost.
