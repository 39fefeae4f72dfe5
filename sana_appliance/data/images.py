"""Safe image probing, bucket geometry and the deterministic pixel transform.

Two phases, on purpose:

* :func:`probe_image` runs at discovery time for every file. It hashes the bytes,
  reads the header (size, mode, EXIF orientation) and checks that the file is
  complete, without decoding pixels for the common formats. It raises
  :class:`UnusableImage` with a human reason for anything we must skip.
* :func:`load_pixels` runs once per sample while the VAE cache is built. It
  decodes the image and applies exactly the transform recorded in the sample
  (orientation, colour conversion, resize, crop), so the recorded transform is a
  complete description of the pixels and can be part of the cache key.

No PIL global (``Image.MAX_IMAGE_PIXELS``) is changed: we enforce our own pixel
limit from the header before anything is decoded.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .backends import Backend

# PIL's own default bomb threshold (~89 MP, e.g. 9459x9459): above any photo a user
# fine-tunes on, far below what a crafted header can claim (a 30000x30000 PNG of a
# few hundred bytes would need 2.7 GB decoded). Using the same value means a file
# that passes discovery never triggers PIL's warning in load_pixels.
MAX_IMAGE_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Aspect ratios beyond this are clamped to it when choosing a bucket: the cover
# resize then crops the excess (a 10:1 panorama trains as its central 4:1 part).
MAX_BUCKET_ASPECT = 4.0
TRANSFORM_VERSION = 1  # bump when load_pixels would produce different pixels
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # these swap width and height


@dataclass(frozen=True)
class Sample:
    """One usable training image and everything needed to reproduce its pixels."""

    backend_id: str
    path: Path  # the image file
    caption: str
    size: tuple[int, int]  # final (width, height) fed to the VAE = the bucket
    transform: dict  # JSON-able description of every pixel change; part of the cache key
    content_sha256: str  # sha256 of the image file bytes


def sample_key(sample: Sample) -> str:
    """sha256 naming this sample's pixels: file content + bucket + transform.

    Two samples with the same key decode to the same tensor, so it is a safe
    VAE-cache key; the caption is deliberately not part of it.
    """
    payload = json.dumps(
        {"content_sha256": sample.content_sha256, "size": list(sample.size), "transform": sample.transform},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class UnusableImage(Exception):
    """A file that cannot be trained on; ``reason`` is shown to the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What discovery learns from a file without decoding its pixels."""

    width: int  # after EXIF orientation
    height: int
    orientation: int  # EXIF orientation tag (1 = upright)
    mode: str  # PIL mode of the stored image (RGB, CMYK, P, I;16, ...)
    format: str
    content_sha256: str


# ---------------------------------------------------------------- probing


def probe_image(path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageInfo:
    """Hash, identify and integrity-check one file. Raises UnusableImage."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnusableImage(f"cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    # Our header check is the bomb guard. PIL also warns (DecompressionBombWarning)
    # for huge headers; discover_backend silences that around its thread pool,
    # because warning filters are process-wide and not safe to toggle per thread.
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            mode, fmt = im.mode, (im.format or "unknown")
            if width * height > max_pixels:
                raise UnusableImage(_bomb_reason(width, height, max_pixels))
            orientation = _orientation(im)
        _check_complete(data, fmt)
    except UnusableImage:
        raise
    except Image.DecompressionBombError:
        raise UnusableImage(_bomb_reason(*_header_size(data), max_pixels)) from None
    except UnidentifiedImageError:
        raise UnusableImage("not an image (PIL cannot identify the file format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UnusableImage(f"corrupt or truncated image: {exc}") from None
    if width < 1 or height < 1:
        raise UnusableImage(f"invalid image size {width}x{height}")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height, orientation, mode, fmt, digest)


def _bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"decompression-bomb guard: header claims {width}x{height} = {width * height / 1e6:.0f} MP, "
        f"over the limit of {max_pixels / 1e6:.0f} MP"
    )


def _header_size(data: bytes) -> tuple[int, int]:
    """Size from a header PIL refused to open (only used to word the skip reason)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return 0, 0


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make a good image unusable
        return 1
    return value if 1 <= value <= 8 else 1


def _check_complete(data: bytes, fmt: str) -> None:
    """Catch truncated files up front, decoding pixels only when unavoidable.

    PNG: ``verify`` walks every chunk and checks CRCs (no pixel decode).
    JPEG: ``verify`` checks nothing, so a JPEG must end with the EOI marker; only
    one that does not (rare, some cameras pad) gets a full decode to decide.
    Other formats are decoded once here: they are uncommon in training sets.
    """
    if fmt == "PNG":
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return
    if fmt == "JPEG" and data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return
    with Image.open(io.BytesIO(data)) as im:
        im.load()


# ---------------------------------------------------------------- geometry


def target_area(resolution: float, resolution_type: str) -> float:
    """Pixel area a bucket aims for (``pixel`` uses the short side squared)."""
    if resolution_type == "area":
        return resolution * 1e6
    return float(resolution) ** 2


def size_measure(width: int, height: int, resolution_type: str) -> float:
    """An image's size in the unit of ``minimum_image_size`` for this resolution type."""
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "area":
        return width * height / 1e6
    return math.sqrt(width * height)  # pixel_area: side of the square of equal area


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@functools.lru_cache(maxsize=64)
def _area_grid(area: float, multiple: int, area_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (w, h) on the grid within the area tolerance, sorted by area error; and their log aspects."""
    sizes: list[tuple[float, int, int]] = []
    max_h = int(math.sqrt(area * MAX_BUCKET_ASPECT * 1.25) / multiple + 2) * multiple
    for h in range(multiple, max_h + 1, multiple):
        lo = max(1, math.ceil(area * (1 - area_tolerance) / h / multiple))
        hi = max(lo, math.floor(area * (1 + area_tolerance) / h / multiple))
        for k in range(lo, hi + 1):
            w = k * multiple
            sizes.append((abs(w * h / area - 1), w, h))
    if not sizes:  # a target smaller than one grid cell: the nearest single size
        side = max(multiple, int(round(math.sqrt(area) / multiple)) * multiple)
        sizes.append((0.0, side, side))
    sizes.sort()
    wh = np.asarray([(w, h) for _, w, h in sizes], dtype=np.int64)
    return wh, np.log(wh[:, 0] / wh[:, 1])


def area_bucket(aspect: float, area: float, multiple: int, area_tolerance: float = 0.1) -> tuple[int, int]:
    """The (w, h), both multiples of ``multiple``, nearest ``aspect`` with area within 10% of ``area``.

    Among all grid sizes whose area is within ``area_tolerance`` of the target,
    the closest aspect (in log space) wins, ties broken by the smaller area
    error. Aspects beyond 1:4 / 4:1 are clamped (the cover resize crops the rest).
    """
    aspect = min(max(aspect, 1 / MAX_BUCKET_ASPECT), MAX_BUCKET_ASPECT)
    wh, log_aspects = _area_grid(float(area), int(multiple), float(area_tolerance))
    errors = np.round(np.abs(log_aspects - math.log(aspect)), 9)
    w, h = wh[int(np.argmin(errors))]  # argmin returns the first minimum: the smallest area error
    return int(w), int(h)


def pixel_bucket(aspect: float, short_side: float, multiple: int) -> tuple[int, int]:
    """``resolution_type: pixel``: the short side is fixed, the long side follows the aspect."""
    aspect = min(max(aspect, 1 / MAX_BUCKET_ASPECT), MAX_BUCKET_ASPECT)
    short = _round_to(short_side, multiple)
    if aspect >= 1:
        return _round_to(short * aspect, multiple), short
    return short, _round_to(short / aspect, multiple)


def _bucket(backend: Backend, aspect: float, multiple: int) -> tuple[int, int]:
    if backend.resolution_type == "pixel":
        return pixel_bucket(aspect, backend.resolution, multiple)
    return area_bucket(aspect, target_area(backend.resolution, backend.resolution_type), multiple)


def _rng(seed: int, backend_id: str, content_sha256: str, purpose: str) -> random.Random:
    """Randomness tied to the file's content, so a random crop is the same every run."""
    material = f"{seed}:{backend_id}:{content_sha256}:{purpose}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"))


def plan_transform(
    info: ImageInfo, backend: Backend, *, size_multiple: int, seed: int
) -> tuple[tuple[int, int], dict]:
    """Choose the bucket and the exact resize + crop for one image.

    crop=false: resize to cover the aspect bucket, centre-crop the small remainder.
    crop=true: SimpleTuner semantics: no resize before cropping unless the image
    exceeds ``maximum_image_size`` (then it is first brought to
    ``target_downsample_size``) or is smaller than the crop (then it is upscaled
    just enough to cover it); the crop window is placed by ``crop_style``.
    """
    w, h = info.width, info.height
    aspect = w / h
    if not backend.crop or backend.crop_aspect == "preserve":
        bucket = _bucket(backend, aspect, size_multiple)
    elif backend.crop_aspect == "square":
        bucket = _bucket(backend, 1.0, size_multiple)
    else:  # closest | random, from crop_aspect_buckets
        choices = backend.crop_aspect_buckets
        if backend.crop_aspect == "closest":
            chosen = min(choices, key=lambda a: (abs(math.log(a / aspect)), a))
        else:
            chosen = _rng(seed, backend.id, info.content_sha256, "aspect").choice(sorted(choices))
        bucket = _bucket(backend, chosen, size_multiple)
    bw, bh = bucket
    cover = max(bw / w, bh / h)
    if not backend.crop:
        scale = cover
    else:
        scale = 1.0
        measure = size_measure(w, h, backend.resolution_type)
        if backend.maximum_image_size and measure > backend.maximum_image_size:
            goal = backend.target_downsample_size or backend.maximum_image_size
            if backend.resolution_type == "area":
                scale = math.sqrt(goal / measure)
            else:
                scale = goal / measure
        scale = max(scale, cover)
    rw, rh = max(bw, int(round(w * scale))), max(bh, int(round(h * scale)))
    style = backend.crop_style if backend.crop else "center"
    if style == "random":
        rng = _rng(seed, backend.id, info.content_sha256, "crop")
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    elif style == "corner":
        left, top = 0, 0
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    transform = {
        "version": TRANSFORM_VERSION,
        "exif_orientation": info.orientation,
        "source_mode": info.mode,
        "to_rgb": _rgb_rule(info.mode),
        "oriented_size": [w, h],
        "resize": None if (rw, rh) == (w, h) else [rw, rh],
        "resample": "lanczos",
        "crop_box": [left, top, left + bw, top + bh],
    }
    return bucket, transform


# ---------------------------------------------------------------- pixels


def _rgb_rule(mode: str) -> str:
    """How a PIL mode becomes RGB; recorded so the cache key names it."""
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or mode == "P":
        return "composite-alpha-on-white"  # P may carry transparency; composite is a no-op otherwise
    if mode.startswith("I;16") or mode in ("I", "F"):
        return "scale-16bit-to-8bit"
    if mode == "RGB":
        return "none"
    return "pil-convert"  # CMYK, L, 1, YCbCr, LAB, HSV


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK converted."""
    rule = _rgb_rule(im.mode)
    if rule == "composite-alpha-on-white":
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if rule == "scale-16bit-to-8bit":
        # PIL's convert("L") clips 16-bit values at 255 (a mostly white image).
        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if im.mode == "F" and arr.max(initial=0) <= 1.0 else 65535.0
        arr8 = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if rule == "none":
        return im
    return im.convert("RGB")


def load_pixels(sample: Sample) -> torch.Tensor:
    """Float32 CHW in [-1, 1], exactly ``sample.size``; same bytes -> same tensor.

    Raises DataError if the file changed since discovery: its cache key (the
    content hash) would otherwise describe different pixels.
    """
    import torch

    try:
        data = sample.path.read_bytes()
    except OSError as exc:
        raise DataError(f"{sample.path} (dataset {sample.backend_id}) cannot be read any more: {exc}") from None
    if hashlib.sha256(data).hexdigest() != sample.content_sha256:
        raise DataError(
            f"{sample.path} (dataset {sample.backend_id}) changed after the dataset was scanned; "
            "restart the run so it is scanned again"
        )
    t = sample.transform
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        oriented = _apply_orientation(im, t["exif_orientation"])
        rgb = to_rgb(oriented)
    if list(rgb.size) != t["oriented_size"]:
        raise DataError(f"{sample.path}: decoded size {rgb.size} differs from the scanned size {t['oriented_size']}")
    if t["resize"] is not None:
        rgb = rgb.resize(tuple(t["resize"]), Image.Resampling.LANCZOS)
    rgb = rgb.crop(tuple(t["crop_box"]))
    assert rgb.size == tuple(sample.size), (rgb.size, sample.size)
    arr = np.asarray(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return im
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    return im.transpose(method)


__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageInfo",
    "Sample",
    "UnusableImage",
    "area_bucket",
    "load_pixels",
    "pixel_bucket",
    "plan_transform",
    "probe_image",
    "sample_key",
    "size_measure",
    "target_area",
    "to_rgb",
]
