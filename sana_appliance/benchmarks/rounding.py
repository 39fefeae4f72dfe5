"""The bf16-faithful 8-bit Lion step against bitsandbytes' bare one, on Sana 1.6B's parameter shapes.

    python -m sana_appliance.benchmarks.rounding --out rounding.json        # on the GPU (CUDA), all 1.6B
    python -m sana_appliance.benchmarks.rounding --tiny                     # on CPU: one block's shapes (78M)
    python -m sana_appliance.benchmarks.rounding --tiny --shrink 8 --steps 2 --warmup 1   # logic check, seconds

Variants, each over fresh bf16 parameters with the shapes of SanaTransformer2DModel(SANA_1600M) (``--tiny``: the
first ``--blocks`` blocks' shapes only) and the same random gradients:
- ``bare``: ``bnb.optim.Lion8bit`` (Paged on CUDA, as lowest-vram) on the bf16 weights: fast, but it loses
  every update below half a bf16 spacing (model/optimizers.py);
- ``eager``: the optimizers table's ``bnb-lion8bit(-paged)`` (model.precision.ExtendedPrecision) with its eager
  compose and rounding;
- ``compiled``: the same with the compiled kernels (model.precision.FUSED_DEVICES), as it runs on a GPU.
Printed and written (JSON): the median step time after ``--warmup`` steps, and each one's ratio to bare
(issue 14's target: the faithful step at most 1.5x the bare one).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from . import write_json


def shapes(tiny: bool, blocks: int, shrink: int) -> list[torch.Size]:
    """The trainable parameters' shapes of Sana 1.6B (tiny: those of its first `blocks` blocks, each side divided
    by `shrink`)."""
    from diffusers import SanaTransformer2DModel

    from ..model.parts import SANA_1600M_CONFIG

    with torch.device("meta"):
        model = SanaTransformer2DModel(**SANA_1600M_CONFIG)
    if tiny:
        return [torch.Size(max(1, d // shrink) if d > 16 else d for d in p.shape)
                for block in model.transformer_blocks[:blocks] for p in block.parameters()]
    return [p.shape for p in model.parameters()]


def step_times(variant: str, sizes: list[torch.Size], device: torch.device, steps: int) -> list[float]:
    """`steps` optimizer steps of one variant, timed (this process's kernel choice restored after)."""
    from ..model import precision

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in sizes]
    paged = device.type == "cuda"
    saved = precision.FUSED_DEVICES, dict(precision._KERNELS)
    precision._KERNELS.clear()
    precision.FUSED_DEVICES = (device.type,) if variant == "compiled" else ()
    try:
        return _time_steps(variant, params, device, steps, paged)
    finally:
        precision.FUSED_DEVICES = saved[0]
        precision._KERNELS.clear()
        precision._KERNELS.update(saved[1])


def _time_steps(variant: str, params: list, device: torch.device, steps: int, paged: bool) -> list[float]:
    import bitsandbytes as bnb

    from ..config.schema import TrainConfig
    from ..model import optimizers, precision

    if variant == "bare":
        opt = (bnb.optim.PagedLion8bit if paged else bnb.optim.Lion8bit)(params, lr=1e-5)
    else:
        cfg = dataclasses.replace(TrainConfig(), optimizer="bnb-lion8bit-paged", mixed_precision="bf16",
                                  learning_rate=1e-5)
        opt = optimizers.build_optimizer(cfg, params)
    generator = torch.Generator(device=device).manual_seed(1)
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device=device, dtype=torch.bfloat16, generator=generator) * 1e-3
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if variant == "compiled":
        fused = precision.kernels(device).fused
        if not all(fused.values()):
            raise RuntimeError(f"the compiled kernels were not used ({fused}): see the warning above")
    del opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, the first --blocks blocks' shapes")
    parser.add_argument("--blocks", type=int, default=1, help="blocks' shapes with --tiny (default 1)")
    parser.add_argument("--shrink", type=int, default=1, help="with --tiny, divide each side above 16 by this")
    parser.add_argument("--steps", type=int, default=8, help="steps per variant (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out (compiles happen there; default 3)")
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: use --tiny for the CPU logic check")
        return {}
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, device: torch.device) -> dict:
    sizes = shapes(args.tiny, args.blocks, args.shrink)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "parameters": sum(s.numel() for s in sizes), "tensors": len(sizes), "steps": args.steps,
               "warmup": args.warmup, "variants": {}}
    for variant in ("bare", "eager", "compiled"):
        taken = step_times(variant, sizes, device, args.steps + args.warmup)[args.warmup:]
        results["variants"][variant] = {"median_step_s": statistics.median(taken), "step_s": taken}
    bare = results["variants"]["bare"]["median_step_s"]
    print(f"8-bit Lion step on {results['parameters']:,} bf16 parameters ({results['tensors']} tensors), "
          f"{results['device']}:")
    for variant, r in results["variants"].items():
        r["vs_bare"] = r["median_step_s"] / bare
        print(f"  {variant:<9} {1000 * r['median_step_s']:9.1f} ms   x{r['vs_bare']:.2f} of bare")
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
