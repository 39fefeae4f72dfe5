"""Exponential moving average of the trainable weights, kept in fp32.

The shadow is fp32 whatever the weights' dtype: with decay 0.999 each update moves the
shadow by 0.1% of (weight - shadow), far below a bf16 spacing, so a bf16 shadow would
stay frozen (docs/recipe.md, section 4). The decay is exactly ``decay`` from the first
update on: no hidden warmup (diffusers' EMAModel caps it at (1 + n) / (10 + n), which is
why this is a small class of its own). The shadow starts equal to the weights it was built from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..core.errors import ConfigError

SHADOW_PREFIX = "shadow."
UPDATE_GROUP_BYTES = 256 * 2**20  # fp32 copies of bf16 weights alive at once during an update


class EMA:
    """fp32 EMA of a model's trainable parameters, addressed by parameter name."""

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device | None = None):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"ema decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self._cache: tuple[torch.nn.Module, list] | None = None  # (model, its (shadow, parameter) pairs)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for name, p in self._trainable(model)
        }

    @staticmethod
    def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in model.named_parameters() if p.requires_grad)

    def _pairs(self, model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
        # Walking the modules costs ~0.3 ms a step on the demo, so the pairs are kept for the same model object.
        # Its parameters are updated in place (optimizers, load_state_dict, FSDP's shards after fully_shard, which
        # comes before the EMA is built); load_state_dict below replaces shadows and drops the pairs.
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        params = dict(self._trainable(model))
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:3]
            extra = sorted(params.keys() - self.shadow.keys())[:3]
            raise ValueError(f"EMA was built for other parameters (missing {missing}, unexpected {extra})")
        pairs = [(self.shadow[n], params[n]) for n in self.shadow]
        self._cache = (model, pairs)
        return pairs

    @torch.no_grad()
    def update(self, model: torch.nn.Module, applied: torch.Tensor | None = None) -> None:
        """shadow = decay * shadow + (1 - decay) * weight, in fp32. Call after each optimizer step.

        ``applied``: a 0-dim bool tensor on the device, False when the optimizer skipped the step there; the
        shadow then stays exactly as it was (a lerp by 0) without a host sync, and the caller counts the update
        (``num_updates``) once it has read the flag."""
        # Fused kernels over groups of tensors instead of one lerp per parameter (DTensor shards included). bf16
        # weights are upcast for it: in groups of at most UPDATE_GROUP_BYTES of fp32 copies, not all at once.
        # A 0-dim tensor as the weight would be read back to the host (the Scalar overload); one per tensor (the
        # List overload) stays on the device.
        rate = None if applied is None else applied.float() * (1.0 - self.decay)

        def lerp(shadows: list, weights: list) -> None:
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay if rate is None else [rate] * len(shadows))

        shadows, weights, copied = [], [], 0
        for shadow, p in self._pairs(model):
            weight = p.detach().to(device=shadow.device, dtype=torch.float32)  # no copy when already fp32 there
            shadows.append(shadow)
            weights.append(weight)
            if p.dtype != torch.float32 or p.device != shadow.device:  # an upcast copy was made
                copied += weight.numel() * 4
            if copied >= UPDATE_GROUP_BYTES:
                lerp(shadows, weights)
                shadows, weights, copied = [], [], 0
        if shadows:
            lerp(shadows, weights)
        if applied is None:
            self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's trainable weights with the EMA (rounded to their dtype)."""
        for shadow, p in self._pairs(model):
            p.copy_(shadow)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module, backup_device: str | torch.device = "cpu") -> Iterator[None]:
        """Put the EMA weights into the model for the block (validation), then restore the
        training weights bit-exactly, also when the block raises. The training weights wait
        on ``backup_device`` (CPU by default: validation needs the GPU memory more)."""
        with torch.no_grad():
            backup = [(p, p.detach().to(backup_device, copy=True)) for _, p in self._pairs(model)]
            self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in backup:
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        """Flat: one fp32 tensor per parameter under ``shadow.<name>`` (safetensors-ready)
        beside the plain values ``decay`` and ``num_updates``."""
        state: dict[str, Any] = {"decay": self.decay, "num_updates": self.num_updates}
        state.update({SHADOW_PREFIX + name: t for name, t in self.shadow.items()})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved EMA exactly (fp32 shadows). The configured decay is kept: the
        config (ema_decay) decides how the average continues."""
        saved = {k[len(SHADOW_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SHADOW_PREFIX)}
        if saved.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - saved.keys())[:3]
            unexpected = sorted(saved.keys() - self.shadow.keys())[:3]
            raise ConfigError(
                f"the checkpoint's EMA does not match the model (missing {missing}, unexpected {unexpected}): "
                "resume a checkpoint of this model, or set resume_from_checkpoint=none to start fresh"
            )
        for name, tensor in saved.items():
            if tensor.shape != self.shadow[name].shape:
                raise ConfigError(
                    f"the checkpoint's EMA has {name} of shape {tuple(tensor.shape)}, the model "
                    f"{tuple(self.shadow[name].shape)}: set resume_from_checkpoint=none to start fresh"
                )
        for name, tensor in saved.items():
            self.shadow[name] = tensor.to(device=self.shadow[name].device, dtype=torch.float32, copy=True)
        self._cache = None
        self.num_updates = int(state_dict.get("num_updates", 0))

    def to_state_dict_for_export(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The EMA weights as {parameter name: CPU tensor of dtype}, e.g. for the final
        model. Only trainable parameters: buffers and frozen weights come from the model."""
        return {name: t.to(device="cpu", dtype=dtype, copy=True).contiguous() for name, t in self.shadow.items()}
