"""Precompute: fill the caches of text embeddings and VAE latents before training.

Gemma-2 is loaded only when some caption is missing from the cache and is freed on return;
the VAE encodes missing latents and then leaves the accelerator (validation moves it back
briefly to decode). With several processes each rank encodes its share of the FULL list
(not of what it sees missing, which differs between ranks looking at the disk at different
moments), then all ranks meet at a barrier.

A stop request is checked before every batch; every rank then abandons its share and
`prepare` raises Abandoned on all ranks together (StopVote: the vote is also the barrier).
Entries are atomic, so what was written stays valid for the next start.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.prompts import load_prompt_set
from ..distributed.stopping import Abandoned, StopVote
from ..model import parts as models
from . import caches

log = logging.getLogger(__name__)


MEMO_BYTES = 256 * 2**20  # cached samples kept in memory after their first read, per process (and per worker)


class CachedDataset(torch.utils.data.Dataset):
    """Batches of cached latents (or pixels when vae_cache_disable) and text embeddings.

    A sample read from the cache files is kept in memory while the total stays under `memo_bytes`, so later
    epochs of a small dataset (the demo's: 1.3 MB) read no file; a large one is read from the cache as before.
    The tensors are the files' own: the same numbers either way."""

    def __init__(self, samples, latent_keys, latent_caches, text_cache, online_pixels: bool, memo_bytes: int = MEMO_BYTES):
        self.samples, self.latent_keys, self.latent_caches = samples, latent_keys, latent_caches
        self.text_cache, self.online_pixels = text_cache, online_pixels
        self._memo: dict[int, dict] = {}
        self._memo_left = memo_bytes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        known = self._memo.get(index)
        if known is not None:
            return dict(known)  # collate stacks the tensors into new ones: nothing downstream writes into these
        sample = self.samples[index]
        embeds, mask = self.text_cache.load(self.text_cache.key(sample.caption))
        item = {"embeds": embeds, "mask": mask}
        if self.online_pixels:
            from .images import load_pixels

            item["pixels"] = load_pixels(sample)
        else:
            item["latents"] = self.latent_caches[sample.backend_id].load(self.latent_keys[index])
            size = sum(t.numel() * t.element_size() for t in item.values())
            if size <= self._memo_left:
                self._memo[index] = item
                self._memo_left -= size
        return dict(item)


@dataclass
class Prepared:
    text_cache: caches.TextEmbedCache
    latent_caches: dict[str, caches.LatentCache]  # by backend id
    latent_keys: list[str]  # per plan sample
    eval_keys: list[str]  # per eval sample
    prompts: dict[str, str]  # validation nickname -> prompt
    stats: dict[str, int]


def prepare(cfg, parts, plan, eval_samples, *, device: torch.device, compute_dtype: torch.dtype, rank: int,
            world: int, vote: StopVote) -> Prepared:
    encoding = caches.TextEncoding(
        encoder_identity=f"{parts.identity}|text_encoder:{cfg.text_encoder_1_precision}",
        max_length=cfg.tokenizer_max_length, dtype=str(compute_dtype),
        instruction=tuple(models.complex_human_instruction(cfg.sana_complex_human_instruction) or ()) or None,
    )
    text_cache = caches.TextEmbedCache(plan.text_embeds.cache_dir, encoding)
    prompts = load_prompt_set(cfg).prompts if cfg.validation_steps else {}
    captions = [s.caption for s in plan.samples + eval_samples] + list(prompts.values())
    negatives = [cfg.validation_negative_prompt] if cfg.validation_negative_prompt and prompts else []
    started = time.monotonic()
    _phase(vote, lambda: _fill_text_cache(text_cache, captions, negatives, cfg, parts, plan.text_embeds.write_batch_size,
                                          device, compute_dtype, rank, world, vote.check))
    text_s = time.monotonic() - started
    gc.collect()

    latent_encoding = caches.LatentEncoding(parts.identity, float(parts.vae.config.scaling_factor))
    latent_caches = {b.id: caches.LatentCache(Path(b.cache_dir_vae), latent_encoding) for b in plan.backends}
    latent_keys = [latent_caches[s.backend_id].key_for(s) for s in plan.samples]
    eval_keys = [latent_caches[s.backend_id].key_for(s) for s in eval_samples]
    started = time.monotonic()
    if not cfg.vae_cache_disable:
        _phase(vote, lambda: _fill_latents(latent_caches, plan.samples + eval_samples, latent_keys + eval_keys, parts.vae,
                                           cfg.vae_batch_size, device, rank, world, vote.check))
    if not cfg.vae_cache_disable:
        parts.vae.to("cpu")  # needed again only to decode validation images
    stats = {"text_hits": text_cache.stats.hits, "text_encoded": text_cache.stats.misses,
             "latent_hits": sum(c.stats.hits for c in latent_caches.values()),
             "latent_encoded": sum(c.stats.misses for c in latent_caches.values()),
             "text_s": round(text_s, 3), "latent_s": round(time.monotonic() - started, 3)}  # this rank's, with the waits
    return Prepared(text_cache, latent_caches, latent_keys, eval_keys, prompts, stats)


def _phase(vote: StopVote, work: Callable[[], None]) -> None:
    """Run this rank's share, then wait for every rank; Abandoned on all ranks when any asked to stop."""
    try:
        work()
    except Abandoned:
        pass
    if vote.finish():
        raise Abandoned


def _fill_text_cache(cache, captions, negatives, cfg, parts, batch_size, device, compute_dtype, rank, world,
                     check: Callable[[], None]) -> None:
    missing = [c for c in set(captions) if not cache.has(cache.key(c))]
    missing_neg = [n for n in negatives if not cache.has(cache.negative_key(n))]
    if not missing and not missing_neg and cache.has(cache.empty_key()):
        cache.stats.hits += len(set(captions))
        return
    from diffusers import SanaPipeline

    log.info("caching text embeddings: %d caption(s) to encode", len(missing) + len(missing_neg))
    text_encoder = models.load_text_encoder(parts.path, cfg, device)
    pipe = SanaPipeline(tokenizer=parts.tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
    instruction = list(cache.encoding.instruction) if cache.encoding.instruction else None

    @torch.no_grad()
    def encode(batch: list[str], negative: str = ""):
        e, m, ne, nm = pipe.encode_prompt(batch, do_classifier_free_guidance=True, negative_prompt=negative,
                                          device=device, max_sequence_length=cfg.tokenizer_max_length,
                                          complex_human_instruction=instruction)
        return e.to(compute_dtype), m, ne.to(compute_dtype), nm

    cache.fill(captions, encode, batch_size, rank, world, check=check)
    if rank == 0:
        for negative in missing_neg:
            check()
            _, _, ne, nm = encode([negative], negative)
            cache.write(cache.negative_key(negative), ne[0], nm[0], negative)


def _fill_latents(latent_caches, samples, keys, vae, vae_batch_size: int, device, rank: int, world: int,
                  check: Callable[[], None]) -> None:
    from .images import load_pixels

    vae = vae.to(device)
    mine, seen = [], set()
    for index, sample in enumerate(samples):
        cache = latent_caches[sample.backend_id]
        if (cache.root, keys[index]) in seen:
            continue  # the eval subset repeats training samples: one entry, encoded once
        seen.add((cache.root, keys[index]))
        if cache.has(keys[index]):
            cache.stats.hits += 1
        else:
            cache.stats.misses += 1
            if index % world == rank:
                mine.append(index)
    by_size: dict[tuple, list[int]] = {}
    for index in mine:
        by_size.setdefault(samples[index].size, []).append(index)
    missing = sum(c.stats.misses for c in latent_caches.values())
    if missing and rank == 0:
        log.info("caching latents: %d image(s) to encode", missing)
    for indices in by_size.values():
        for start in range(0, len(indices), vae_batch_size):
            check()
            chunk = indices[start:start + vae_batch_size]
            pixels = torch.stack([load_pixels(samples[i]) for i in chunk]).to(device, torch.float32)
            with torch.no_grad():
                latents = vae.encode(pixels).latent * vae.config.scaling_factor
            for i, lat in zip(chunk, latents):
                latent_caches[samples[i].backend_id].write(keys[i], lat, str(samples[i].path))
