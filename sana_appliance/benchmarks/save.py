"""Checkpoint save time per preset at Sana 1.6B's real byte counts, on this disk.

    python -m sana_appliance.benchmarks.save                       # full size, temp dir under /tmp
    python -m sana_appliance.benchmarks.save --dir /workspace/bench --scale 0.01   # smoke test

This number decides the stop grace (``docker run --stop-timeout``): on SIGTERM the trainer
finishes its step and saves, and whatever is not written when the grace ends is lost.

Per preset, the state a real checkpoint holds is built from random bytes with the real
sizes: the transformer weights in the preset's weight dtype (model.optimizers.weight_dtype), one
tensor per parameter of the 1.6B model with its real name and shape; the optimizer state
(model.optimizers.optimizer_state_bytes_per_param bytes per parameter, one uint8 tensor per
parameter, pickled with torch.save as the optimizer's state dict is); and the fp32 EMA
when the preset uses it. ``run.checkpoints.save`` writes it (safetensors + torch.save, fsync
of every file, marker, rename), so the time includes getting the bytes onto the disk.

Memory: the whole state is in RAM during a save (as in training). A preset whose bytes
exceed --max-ram-gib (default 60% of MemAvailable) is measured at the largest scale that
fits and its time extrapolated linearly (write time is proportional to bytes once a
write is several GiB); the output says so. A preset whose bytes do not fit in the free
space of --dir is skipped, with a message.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import write_json

PRESETS = ("24g", "lowest-vram", "multi-gpu")
GIB = 2**30
_BLOCK_BYTES = 64 << 20  # random bytes generated once and tiled: fast, and incompressible


def parameter_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Sana 1.6B transformer's parameters (built on the meta device)."""
    from diffusers import SanaTransformer2DModel

    from .gpu import SANA_1600M

    with torch.device("meta"):
        model = SanaTransformer2DModel(**SANA_1600M)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def preset_layout(name: str) -> dict:
    """Bytes per parameter of each part of the preset's checkpoint, and its documented stop grace."""
    from ..config import presets
    from ..model import optimizers
    from .gpu import preset_config

    cfg = preset_config(name)
    dtype = optimizers.weight_dtype(cfg)
    header = presets.load(name).path.read_text(encoding="utf-8")
    grace = re.search(r"--stop-timeout\s+(\d+)", header)
    return {"weight_dtype": dtype, "optimizer": cfg.optimizer, "use_ema": cfg.use_ema,
            "optimizer_bytes_per_param": optimizers.optimizer_state_bytes_per_param(cfg),
            "documented_stop_timeout_s": int(grace.group(1)) if grace else None}


def _random_fill(tensor: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    flat = tensor.view(-1).view(torch.uint8)
    for start in range(0, flat.numel(), block.numel()):
        chunk = flat[start:start + block.numel()]
        chunk.copy_(block[:chunk.numel()])
    return tensor


def build_state(shapes: dict[str, tuple[int, ...]], layout: dict, scale: float, block: torch.Tensor):
    """(tensors, objects) for checkpoints.save: every tensor `scale` times its real element count."""
    weight_dtype = layout["weight_dtype"]
    weights, ema, opt_state = {}, {}, {}
    for index, (name, shape) in enumerate(shapes.items()):
        numel = max(1, round(math.prod(shape) * scale))
        weights[name] = _random_fill(torch.empty(numel, dtype=weight_dtype), block)
        if layout["use_ema"]:
            ema[f"shadow.{name}"] = _random_fill(torch.empty(numel, dtype=torch.float32), block)
        state_bytes = max(1, round(numel * layout["optimizer_bytes_per_param"]))
        opt_state[index] = {"state": _random_fill(torch.empty(state_bytes, dtype=torch.uint8), block)}
    tensors = {"transformer": weights, **({"ema": ema} if ema else {})}
    objects = {"optimizer": {"state": opt_state, "param_groups": [{"params": list(opt_state), "lr": 1e-5}]}}
    return tensors, objects


def state_bytes(tensors: dict, objects: dict) -> int:
    total = sum(t.numel() * t.element_size() for part in tensors.values() for t in part.values())
    return total + sum(s["state"].numel() for s in objects["optimizer"]["state"].values())


def full_bytes(shapes: dict, layout: dict) -> int:
    """What the preset's checkpoint holds at full size (tensor payload)."""
    n = sum(math.prod(s) for s in shapes.values())
    per_param = torch.finfo(layout["weight_dtype"]).bits // 8 + layout["optimizer_bytes_per_param"]
    return int(n * (per_param + (4 if layout["use_ema"] else 0)))


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def save_once(root: Path, tensors: dict, objects: dict) -> float:
    from ..run import checkpoints

    t0 = time.perf_counter()
    path = checkpoints.save(root, 1, tensors=tensors, objects=objects, state={"step": 1, "benchmark": True})
    seconds = time.perf_counter() - t0
    shutil.rmtree(path)
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real size (e.g. 0.01 for a smoke test)")
    parser.add_argument("--dir", type=Path, help="where checkpoints are written (default: a temp dir under /tmp)")
    parser.add_argument("--max-ram-gib", type=float, help="largest state built in RAM (default 60%% of MemAvailable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    max_ram = (args.max_ram_gib * GIB) if args.max_ram_gib else 0.6 * mem_available_bytes()
    shapes = parameter_shapes()
    block = torch.randint(0, 256, (_BLOCK_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-save-", dir=base))
    results = []
    print(f"save benchmark: Sana 1.6B checkpoint state per preset, scale {args.scale:g}, into {root} "
          f"(RAM cap {max_ram / GIB:.1f} GiB)")
    try:
        for name in args.presets:
            layout = preset_layout(name)
            requested = full_bytes(shapes, layout) * args.scale  # what the output reports
            scale = min(args.scale, args.scale * max_ram / requested)  # what is built in RAM
            to_write = requested * scale / args.scale
            free = shutil.disk_usage(root).free
            row = {"preset": name, "optimizer": layout["optimizer"], "ema": layout["use_ema"],
                   "weight_dtype": str(layout["weight_dtype"]).replace("torch.", ""), "scale": args.scale,
                   "documented_stop_timeout_s": layout["documented_stop_timeout_s"]}
            if to_write * 1.05 > free:
                row["skipped"] = f"needs {to_write / GIB:.1f} GiB, only {free / GIB:.1f} GiB free in {root}"
                print(f"  {name:<12} skipped: {row['skipped']}")
                results.append(row)
                continue
            tensors, objects = build_state(shapes, layout, scale, block)
            written = state_bytes(tensors, objects)
            seconds = save_once(root, tensors, objects)
            del tensors, objects
            row.update(gib=requested / GIB, save_s=seconds * requested / written, gb_per_s=written / seconds / 1e9,
                       measured_gib=written / GIB, measured_s=seconds, extrapolated=scale < args.scale)
            note = f"  (measured {written / GIB:.2f} GiB in {seconds:.1f} s, extrapolated linearly)" if row["extrapolated"] else ""
            grace = layout["documented_stop_timeout_s"]
            print(f"  {name:<12} {row['gib']:7.2f} GiB  {row['save_s']:7.1f} s  {row['gb_per_s']:6.2f} GB/s  "
                  f"(documented --stop-timeout {grace} s){note}")
            results.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
