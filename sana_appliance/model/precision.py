"""Extended precision: an inner optimizer on bf16 weights that loses no update.

Each bf16 weight keeps k extra mantissa bits in a side buffer; the inner optimizer steps an
fp32 working copy of (bf16 + extra bits), a chunk of parameters at a time, and the result is
stochastically rounded back to 8+k mantissa bits (see :mod:`sana_appliance.model.optimizers`
for the policy and the numbers). The optimizers table says which optimizers use it and k.

The rounding noise is a hash of (seed, step, the element's place in the parameters), not a
generator's stream: the same bits on every rank and every device type, nothing to carry but the
step count, and plain integer arithmetic that torch.compile fuses. On a GPU, composing and
rounding each run as one compiled kernel per parameter where torch.compile works (checked
bit for bit against the eager code on first use, else eager with a warning): the eager path is
some twenty small kernels per parameter, which made the wrapped 8-bit Lion step ~3.7x the bare one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_M32 = 0xFFFFFFFF
# Odd multipliers below 2^31: a 32-bit value times one stays below 2^63, so int64 never overflows.
_MIX = (0x7FEB352D, 0x2C1B3C6D)
NOISE_SLICE = 1 << 22  # eager rounding works on this many elements at a time (int64 temporaries)


def _compose(weight: torch.Tensor, residual: torch.Tensor | None, bits: int) -> torch.Tensor:
    """fp32 value of a bf16 weight plus its extra mantissa bits (exact)."""
    value = weight.float()
    if residual is None:
        return value
    extra = _unpack(residual, bits, weight.numel()).view(weight.shape)
    return (value.view(torch.int32) + (extra << (16 - bits))).view(torch.float32)


def round_key(seed: int, step: int) -> int:
    """The hash key of one optimizer step's rounding: a 32-bit mix of the seed and the step count."""
    return (seed * 0x632BE5AB + step * 0x85157AF5 + 0x9E3779B9) & _M32


def _noise(count: int, start: int, key: int, shift: int, device: torch.device) -> torch.Tensor:
    """int32 noise in [0, 2^shift) for elements start .. start+count-1 of the parameters at one step (key)."""
    index = torch.arange(count, device=device, dtype=torch.int64) + start
    # The low 31 bits and the rest mixed separately: every product stays below 2^63 for any model size.
    x = ((index & 0x7FFFFFFF) * 0x9E3779B1 + (index >> 31) * _MIX[0] + key) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX[0]) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX[1]) & _M32
    x = x ^ (x >> 16)
    return (x >> (32 - shift)).to(torch.int32)


def _split(kept: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 bit pattern with noise added: truncated to 8+bits mantissa bits, split into the round-to-nearest
    bf16 bits (as int32 high halves) and the signed extra bits."""
    shift = 16 - bits
    kept = kept & -(1 << shift)
    high = (kept + 0x8000) & -0x10000
    return high, (kept - high) >> shift  # extra in [-2^(bits-1), 2^(bits-1) - 1]


def _decompose(value: torch.Tensor, bits: int, start: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastically round fp32 to 8+bits mantissa bits; split into (bf16, packed residual). Eager, a slice
    of NOISE_SLICE elements at a time (the noise's int64 temporaries stay small).

    Integer arithmetic on the fp32 bit pattern acts on the magnitude for both signs, so adding uniform noise
    below the kept bits then truncating rounds each magnitude up with probability equal to the dropped
    fraction: unbiased. The bf16 part is the round-to-nearest of the kept value, so the forward pass sees the
    closest bf16. ``start``: the value's first element's place among all parameters; ``key``: round_key."""
    flat = value.contiguous().view(-1).view(torch.int32)
    weight = torch.empty(flat.shape, dtype=torch.bfloat16, device=flat.device)
    extra = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    for lo in range(0, flat.numel(), NOISE_SLICE):
        part = flat[lo:lo + NOISE_SLICE]
        high, low = _split(part + _noise(part.numel(), start + lo, key, 16 - bits, part.device), bits)
        weight[lo:lo + NOISE_SLICE] = high.view(torch.float32).to(torch.bfloat16)
        extra[lo:lo + NOISE_SLICE] = low
    return weight.view(value.shape), _pack(extra, bits)


def _decompose_whole(value: torch.Tensor, bits: int, start: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_decompose in one piece, for torch.compile (which fuses it into a kernel without temporaries). Run
    eagerly (torch.compile's own fallback, e.g. past its recompile limit) it is the sliced _decompose."""
    if not torch.compiler.is_compiling():
        return _decompose(value, bits, start, key)
    flat = value.reshape(-1).view(torch.int32)
    high, low = _split(flat + _noise(flat.numel(), start, key, 16 - bits, flat.device), bits)
    return high.view(torch.float32).to(torch.bfloat16).view(value.shape), _pack(low, bits)


def _pack(extra: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return extra.to(torch.int8)
    assert bits == 4, bits
    flat = (extra.reshape(-1) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


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


ROUNDING_SCHEME = "hash32-v1"  # what state_dict()["rounding"]["step"] counts for
FUSED_DEVICES = ("cuda",)  # where compose and rounding run compiled (tests add "cpu" to check the compiled code)


def _same_bits(got: tuple, want: tuple) -> bool:
    """Bit for bit (torch.equal compares values: -0.0 == 0.0 and NaN != NaN)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]) if t.is_floating_point() else t

    return len(got) == len(want) and all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)) for a, b in zip(got, want))


def _signature(args: tuple) -> tuple:
    """What makes torch.compile (dynamic shapes) build another graph: each tensor's rank, its sizes of 0, 1 and 2
    (specialised), the parity of its element count (4-bit packing pads odd ones), and the int arguments' role."""
    return tuple((a.dim(), tuple(min(d, 3) for d in a.shape), a.numel() % 2) if isinstance(a, torch.Tensor)
                 else (None if a is None else type(a).__name__, a if isinstance(a, int) and a in (4, 8) else None)
                 for a in args)


class _Kernels:
    """compose and decompose for one device type: the eager functions, or compiled ones. Each new graph the
    compiled function may build (a new _signature) is run once beside the eager code and must match it bit for
    bit; a compile that fails or a graph that differs is warned about, and that function stays eager."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.compiled: dict[str, Callable] = {}
        # per function: None (not tried yet), True (compiled), False (eager)
        self.fused: dict[str, bool | None] = {"compose": None, "decompose": None}
        if device_type not in FUSED_DEVICES:
            self.fused = {"compose": False, "decompose": False}
        self.checked: set[tuple] = set()

    def compose(self, weight, residual, bits):
        if residual is None:  # a first step: nothing to compose but the upcast
            return weight.float()
        return self._call("compose", _compose, (weight, residual, bits))

    def decompose(self, value, bits, start, key):
        return self._call("decompose", _decompose, (value, bits, start, key))

    def _call(self, name: str, eager: Callable, args: tuple):
        if self.fused[name] is False:
            return eager(*args)
        signature = (name, _signature(args))
        try:
            if name not in self.compiled:
                whole = {"compose": _compose, "decompose": _decompose_whole}[name]
                self.compiled[name] = torch.compile(whole, dynamic=True)
            got = self.compiled[name](*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure means: stay eager, and say why
            self._stay_eager(name, f"torch.compile failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
            return eager(*args)
        self.fused[name] = True
        if signature in self.checked:
            return got
        expected = eager(*args)
        if not _same_bits(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple)
                          else (expected,)):
            self._stay_eager(name, "a compiled kernel differs from the eager code")
        else:
            self.checked.add(signature)
        return expected

    def _stay_eager(self, name: str, why: str) -> None:
        import logging

        logging.getLogger(__name__).warning(
            "optimizer %s stays eager on %s: %s; the step is slower (the compiled kernels need gcc and the Python "
            "headers)", name, self.device_type, why)
        self.fused[name] = False


_KERNELS: dict[str, _Kernels] = {}


def kernels(device: torch.device) -> _Kernels:
    """This process's compose/decompose for a device type (module docstring)."""
    if device.type not in _KERNELS:
        _KERNELS[device.type] = _Kernels(device.type)
    return _KERNELS[device.type]


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
        self._round_step = 0  # steps rounded so far: with the seed, the key of the next step's noise
        self._starts: dict[torch.Tensor, int] | None = None  # each parameter's first element among all of them
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
        self._starts = None  # the new parameters come last: the earlier ones keep their places

    def _start(self, p: torch.Tensor) -> int:
        if self._starts is None:
            self._starts, total = {}, 0
            for q in self._params():
                self._starts[q] = total
                total += q.numel()
        return self._starts[p]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, found_inf: torch.Tensor | None = None):
        """One step of the inner optimizer, a chunk at a time. ``found_inf`` (1.0: skip), for an inner optimizer
        that takes it (optimizers.skips_on_device): the inner step leaves the working copy as it was, and its
        rounding back is exact (it already has 8+k bits), so weights and residuals stay bit-identical."""
        self._found_inf = found_inf
        self._key = round_key(self.seed, self._round_step)
        self._round_step += 1  # also for a step skipped on the device: the host cannot know, and need not
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
                p.data = kernels(p.device).compose(p.data, self._residuals.get(p), self.residual_bits)
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
                        weight, self._residuals[p] = kernels(value.device).decompose(
                            value, self.residual_bits, self._start(p), self._key)
                        p.data.copy_(weight)

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self._params())}
        return {
            "inner": self.inner.state_dict(),
            "residual_bits": self.residual_bits,
            "residuals": {index[p]: r for p, r in self._residuals.items()},
            "rounding": {"scheme": ROUNDING_SCHEME, "step": self._round_step},
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
        # A checkpoint from before the hashed noise holds a generator's state instead: its run goes on faithfully
        # from key 0, only not bit for bit as it would have with the old stream.
        self._round_step = int((state_dict.get("rounding") or {}).get("step", 0))
