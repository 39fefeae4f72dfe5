"""Discovery: walk each dataset folder once and decide, per file, sample or skip.

The result, a :class:`DataPlan`, lists every usable sample once (with its caption,
bucket and pixel transform) and every skipped file with the reason. Bad files
never stop a run that still has enough data, and are never silent: each one is
in ``data_report.json`` and counted in a one-line log summary per dataset.

Discovery reads headers, not pixels (see :func:`images.probe_image`); files are
probed on a small thread pool because hashing and PNG CRC checks release the GIL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.errors import DataError
from ..core.fsutil import atomic_write_json
from ..core.workspace import Workspace
from . import demo
from .backends import BACKEND_TYPES, Backend, TextEmbedsBackend, load_data_config, parse_data_config
from .images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    Sample,
    UnusableImage,
    plan_transform,
    probe_image,
    sample_key,
    size_measure,
)

log = logging.getLogger(__name__)

CAPTION_EXTENSIONS = frozenset({".txt"})
# The counter a file manager or browser adds to a second copy: `a red car (2).png`. A trailing
# `-N` is never stripped: it is part of too many real names (`iphone-15`, `f-16`, `ak-47`).
_DUPLICATE_SUFFIX = re.compile(r"\s*\(\d+\)$")


@dataclass
class DataPlan:
    backends: list[Backend]
    text_embeds: TextEmbedsBackend
    samples: list[Sample]  # every usable sample once (repeats are applied by the sampler)
    skipped: list[dict]  # {"path": str, "backend": id, "reason": str}
    stats: dict[str, dict] = field(default_factory=dict)  # per backend id, for the report

    def backend(self, backend_id: str) -> Backend:
        for b in self.backends:
            if b.id == backend_id:
                return b
        raise KeyError(backend_id)

    def write_report(self, output_dir: Path) -> Path:
        """output_dir/data_report.json (atomic): counts per dataset and every skipped file with why."""
        output_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "fingerprint": self.fingerprint(),
            "num_samples": len(self.samples),
            "num_skipped": len(self.skipped),
            "backends": {b.id: self.stats.get(b.id, {}) for b in self.backends},
            "skipped": self.skipped,
        }
        target = output_dir / "data_report.json"
        atomic_write_json(target, report, indent=2, ensure_ascii=False)
        return target

    def fingerprint(self) -> str:
        """sha256 over every sample's identity; paths are relative so a moved volume keeps it."""
        digest = hashlib.sha256()
        for s in self.samples:
            root = self.backend(s.backend_id).instance_data_dir
            try:
                rel = s.path.relative_to(root).as_posix()
            except ValueError:
                rel = s.path.as_posix()
            row = [s.backend_id, rel, s.caption, sample_key(s)]
            digest.update(json.dumps(row, ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()


# ---------------------------------------------------------------- captions


def filename_caption(path: Path) -> str:
    """`a_red_car (2).png` -> `a red car`, `iphone-15.png` -> `iphone-15`.

    Underscores become spaces, runs of spaces one space, and a trailing copy counter ` (N)` is
    dropped; everything else is kept as named (SimpleTuner's current rule, plus the counter).
    """
    text = path.stem.replace("_", " ")
    text = _DUPLICATE_SUFFIX.sub("", text.strip())
    return " ".join(text.split())


def _textfile_caption(path: Path, backend: Backend, root: Path, seed: int) -> str:
    caption_path = path.with_suffix(".txt")
    if not caption_path.exists():
        raise UnusableImage(f"caption file {caption_path.name} is missing (caption_strategy: textfile)")
    if caption_path.is_symlink() and not _inside(caption_path, root):
        raise UnusableImage(f"caption file {caption_path.name} is a symlink pointing outside the dataset folder")
    try:
        raw = caption_path.read_bytes()
    except OSError as exc:
        raise UnusableImage(f"caption file {caption_path.name} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnusableImage(
            f"caption file {caption_path.name} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8"
        ) from None
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UnusableImage(f"caption file {caption_path.name} is empty")
    if backend.disable_multiline_split or len(lines) == 1:
        return " ".join(lines)
    # SimpleTuner: one caption per line. A sample has one caption, so pick one line,
    # fixed per file and seed, so the text-embed cache stays valid across runs.
    rel = path.relative_to(root).as_posix()
    pick = int.from_bytes(hashlib.sha256(f"{seed}:{backend.id}:{rel}".encode()).digest()[:8], "big")
    return lines[pick % len(lines)]


def caption_for(path: Path, backend: Backend, root: Path, seed: int) -> str:
    """The caption for an image under its backend's caption_strategy (raises UnusableImage)."""
    if backend.only_instance_prompt or backend.caption_strategy == "instanceprompt":
        return str(backend.instance_prompt).strip()
    if backend.caption_strategy == "textfile":
        caption = _textfile_caption(path, backend, root, seed)
    else:
        caption = filename_caption(path)
        if not caption:
            raise UnusableImage("the file name gives an empty caption (caption_strategy: filename)")
    if backend.prepend_instance_prompt:
        caption = f"{str(backend.instance_prompt).strip()} {caption}"
    return caption


# ---------------------------------------------------------------- discovery


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def _walk(root: Path, backend: Backend, skipped: list[dict]) -> list[Path]:
    """Image candidates under root, sorted; everything else is reported as skipped."""

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": str(path), "backend": backend.id, "reason": reason})

    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            sub = here / name
            if name.startswith("."):
                if not (name == ".cache" and (sub / "huggingface").is_dir()):  # a Hub download's own bookkeeping
                    skip(sub, "hidden folder, not searched")
                dirnames.remove(name)
            elif sub.is_symlink():
                skip(sub, "symlinked folder, not followed (copy or mount the files into the dataset folder)")
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            suffix = path.suffix.lower()
            if name.startswith("."):
                skip(path, "hidden file")
            elif suffix in CAPTION_EXTENSIONS:
                continue  # read together with its image
            elif suffix not in IMAGE_EXTENSIONS:
                skip(path, f"not an image file (extension {suffix or 'none'})")
            elif path.is_symlink() and not path.exists():
                skip(path, "broken symlink")
            elif path.is_symlink() and not _inside(path, root):
                skip(path, f"symlink pointing outside the dataset folder ({os.path.realpath(path)})")
            else:
                candidates.append(path)
    return candidates


def _too_small_or_odd(w: int, h: int, backend: Backend) -> str | None:
    measure = size_measure(w, h, backend.resolution_type)
    if backend.minimum_image_size and measure < backend.minimum_image_size:
        unit = {"pixel": "px short side", "area": "megapixels", "pixel_area": "px (side of equal-area square)"}
        return (
            f"too small: {w}x{h} is {measure:.4g} {unit[backend.resolution_type]}, under "
            f"minimum_image_size {backend.minimum_image_size:g}"
        )
    aspect = w / h
    if backend.minimum_aspect_ratio and aspect < backend.minimum_aspect_ratio:
        return f"aspect ratio {aspect:.3f} under minimum_aspect_ratio {backend.minimum_aspect_ratio:g}"
    if backend.maximum_aspect_ratio and aspect > backend.maximum_aspect_ratio:
        return f"aspect ratio {aspect:.3f} over maximum_aspect_ratio {backend.maximum_aspect_ratio:g}"
    return None


def discover_backend(
    backend: Backend, *, size_multiple: int, seed: int, max_workers: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[Sample], list[dict], dict]:
    """Samples, skipped files and summary stats of one dataset folder."""
    root = backend.instance_data_dir
    if not root.is_dir():
        raise DataError(
            f"dataset `{backend.id}` ({backend.source}): instance_data_dir {root} "
            f"{'is not a folder' if root.exists() else 'does not exist'}; put the images there, "
            "fix the path (relative paths start at the workspace), or set \"disabled\": true"
        )
    skipped: list[dict] = []
    candidates = _walk(root, backend, skipped)
    captioned: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            captioned.append((path, caption_for(path, backend, root, seed)))
        except UnusableImage as exc:
            skipped.append({"path": str(path), "backend": backend.id, "reason": exc.reason})

    def probe(item: tuple[Path, str]) -> Any:
        try:
            return probe_image(item[0], max_pixels=max_pixels)
        except UnusableImage as exc:
            return exc

    workers = max_workers or min(8, os.cpu_count() or 1)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        # probe_image enforces its own pixel limit; PIL's duplicate warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        infos = list(pool.map(probe, captioned))
    samples: list[Sample] = []
    for (path, caption), info in zip(captioned, infos, strict=True):
        reason = info.reason if isinstance(info, UnusableImage) else _too_small_or_odd(info.width, info.height, backend)
        if reason:
            skipped.append({"path": str(path), "backend": backend.id, "reason": reason})
            continue
        size, transform = plan_transform(info, backend, size_multiple=size_multiple, seed=seed)
        samples.append(Sample(backend.id, path, caption, size, transform, info.content_sha256))
    not_selected = 0
    if backend.max_num_samples is not None and len(samples) > backend.max_num_samples:
        keep = set(random.Random(backend.id).sample(range(len(samples)), backend.max_num_samples))
        not_selected = len(samples) - len(keep)
        samples = [s for i, s in enumerate(samples) if i in keep]
    skipped.sort(key=lambda row: row["path"])
    reasons = Counter(_reason_kind(row["reason"]) for row in skipped)
    stats = {
        "instance_data_dir": str(root),
        "usable": len(samples),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "not_selected_by_max_num_samples": not_selected,
        "repeats": backend.repeats,
        "samples_per_epoch": len(samples) * (backend.repeats + 1),
        "probability": backend.probability,
        "buckets": dict(sorted(Counter(f"{s.size[0]}x{s.size[1]}" for s in samples).items())),
    }
    return samples, skipped, stats


def _reason_kind(reason: str) -> str:
    """A short category for the one-line summary ("corrupt", "too small", ...)."""
    for prefix, kind in (
        ("corrupt", "corrupt"), ("empty file", "empty"), ("not an image", "not an image"),
        ("too small", "too small"), ("decompression", "too many pixels"), ("caption", "caption"),
        ("symlink", "symlink"), ("broken symlink", "symlink"), ("hidden", "hidden"), ("aspect", "aspect ratio"),
    ):
        if reason.startswith(prefix):
            return kind
    return "other"


def _fetch_backends(backends: list[Backend], hub: Any, credentials: Any) -> dict[str, str]:
    """Bring every fetched backend type's files into its folder (BACKEND_TYPES); returns {id: commit sha}."""
    commits: dict[str, str] = {}
    for backend in backends:
        fetch = BACKEND_TYPES[backend.type].fetch
        if fetch is not None:
            commit = fetch(backend, hub, credentials)
            if commit is not None:
                commits[backend.id] = commit
    return commits


def build_plan(
    spec: str, workspace: Workspace, *, size_multiple: int, seed: int, min_samples: int,
    hub: Any = None, credentials: Any = None,
) -> DataPlan:
    """Parse the dataloader config, scan every dataset and check there is enough data.

    ``min_samples`` is the fewest samples one epoch must hold (after repeats),
    e.g. train_batch_size x gradient_accumulation_steps x number of processes.
    Raises DataError (exit 4) when a dataset has no usable image or the total is short.
    """
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
    backends, text = load_data_config(spec, workspace)
    commits = _fetch_backends(backends, hub, credentials)
    samples: list[Sample] = []
    skipped: list[dict] = []
    stats: dict[str, dict] = {}
    for backend in backends:
        b_samples, b_skipped, b_stats = discover_backend(backend, size_multiple=size_multiple, seed=seed)
        samples += b_samples
        skipped += b_skipped
        if backend.id in commits:
            b_stats["hub_dataset"] = {"repo_id": backend.hf_dataset_name, "commit": commits[backend.id]}
        stats[backend.id] = b_stats
        kinds = ", ".join(f"{n} {k}" for k, n in b_stats["skipped_by_reason"].items()) or "none"
        log.info(
            "dataset %s: %d usable images, %d skipped (%s); repeats %d -> %d samples per epoch in %d bucket(s)",
            backend.id, b_stats["usable"], b_stats["skipped"], kinds, backend.repeats,
            b_stats["samples_per_epoch"], len(b_stats["buckets"]),
        )
    plan = DataPlan(backends, text, samples, skipped, stats)
    _check_enough(plan, min_samples)
    return plan


def _check_enough(plan: DataPlan, min_samples: int) -> None:
    empty = [b for b in plan.backends if plan.stats[b.id]["usable"] == 0]
    if empty:
        lines = [
            f"dataset `{b.id}` has no usable image in {b.instance_data_dir} "
            f"({plan.stats[b.id]['skipped']} file(s) skipped; see data_report.json)"
            for b in empty
        ]
        raise DataError(
            "; ".join(lines) + ". Add images, fix the path, or set \"disabled\": true on that dataset to train without it"
        )
    total = sum(st["samples_per_epoch"] for st in plan.stats.values())
    if total >= min_samples:
        return
    usable = sum(st["usable"] for st in plan.stats.values())
    needed = max(0, math.ceil(min_samples / max(usable, 1)) - 1)
    parts = ", ".join(
        f"`{b.id}`: {plan.stats[b.id]['usable']} image(s) x (repeats {b.repeats} + 1)" for b in plan.backends
    )
    raise DataError(
        f"not enough training data: one epoch holds {total} samples ({parts}) but at least {min_samples} are "
        f"needed (train_batch_size x gradient_accumulation_steps x processes). Add images, or raise `repeats` "
        f"in the dataloader config: a dataset's images are used repeats + 1 times per epoch, so \"repeats\": "
        f"{needed} on every dataset is enough"
    )


def demo_eval_samples(workspace: Workspace, *, size_multiple: int, seed: int = 0) -> list[Sample]:
    """The held-out (image, caption) pairs as Samples of the `demo-shapes` backend.

    Uses the same discovery code as training, so the bucket and transform follow
    the same rules; ``size_multiple`` must be the one used for the training plan.
    """
    demo.ensure_demo_dataset(workspace)
    backends, _ = parse_data_config(demo.demo_config_entries(workspace), "builtin:demo-shapes", workspace)
    eval_backend = replace(backends[0], instance_data_dir=demo.demo_root(workspace) / "eval")
    samples, skipped, _ = discover_backend(eval_backend, size_multiple=size_multiple, seed=seed)
    assert not skipped, skipped  # generated files: anything skipped is a bug here
    return samples
