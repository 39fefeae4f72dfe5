"""Validation images with SanaPipeline built from the trained transformer and the frozen parts.

Prompts are encoded once, while the text encoder is loaded for caching, so validation needs
no text encoder on the accelerator. Each call builds a fresh scheduler from the model's own
config (the training schedule is a separate object: docs/recipe.md, section 3), draws noise
from its own generator seeded with validation_seed, and runs inside `torch.random.fork_rng`
so the training RNG streams are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.prompts import load_prompt_set
from ..config.rules import parse_resolutions
from ..core.fsutil import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbeds:
    nickname: str
    prompt: str
    embeds: torch.Tensor  # [L, D]
    mask: torch.Tensor  # [L]


def load_prompts(cfg) -> dict[str, str]:
    """nickname -> prompt: validation_prompt (as `validation`) plus user_prompt_library, every
    nickname a unique file name (see :mod:`sana_appliance.config.prompts`; the CLI reported renames)."""
    return load_prompt_set(cfg).prompts


def image_name(step: int, nickname: str, width: int, height: int) -> str:
    return f"step{step:07d}_{nickname}_{width}x{height}.png"


@dataclass
class Round:
    """One validation round's pictures."""

    images: dict[str, object]  # "<nickname>_<W>x<H>" -> PIL image, each also saved as a file
    rows: list[list[tuple[object, str]]]  # the grid: one row per prompt, (image, caption) per tile
    extra: dict[tuple[str, int], object]  # (prompt, seed) -> PIL image of the extra prompts (not saved as files)


@torch.no_grad()
def run_validation(
    *,
    step: int,
    cfg,
    transformer,
    parts,
    prompts: list[PromptEmbeds],
    empty: tuple[torch.Tensor, torch.Tensor],
    out_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    check: Callable[[], None] = lambda: None,
    extra: list[PromptEmbeds] = (),
    extra_size: tuple[int, int] = (64, 64),
    extra_seeds: int = 1,
) -> Round:
    """Generate every prompt at every validation resolution (saved as files), then the `extra` prompts (the
    demo's held-out captions) at `extra_size` with `extra_seeds` seeds each, in one batch.

    Every picture of (prompt, size, seed) starts from the same noise, drawn from its own generator
    (validation_seed, +1, +2... for the extra seeds). `check` runs before each image and after each sampler
    step; it raises to abandon the round (a stop request), leaving only the images finished before it."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = DPMSolverMultistepScheduler.from_config(parts.scheduler_config) if parts.scheduler_config else DPMSolverMultistepScheduler()
    vae_device = next(parts.vae.parameters()).device
    parts.vae.to(device)
    was_training = transformer.training
    transformer.eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=parts.vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def after_step(_pipe, _step, _timestep, tensors):
        check()
        return tensors

    def noise(width: int, height: int, seed: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, transformer.config.in_channels, height // parts.vae_scale_factor,
                            width // parts.vae_scale_factor), generator=generator, dtype=torch.float32)

    def render(items: list[PromptEmbeds], latents: torch.Tensor, width: int, height: int) -> list:
        n = len(items)
        return pipe(
            prompt_embeds=torch.stack([item.embeds for item in items]).to(device, dtype),
            prompt_attention_mask=torch.stack([item.mask for item in items]).to(device),
            negative_prompt=None,
            negative_prompt_embeds=empty[0][None].expand(n, -1, -1).to(device, dtype),
            negative_prompt_attention_mask=empty[1][None].expand(n, -1).to(device),
            guidance_scale=cfg.validation_guidance,
            num_inference_steps=cfg.validation_num_inference_steps,
            height=height, width=width, latents=latents.to(device, dtype),
            use_resolution_binning=False, output_type="pil",
            callback_on_step_end=after_step, callback_on_step_end_tensor_inputs=[],
        ).images

    images, rows, extra_images = {}, {item.nickname: [] for item in prompts}, {}
    devices = [device.index] if device.type == "cuda" and device.index is not None else []
    try:
        with torch.random.fork_rng(devices=devices):
            for width, height in parse_resolutions(cfg.validation_resolution):
                for item in prompts:
                    check()
                    image = render([item], noise(width, height, cfg.validation_seed), width, height)[0]
                    name = image_name(step, item.nickname, width, height)
                    with atomic_path(out_dir / name) as tmp:
                        image.save(tmp, format="PNG")
                    images[f"{item.nickname}_{width}x{height}"] = image
                    rows[item.nickname].append((image, f"{item.prompt}\n{item.nickname}, {width}x{height}"))
            if extra:
                check()
                width, height = extra_size
                jobs = [(item, cfg.validation_seed + k) for item in extra for k in range(extra_seeds)]
                pictures = render([item for item, _ in jobs],
                                  torch.cat([noise(width, height, seed) for _, seed in jobs]), width, height)
                for (item, seed), image in zip(jobs, pictures):
                    extra_images[(item.prompt, seed)] = image
    finally:
        transformer.train(was_training)
        parts.vae.to(vae_device)
    log.info("validation at step %d: %d images in %s%s", step, len(images), out_dir,
             f", and {len(extra_images)} of held-out prompts" if extra_images else "")
    return Round(images, [row for row in rows.values() if row], extra_images)


def encode_validation_prompts(prompts: dict[str, str], text_cache) -> list[PromptEmbeds]:
    result = []
    for nickname, prompt in prompts.items():
        embeds, mask = text_cache.load(text_cache.key(prompt))
        result.append(PromptEmbeds(nickname, prompt, embeds, mask))
    return result


def latest_images(out_dir: Path) -> list[Path]:
    files = sorted(out_dir.glob("step*.png"))
    if not files:
        return []
    last_step = files[-1].name.split("_")[0]
    return [f for f in files if f.name.startswith(last_step + "_")]


__all__ = ["Round", "load_prompts", "run_validation", "encode_validation_prompts", "image_name", "latest_images"]
