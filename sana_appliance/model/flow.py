"""The flow-matching training schedule, built explicitly from config.

Never derived from the model's scheduler: Sana ships a DPM-Solver config with
`flow_shift=3.0`, and `FlowMatchEulerDiscreteScheduler.from_pretrained` on it silently
gives shift 1.0 (docs/recipe.md, section 3). The training schedule is a plain object owned
by the trainer and never shared with validation pipelines.

    sigma  ~ sigmoid(N(0, 1))                      (logit-normal)
    sigma' = s * sigma / (1 + (s - 1) * sigma)     (shift s, default 3.0)
    noisy  = (1 - sigma') * latents + sigma' * noise
    target = noise - latents                       (velocity), model timestep = 1000 * sigma'
    auto shift: s = 3.0 * sqrt(height * width / 1024^2) in pixels, so 1024px keeps 3.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
REFERENCE_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class FlowSchedule:
    shift: float = 3.0
    auto_shift: bool = False

    @classmethod
    def from_config(cls, cfg, scheduler_config: dict | None = None) -> FlowSchedule:
        """The schedule the trainer uses. `scheduler_config` is the model's (recorded, not trusted)."""
        return cls(shift=float(cfg.flow_schedule_shift), auto_shift=bool(cfg.flow_schedule_auto_shift))

    def shift_for(self, height_px: int, width_px: int) -> float:
        if self.auto_shift:
            return 3.0 * math.sqrt(height_px * width_px / REFERENCE_PIXELS)
        return self.shift

    def sample_sigmas(self, batch: int, generator: torch.Generator, shift: float) -> torch.Tensor:
        sigma = torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float32))
        return shift * sigma / (1 + (shift - 1) * sigma)

    @staticmethod
    def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise, noise - latents
