"""Extended precision: an inner optimizer on bf16 weights that loses no update.

Each bf16 weight keeps k extra mantissa bits in a side buffer; the inner optimizer steps an
fp32 working copy of (bf16 + extra bits), a chunk of parameters at a time, and the result is
stochastically rounded back to 8+k mantissa bits (see :mod:`sana_appliance.model.optimizers`
for the policy and the numbers). The optimizers table says which optimizers use it and k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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


def with_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """One step of a torch optimizer that reads ``found_inf`` the way GradScaler hands it over (attributes)."""
    optimizer.grad_scale, optimizer.found_inf = None, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


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
        self._found_inf: torch.Tensor | None = None
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
    def step(self, closure: Callable[[], float] | None = None, found_inf: torch.Tensor | None = None):
        """One step of the inner optimizer, a chunk at a time. ``found_inf`` (1.0: skip), for an inner optimizer
        that takes it (optimizers.skips_on_device): the inner step leaves the working copy as it was, and its
        rounding back is exact (it already has 8+k bits), so weights and residuals stay bit-identical."""
        self._found_inf = found_inf
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
            if self._found_inf is None:
                self.inner.step()
            else:
                with_found_inf(self.inner, self._found_inf)
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
