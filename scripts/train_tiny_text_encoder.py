"""Train the demo's tiny Gemma-2 so that a caption's embedding says which colour is the shape's and which the
background's.

    OMP_NUM_THREADS=1 python scripts/train_tiny_text_encoder.py   # ~6 min on one core; writes sana_appliance/model/tiny_gemma2.safetensors

A random 2-layer Gemma-2 tells the demo's colours apart, but barely their roles: the same colour as the shape
and as the background embeds alike, and the trained transformer then swaps them. The captions go through the
real inference path (SanaPipeline.encode_prompt with the complex human instruction, the demo's
tokenizer_max_length); three linear probes on the mean of the caption's embeddings learn shape, shape colour and
background colour, and the encoder learns with them. Only the training combinations' captions are used (the
demo's held-out ones never). Seeded, CPU; the record beside the weights holds the command and the sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sana_appliance.data import demo  # noqa: E402
from sana_appliance.model import parts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=parts.TINY_TEXT_WEIGHTS)
    args = parser.parse_args(argv)

    from diffusers import SanaPipeline
    from safetensors.torch import save_file

    tokenizer, encoder = parts.tiny_text_encoder(pretrained=False)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    combos = [c for c in demo._combos() if c not in demo.HELD_OUT]
    captions = [demo.caption_of(*c) for c in combos]
    targets = [torch.tensor([list(names).index(c[i]) for c in combos])
               for i, names in enumerate((demo.SHAPES, demo.COLOURS, demo.COLOURS))]
    torch.manual_seed(args.seed)
    width = encoder.config.hidden_size
    probes = torch.nn.ModuleList([torch.nn.Linear(width, len(demo.SHAPES)), torch.nn.Linear(width, len(demo.COLOURS)),
                                  torch.nn.Linear(width, len(demo.COLOURS))])
    optimizer = torch.optim.AdamW([*encoder.parameters(), *probes.parameters()], lr=args.lr, weight_decay=0.0)
    instruction = parts.default_complex_human_instruction()
    t0 = time.monotonic()
    encoder.train()
    draw = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        pick = torch.randperm(len(captions), generator=draw)[:args.batch]
        embeds, mask, _, _ = pipe.encode_prompt([captions[i] for i in pick], do_classifier_free_guidance=False,
                                                device=torch.device("cpu"),
                                                max_sequence_length=args.max_length,
                                                complex_human_instruction=instruction)
        pooled = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        losses = [torch.nn.functional.cross_entropy(probe(pooled), target[pick]) for probe, target in zip(probes, targets)]
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == 1:
            accuracy = [(probe(pooled).argmax(-1) == t[pick]).float().mean().item() for probe, t in zip(probes, targets)]
            print(f"step {step}: loss {loss.item():.4f} probe accuracy {accuracy} ({time.monotonic() - t0:.0f} s)",
                  flush=True)
    encoder.eval()
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    threads = os.environ.get("OMP_NUM_THREADS")
    record = {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + "python scripts/train_tiny_text_encoder.py"
              + f" --steps {args.steps} --lr {args.lr} --batch {args.batch} --max-length {args.max_length} --seed {args.seed}",
              "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1), "final_loss": loss.item(),
              "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(), "bytes": args.out.stat().st_size}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
