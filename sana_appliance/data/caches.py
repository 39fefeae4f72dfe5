"""Content-keyed on-disk caches of VAE latents and text embeddings.

A cache entry's key hashes everything that determines its value, so nothing stale is
ever reused: latents hash the image bytes, every transform parameter, the VAE identity
and its scaling factor; text embeddings hash the caption, the complex human instruction,
the max length, the encoder identity and the dtype. Entries are safetensors files written
atomically (temp file, fsync, rename), so a killed run never leaves a half-written entry,
and several ranks can fill one cache, each encoding its share.

Text embeddings are the big cache (300 x 2304 per caption for Sana); only rows the
attention mask keeps are stored, with the mask, and padding is restored as zeros (masked
positions get no attention weight, so the model's output is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.fsutil import atomic_save_safetensors

log = logging.getLogger(__name__)
FORMAT_VERSION = "1"


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return 1.0 if total == 0 else self.hits / total


@dataclass
class KeyedCache:
    """A folder of `<key[:2]>/<key>.safetensors` entries."""

    root: Path
    stats: CacheStats = field(default_factory=CacheStats)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()


# ---------------------------------------------------------------- text embeddings


@dataclass(frozen=True)
class TextEncoding:
    """Everything that decides a caption's embedding besides the caption itself."""

    encoder_identity: str
    instruction: tuple[str, ...] | None
    max_length: int
    dtype: str

    def key(self, caption: str, use_instruction: bool = True) -> str:
        return digest({
            "v": FORMAT_VERSION, "caption": caption, "encoder": self.encoder_identity,
            "instruction": list(self.instruction) if (use_instruction and self.instruction) else None,
            "max_length": self.max_length, "dtype": self.dtype,
        })


def pack_embedding(embeds: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    keep = mask.bool()
    return {"embeds": embeds[keep].clone(), "mask": mask.to(torch.uint8).clone()}


def unpack_embedding(entry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = entry["mask"].to(torch.int64)
    rows = entry["embeds"]
    full = rows.new_zeros(mask.shape[0], rows.shape[-1])
    full[mask.bool()] = rows
    return full, mask


class TextEmbedCache(KeyedCache):
    def __init__(self, root: Path, encoding: TextEncoding):
        super().__init__(root)
        self.encoding = encoding

    def key(self, caption: str) -> str:
        return self.encoding.key(caption)

    def empty_key(self) -> str:
        """The unconditional embedding ("" without the instruction), as inference's CFG uses."""
        return self.negative_key("")

    def negative_key(self, text: str) -> str:
        """Negative prompts are encoded without the instruction, as SanaPipeline does."""
        return self.encoding.key(text, use_instruction=False)

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return unpack_embedding(load_file(self.path(key)))

    def fill(
        self,
        captions: Sequence[str],
        encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        """Encode every caption not yet cached (this rank's share) plus the empty caption.

        `encode(captions)` returns (embeds, mask, empty_embeds, empty_mask) as SanaPipeline does.
        `check` runs before each batch and raises to abandon (a stop request)."""
        unique = sorted(set(captions))
        # Shares come from the full sorted list, not from what is missing: ranks look at the
        # disk at different moments, and a share computed from "missing" could skip entries.
        mine = [c for c in unique[rank::world_size] if not self.has(self.key(c))]
        todo = sum(1 for c in unique if not self.has(self.key(c)))
        self.stats.hits += len(unique) - todo
        self.stats.misses += todo
        need_empty = not self.has(self.empty_key()) and rank == 0
        if not mine and need_empty:
            mine = [unique[0] if unique else ""]
        for start in range(0, len(mine), batch_size):
            check()
            chunk = mine[start:start + batch_size]
            embeds, mask, empty_embeds, empty_mask = encode(chunk)
            for caption, e, m in zip(chunk, embeds, mask):
                self.write(self.key(caption), e, m, caption)
            if need_empty:
                self.write(self.empty_key(), empty_embeds[0], empty_mask[0], "")
                need_empty = False

    def write(self, key: str, embeds: torch.Tensor, mask: torch.Tensor, caption: str) -> None:
        meta = {"caption": caption, "encoder": self.encoding.encoder_identity,
                "max_length": str(self.encoding.max_length), "format": FORMAT_VERSION}
        atomic_save_safetensors(pack_embedding(embeds.detach().cpu(), mask.detach().cpu()), self.path(key), meta)


# ---------------------------------------------------------------- latents


@dataclass(frozen=True)
class LatentEncoding:
    vae_identity: str
    scaling_factor: float

    def key(self, content_sha256: str, transform: dict) -> str:
        return digest({
            "v": FORMAT_VERSION, "image": content_sha256, "transform": transform,
            "vae": self.vae_identity, "scaling_factor": self.scaling_factor,
        })


class LatentCache(KeyedCache):
    def __init__(self, root: Path, encoding: LatentEncoding):
        super().__init__(root)
        self.encoding = encoding

    def key_for(self, sample) -> str:
        return self.encoding.key(sample.content_sha256, sample.transform)

    def load(self, key: str) -> torch.Tensor:
        return load_file(self.path(key))["latents"]

    def write(self, key: str, latents: torch.Tensor, source: str) -> None:
        meta = {"scaling_factor": repr(self.encoding.scaling_factor), "scaled": "true",
                "vae": self.encoding.vae_identity, "source": source, "format": FORMAT_VERSION}
        atomic_save_safetensors({"latents": latents.detach().to(torch.float32).cpu()}, self.path(key), meta)
