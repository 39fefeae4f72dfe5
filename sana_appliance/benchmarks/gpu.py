"""GPU training throughput and memory of each preset on a real-size Sana 1.6B (CUDA machine).

    python -m sana_appliance.benchmarks.gpu --out gpu.json                 # H100: --peak-tflops 989
    python -m sana_appliance.benchmarks.gpu --out gpu.json --peak-tflops 165 --presets 24g lowest-vram  # RTX 4090
    python -m sana_appliance.benchmarks.gpu --tiny --out tiny.json         # the same logic on CPU, tiny model

For each preset (24g, lowest-vram, multi-gpu per GPU) the preset's config is resolved as a
run would resolve it, then: a randomly initialised SanaTransformer2DModel with the 1.6B
config (1,604,462,752 parameters) in the preset's weight dtype (model.optimizers.weight_dtype),
block checkpointing at the preset's interval (model.parts.enable_block_checkpointing), the
preset's optimizer (model.optimizers.build_optimizer, the bf16-faithful wrappers included), the
EMA when the preset uses one, and random inputs at 1024px: latents 32x32x32 and 300 x 2304
text embeddings, at the preset's batch size and gradient accumulation. One optimizer step
is what the engine does per step: micro-batches of forward + fp32 MSE + backward, gradient
clipping, optimizer step, EMA update, zero_grad.

Printed and written to --out (JSON) per preset: step time, samples/s, peak memory, MFU, and
the fixed bytes the memory model predicts (``model.optimizers.fixed_bytes_per_param``) to compare.

Memory: ``max_memory_allocated`` (PyTorch's allocator) misses what bitsandbytes' paged
optimizer keeps in CUDA managed memory and the CUDA context, so the device-wide use
(``mem_get_info``, sampled after every step) is reported too and decides whether
lowest-vram stays under 12 GiB. On CUDA each preset runs in a fresh process, so one
preset's leftovers (or an out-of-memory) never affect the next.

FLOPs (analytic, ``train_flops``): forward multiply-adds per sample summed over the
layers (per image token and block: q/k/v/out projections 4D^2, cross-attention query/out
2D^2, GLUMBConv D*2H + 9*2H + H*D with H = mlp_ratio*D, linear-attention state 2*heads*d^2,
cross-attention scores 2*D*T; per text token and block: cross k/v 2*D*Dc; plus patch
embedding, caption projection and output head), times 2 FLOPs per MAC, times 3 for
forward + backward = model FLOPs (8.90 TFLOP per 1024px sample, docs/recipe.md).
Recomputation adds one more forward of each checkpointed block: hardware FLOPs = model
FLOPs + (checkpointed blocks / all blocks) x block forward FLOPs (~ +1/3 with full
checkpointing). MFU = model FLOPs x samples/s / peak; HFU uses hardware FLOPs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..model.parts import SANA_1600M_CONFIG
from . import write_json

PRESETS = ("24g", "lowest-vram", "multi-gpu")
GIB = 2**30
VRAM_BUDGET_GIB = 12.0

# Sana 1.6B (Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers transformer config): the one the
# real-size built-in model (builtin:sana-1600m-random) is built with.
SANA_1600M = SANA_1600M_CONFIG
SANA_1600M_PARAMETERS = 1_604_462_752  # of SANA_1600M (tested); the memory model's count
# FSDP units of SANA_1600M (tested): a SanaTransformerBlock, and what the root module keeps (embeddings,
# caption projection, output layers).
SANA_1600M_BLOCK_PARAMETERS = 77_920_640
SANA_1600M_ROOT_PARAMETERS = 45_976_032
SANA_1600M_INPUTS = {"latent_hw": 32, "text_tokens": 300}  # 1024px: 32x32 latents; 300 text tokens
# A tiny config for checking this script's logic on CPU (--tiny).
TINY = dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
    mlp_ratio=2.5, sample_size=8, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=False,
)
TINY_INPUTS = {"latent_hw": 8, "text_tokens": 12}


def train_flops(config: dict, latent_hw: int, text_tokens: int, recomputed_blocks: int = 0,
                frozen_base: bool = False) -> dict[str, float]:
    """Analytic training FLOPs per sample (module docstring): model, hardware, one block forward. ``frozen_base``
    (model_type lora): the backward computes activation gradients only, no weight gradients of the base, so a
    step is 2 forwards instead of 3 (the adapter's own FLOPs are negligible)."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dim = heads * head_dim
    cross_dim = config["num_cross_attention_heads"] * config["cross_attention_head_dim"]
    hidden = int(config["mlp_ratio"] * dim)
    patch = config["patch_size"]
    image_tokens = (latent_hw // patch) ** 2
    per_image_token = (
        4 * dim * dim  # self-attention q, k, v, out
        + 2 * dim * cross_dim  # cross-attention q, out
        + dim * 2 * hidden + 9 * 2 * hidden + hidden * dim  # GLUMBConv: inverted 1x1, depthwise 3x3, point 1x1
        + 2 * heads * head_dim * head_dim  # linear attention: k^T v state, then q against it
        + 2 * cross_dim * text_tokens  # cross-attention scores and weighted sum
    )
    per_text_token = 2 * cross_dim * cross_dim  # cross-attention k, v from the caption
    block_macs = image_tokens * per_image_token + text_tokens * per_text_token
    outer_macs = (
        image_tokens * config["in_channels"] * patch * patch * dim  # patch embedding
        + text_tokens * (config["caption_channels"] * dim + dim * dim)  # caption projection (2 layers)
        + image_tokens * dim * patch * patch * config["out_channels"]  # output head
    )
    forward = 2 * (config["num_layers"] * block_macs + outer_macs)
    block_forward = 2 * block_macs
    model = (2 if frozen_base else 3) * forward
    return {"model": model, "hardware": model + recomputed_blocks * block_forward, "block_forward": block_forward}


def preset_config(name: str):
    """The preset's TrainConfig, resolved as a run resolves it (no environment besides the preset)."""
    from ..config.resolve import resolve

    with tempfile.TemporaryDirectory() as tmp:
        return resolve({"PRESET": name, "WORKSPACE": tmp}).config


def _device_used_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def bench_preset(name: str, model_config: dict, inputs: dict, *, steps: int, warmup: int, peak_tflops: float,
                 device: torch.device) -> dict:
    """Build the preset's model, optimizer and inputs; time `steps` optimizer steps after `warmup`."""
    from diffusers import SanaTransformer2DModel

    from ..model import optimizers
    from ..model import parts as models
    from ..model.ema import EMA

    cfg = preset_config(name)
    weight_dtype = optimizers.weight_dtype(cfg)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = SanaTransformer2DModel(**model_config)
    model.to(weight_dtype).requires_grad_(True).train()
    num_params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":  # the fp32 init copy is gone: measure from here
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    recomputed = 0
    if cfg.gradient_checkpointing:
        recomputed = models.enable_block_checkpointing(model, cfg.gradient_checkpointing_interval)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizers.build_optimizer(cfg, params)
    ema = EMA(model, cfg.ema_decay) if cfg.use_ema else None

    batch, accumulation = cfg.train_batch_size, cfg.gradient_accumulation_steps
    hw, channels = inputs["latent_hw"], model_config["in_channels"]
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, channels, hw, hw, generator=gen, device=device)
    embeds = torch.randn(batch, inputs["text_tokens"], model_config["caption_channels"], generator=gen, device=device)
    embeds = embeds.to(weight_dtype)
    mask = torch.ones(batch, inputs["text_tokens"], dtype=torch.int64, device=device)

    def step() -> None:
        for _ in range(accumulation):
            sigmas = torch.rand(batch, generator=gen, device=device)
            noise = torch.randn(latents.shape, generator=gen, device=device)
            s = sigmas.view(-1, 1, 1, 1)
            noisy, target = (1 - s) * latents + s * noise, noise - latents
            with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                pred = model(noisy.to(weight_dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                             timestep=sigmas * 1000, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        if ema is not None:
            ema.update(model)
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    device_used = []
    for _ in range(warmup):
        step()
    sync()
    durations = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        durations.append(time.perf_counter() - t0)
        device_used.append(_device_used_bytes(device))

    step_s = statistics.median(durations)
    samples_per_step = batch * accumulation
    samples_per_s = samples_per_step / step_s
    flops = train_flops(model_config, hw, inputs["text_tokens"], recomputed)
    result = {
        "preset": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": num_params, "weight_dtype": str(weight_dtype).replace("torch.", ""), "optimizer": cfg.optimizer,
        "batch_size": batch, "gradient_accumulation_steps": accumulation, "samples_per_step": samples_per_step,
        "checkpointed_blocks": recomputed, "num_blocks": model_config["num_layers"], "ema": cfg.use_ema,
        "fixed_estimate_gib": num_params * optimizers.fixed_bytes_per_param(cfg) / GIB,  # the memory model
        "warmup_steps": warmup, "timed_steps": steps,
        "step_s_median": step_s, "step_s_mean": statistics.fmean(durations), "samples_per_s": samples_per_s,
        "model_tflop_per_sample": flops["model"] / 1e12, "hardware_tflop_per_sample": flops["hardware"] / 1e12,
        "peak_tflops": peak_tflops,
        "mfu": flops["model"] * samples_per_s / (peak_tflops * 1e12),
        "hfu": flops["hardware"] * samples_per_s / (peak_tflops * 1e12),
    }
    if device.type == "cuda":
        result.update(
            peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
            device_used_gib=max(device_used) / GIB,
        )
    return result


def run_isolated(name: str, args) -> dict:
    """One preset in a fresh Python process (clean memory, an OOM stays contained)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "sana_appliance.benchmarks.gpu", "--single", "--presets", name, "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            oom = any("OutOfMemoryError" in line or "out of memory" in line for line in tail)
            return {"preset": name, "error": "out of memory" if oom else "failed", "log_tail": tail}
        return json.loads(out.read_text())[0]


def report(results: list[dict], tiny: bool) -> None:
    for r in results:
        if "error" in r:
            print(f"  {r['preset']:<12} {r['error']}: " + " | ".join(r.get("log_tail", [])[-2:]))
            continue
        memory = f"  fixed (memory model) {r['fixed_estimate_gib']:.2f} GiB"
        if "peak_allocated_gib" in r:
            memory += (f", peak allocated {r['peak_allocated_gib']:.2f} GiB, reserved {r['peak_reserved_gib']:.2f} GiB, "
                       f"device used {r['device_used_gib']:.2f} GiB")
        print(f"  {r['preset']:<12} batch {r['batch_size']}x{r['gradient_accumulation_steps']}  "
              f"{1000 * r['step_s_median']:8.1f} ms/step  {r['samples_per_s']:7.2f} samples/s  "
              f"MFU {100 * r['mfu']:5.1f}%  HFU {100 * r['hfu']:5.1f}%" + memory)
        if r["preset"] == "lowest-vram" and "device_used_gib" in r:
            verdict = "stays under" if r["device_used_gib"] < VRAM_BUDGET_GIB else "EXCEEDS"
            r["under_12gib"] = r["device_used_gib"] < VRAM_BUDGET_GIB
            print(f"  lowest-vram {verdict} {VRAM_BUDGET_GIB:.0f} GiB (device-wide use, CUDA context and paged "
                  f"optimizer state included)")
    if tiny:
        print("  (--tiny: a tiny model on CPU checks this script's logic; its numbers mean nothing)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="presets to measure")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak for MFU (default 989: H100 SXM)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--tiny", action="store_true", help="a tiny config on CPU (checks the logic; numbers meaningless)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one preset in this process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.tiny:
        device, model_config, inputs = torch.device("cpu"), TINY, TINY_INPUTS
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures Sana 1.6B training on an NVIDIA GPU; nothing to do here. "
              "Run it on a CUDA machine, or add --tiny to check its logic on CPU.")
        return 0
    else:
        device, model_config, inputs = torch.device("cuda", torch.cuda.current_device()), SANA_1600M, SANA_1600M_INPUTS

    if args.single or args.tiny:
        results = [bench_preset(name, model_config, inputs, steps=args.steps, warmup=args.warmup,
                                peak_tflops=args.peak_tflops, device=device) for name in args.presets]
    else:
        results = [run_isolated(name, args) for name in args.presets]
    if not args.single:
        where = "tiny config on CPU" if args.tiny else f"{torch.cuda.get_device_name(device)}, Sana 1.6B at 1024px"
        print(f"gpu benchmark: {where}; {args.steps} timed steps after {args.warmup} warmup; "
              f"MFU against {args.peak_tflops:g} TFLOP/s")
        report(results, args.tiny)
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
