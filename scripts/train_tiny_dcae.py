"""Train the demo's tiny DC-AE (diffusers AutoencoderDC) to reconstruct the demo's shapes.

    OMP_NUM_THREADS=1 python scripts/train_tiny_dcae.py   # ~16 min on one core; writes sana_appliance/model/tiny_dcae.safetensors

Seeded and CPU-only. The images come from the demo dataset's own drawing code (data/demo.py), endlessly
re-drawn with fresh positions, sizes and colour pairs. The loss is the pixel MSE in [-1, 1]; the latents
are kept near unit scale by a small penalty, and the shipped `scaling_factor` is measured at the end
(1 / the latents' std), as the real DC-AE's is. The weights are written with safetensors (fp32, ~0.5 MB),
beside a JSON record of the command, the settings, the final reconstruction error and the weights' sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sana_appliance.data import demo  # noqa: E402
from sana_appliance.model.parts import TINY_VAE_CONFIG, TINY_VAE_WEIGHTS  # noqa: E402


def batch(rng: random.Random, size: int) -> torch.Tensor:
    combos = [(s, c, b) for s in demo.SHAPES for c in demo.COLOURS for b in demo.COLOURS if c != b]
    images = [np.asarray(demo._draw(*rng.choice(combos), rng), dtype=np.float32) for _ in range(size)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TINY_VAE_WEIGHTS)
    args = parser.parse_args(argv)

    from diffusers import AutoencoderDC
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    vae = AutoencoderDC(**TINY_VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.monotonic()
    for step in range(1, args.steps + 1):
        x = batch(rng, args.batch)
        latent = vae.encode(x).latent
        recon = vae.decode(latent).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + 1e-4 * latent.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            print(f"step {step}: mse {mse.item():.5f} latent std {latent.std().item():.3f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        x = batch(random.Random(args.seed + 1), 256)
        latent = vae.encode(x).latent
        recon = vae.decode(latent).sample.clamp(-1, 1)
        mse = torch.nn.functional.mse_loss(recon, x).item()
        # Colour fidelity in 0-255 units: the demo's colours must survive the round trip.
        mae255 = ((recon - x).abs().mean() * 127.5).item()
        scaling = 1.0 / latent.std().item()
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"scaling_factor": repr(scaling)})
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    threads = os.environ.get("OMP_NUM_THREADS")
    record = {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + "python scripts/train_tiny_dcae.py" + "".join(
                  f" --{k} {v}" for k, v in (("steps", args.steps), ("batch", args.batch), ("lr", args.lr),
                                             ("seed", args.seed))),
              "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1), "held_out_mse": mse,
              "held_out_mean_abs_error_0_255": mae255, "scaling_factor": scaling, "sha256": digest,
              "bytes": args.out.stat().st_size}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
