"""Data throughput: building the latent cache, and loading cached batches vs decoding per step.

    python -m sana_appliance.benchmarks.data                   # 128 JPEGs at 256px, batch 4
    python -m sana_appliance.benchmarks.data --quick           # tiny sizes (smoke test)

On a generated folder of photo-like images (smooth colour fields plus grain, JPEG q90,
captions in .txt files), scanned by the real ``data.plan.build_plan``:

1. cache building, images/s: ``images.load_pixels`` alone (decode + resize + crop), then
   load_pixels + the tiny VAE's encode (x scaling factor) + ``LatentCache.write`` (atomic),
   in ``vae_batch_size`` chunks per bucket, the way ``data.precompute`` fills the latent cache;
2. cached-batch loading, batches/s: ``data.precompute.CachedDataset`` + ``data.sampler.BucketBatchSampler``
   + ``DataLoader`` with 0 and 2 workers, text embeddings at Sana's real size (300 x 2304
   bf16, the big cache) written beforehand with random values;
3. the naive baseline on the same files and batch order: PIL open + resize + to-tensor per
   image every step (and the same plus a VAE encode, which is what training without a
   latent cache really pays per step).

Files are freshly written, so reads come from the page cache: these are CPU costs, not
disk costs. Worker start-up is timed separately from the steady state.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import write_json


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` photo-like JPEGs (a little larger than `size`, so load_pixels resizes) + captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    side = int(size * 1.25)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a photo number {i} of a colourful smooth scene")


def build_plan(workspace: Path, images: Path, size: int, size_multiple: int):
    from ..core.workspace import Workspace
    from ..data.plan import build_plan as plan_from_config

    ws = Workspace(root=workspace, hf_home=workspace / "hf")
    config = workspace / "multidatabackend.json"
    config.write_text(json.dumps([
        {"id": "bench", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": size, "resolution_type": "pixel_area", "minimum_image_size": size, "crop": True,
         "crop_aspect": "square", "cache_dir_vae": str(workspace / "cache" / "vae")},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(workspace / "cache" / "text")},
    ]))
    return ws, plan_from_config(str(config), ws, size_multiple=size_multiple, seed=0, min_samples=1)


def tiny_vae(ws):
    """The built-in tiny Sana's VAE, loaded as training loads it (fp32, eval, frozen)."""
    from diffusers import AutoencoderDC

    from ..model.parts import builtin_model_path

    vae = AutoencoderDC.from_pretrained(builtin_model_path(ws.cache_dir), subfolder="vae", torch_dtype=torch.float32)
    vae.requires_grad_(False)
    return vae.eval()


def time_decode(samples) -> float:
    from ..data.images import load_pixels

    t0 = time.perf_counter()
    for sample in samples:
        load_pixels(sample)
    return time.perf_counter() - t0


def time_cache_build(samples, keys, cache, vae, batch_size: int) -> dict[str, float]:
    """load_pixels + encode + atomic write of every sample, vae batches per bucket (as data.precompute does).

    Returns seconds per phase (decode, encode, write) and in all."""
    from ..data.images import load_pixels

    by_size: dict[tuple, list[int]] = {}
    for index, sample in enumerate(samples):
        by_size.setdefault(sample.size, []).append(index)
    phases = {"decode": 0.0, "encode": 0.0, "write": 0.0}
    t_start = time.perf_counter()
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            t0 = time.perf_counter()
            pixels = torch.stack([load_pixels(samples[i]) for i in chunk])
            t1 = time.perf_counter()
            with torch.no_grad():
                latents = vae.encode(pixels).latent * vae.config.scaling_factor
            t2 = time.perf_counter()
            for i, lat in zip(chunk, latents):
                cache.write(keys[i], lat, str(samples[i].path))
            t3 = time.perf_counter()
            phases["decode"] += t1 - t0
            phases["encode"] += t2 - t1
            phases["write"] += t3 - t2
    phases["total"] = time.perf_counter() - t_start
    return phases


def fill_text_cache(samples, cache, tokens: int, dim: int) -> None:
    """Random embeddings at the given size: loading cost depends on bytes, not values."""
    gen = torch.Generator().manual_seed(0)
    for caption in sorted({s.caption for s in samples}):
        embeds = torch.randn(tokens, dim, generator=gen).to(torch.bfloat16)
        cache.write(cache.key(caption), embeds, torch.ones(tokens, dtype=torch.int64), caption)


def time_loader(batches, count: int) -> tuple[float, float]:
    """(seconds to the first batch, seconds per batch over the next `count`)."""
    t0 = time.perf_counter()
    it = iter(batches)
    next(it)
    t1 = time.perf_counter()
    for _ in range(count):
        next(it)
    return t1 - t0, (time.perf_counter() - t1) / count


def naive_batches(samples, sampler, vae=None):
    """What a trainer without caches does each step: open, resize, to tensor (then encode)."""
    for indices in sampler:
        tensors = []
        for i in indices:
            with Image.open(samples[i].path) as im:
                rgb = im.convert("RGB").resize(samples[i].size, Image.Resampling.LANCZOS)
            tensors.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        pixels = torch.stack(tensors)
        if vae is not None:
            with torch.no_grad():
                pixels = vae.encode(pixels).latent * vae.config.scaling_factor
        yield pixels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="generated images (default 128)")
    parser.add_argument("--size", type=int, default=256, help="bucket side in px (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size (default 4, the 24g preset's)")
    parser.add_argument("--vae-batch-size", type=int, default=4, help="images per VAE encode (default 4)")
    parser.add_argument("--batches", type=int, default=64, help="timed batches per loader (default 64)")
    parser.add_argument("--text-tokens", type=int, default=300, help="cached text tokens (Sana: 300)")
    parser.add_argument("--text-dim", type=int, default=2304, help="cached text width (Sana/Gemma-2: 2304)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to try")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--quick", action="store_true", help="16 images at 64px, small text, 8 batches")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.batches, args.text_tokens, args.text_dim = 16, 64, 8, 16, 32
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from ..core.workspace import Workspace
    from ..data import caches
    from ..data.precompute import CachedDataset
    from ..data.sampler import BucketBatchSampler

    results: dict = {"images": args.images, "size_px": args.size, "batch_size": args.batch_size,
                     "text_embedding": [args.text_tokens, args.text_dim], "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        workspace = Path(tmp)
        make_images(workspace / "images", args.images, args.size)

        vae = tiny_vae(Workspace(root=workspace, hf_home=workspace / "hf"))
        multiple = int(vae.spatial_compression_ratio)  # the tiny transformer's patch is 1
        _, plan = build_plan(workspace, workspace / "images", args.size, multiple)
        samples = plan.samples
        latent_cache = caches.LatentCache(plan.backends[0].cache_dir_vae, caches.LatentEncoding("bench-vae", 0.41407))
        keys = [latent_cache.key_for(s) for s in samples]

        decode_s = time_decode(samples)
        build = time_cache_build(samples, keys, latent_cache, vae, args.vae_batch_size)
        n = len(samples)
        results.update(decode_images_per_s=n / decode_s, cache_build_images_per_s=n / build["total"],
                       cache_build_ms_per_image={k: 1000 * v / n for k, v in build.items()})
        latent_bytes = latent_cache.path(keys[0]).stat().st_size

        encoding = caches.TextEncoding("bench-encoder", None, args.text_tokens, "torch.bfloat16")
        text_cache = caches.TextEmbedCache(plan.text_embeds.cache_dir, encoding)
        fill_text_cache(samples, text_cache, args.text_tokens, args.text_dim)
        text_bytes = text_cache.path(text_cache.key(samples[0].caption)).stat().st_size
        results.update(latent_entry_bytes=latent_bytes, text_entry_bytes=text_bytes)

        dataset = CachedDataset(samples, keys, {"bench": latent_cache}, text_cache, online_pixels=False)
        loaders = []
        for workers in args.workers:
            sampler = BucketBatchSampler(plan, args.batch_size, seed=0)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
            start_s, per_batch = time_loader(loader, args.batches)  # workers stop when the iterator dies
            loaders.append((f"cached: CachedDataset + DataLoader, {workers} workers", start_s, per_batch))
            results[f"cached_{workers}_workers_batches_per_s"] = 1 / per_batch
            results[f"cached_{workers}_workers_first_batch_s"] = start_s
        for name, with_vae in (("naive: PIL open + resize + to-tensor per step", None),
                               ("naive + VAE encode per step (no latent cache)", vae)):
            sampler = BucketBatchSampler(plan, args.batch_size, seed=0)
            start_s, per_batch = time_loader(naive_batches(samples, sampler, with_vae), args.batches)
            loaders.append((name, start_s, per_batch))
            results[f"{'naive_with_vae' if with_vae else 'naive'}_batches_per_s"] = 1 / per_batch

    print(f"data benchmark: {args.images} JPEGs -> {args.size}px buckets, tiny VAE (x{multiple}), "
          f"{args.threads} torch thread(s), warm page cache")
    print(f"  cache build, load_pixels only            {results['decode_images_per_s']:8.1f} images/s")
    print(f"  cache build, load_pixels + encode + write {results['cache_build_images_per_s']:8.1f} images/s"
          f"  (ms/image: decode {1000 * build['decode'] / n:.1f}, encode {1000 * build['encode'] / n:.1f}, "
          f"atomic write {1000 * build['write'] / n:.1f})")
    print(f"  cache entries: latents {latent_bytes / 1024:.0f} KiB, text embeddings {text_bytes / 1024:.0f} KiB")
    print(f"  batch loading, batch {args.batch_size}, {args.batches} batches after the first:")
    for name, start_s, per_batch in loaders:
        print(f"    {name:<52} {1 / per_batch:8.1f} batches/s  {args.batch_size / per_batch:8.1f} images/s"
              f"  (first batch {1000 * start_s:.0f} ms)")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
