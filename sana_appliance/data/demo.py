"""``builtin:demo-shapes``: a generated dataset whose captions match the pictures.

64 training and 8 held-out 64x64 PNG images of one shape (circle, square,
triangle) in one colour on a background of another colour, with positions and
sizes jittered, each with a caption such as "a red circle on a blue background"
in a same-stem .txt file. Six of the 36 (shape, colour, background) combinations
(HELD_OUT) never appear in training: the held-out images show only those, so the
eval loss and the colour score (:func:`colour_score`) measure whether the model
composes what it learned rather than recalls a picture. The generator is seeded by a constant, so every
workspace gets byte-identical files (the demo's losses are reproducible).

Layout under ``workspace.datasets_dir / "demo-shapes"``::

    train/0000_red_circle_on_blue.png + .txt   (64 pairs, the training backend)
    eval/0000_...png + .txt                    (8 pairs, never trained on)
    DONE                                       (written last: the folder is complete)

The folder is written to a temporary sibling and renamed into place, so an
interrupted first run never leaves half a dataset behind.

For an eval loss, :func:`sana_appliance.data.plan.demo_eval_samples` returns the held-out
images as :class:`Sample` objects of the training backend ``demo-shapes`` (same bucket,
transform rules and VAE cache folder as training; cache keys are content-based,
so they never collide with training entries).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..core.fsutil import atomic_folder
from ..core.workspace import Workspace

DEMO_NAME = "demo-shapes"
DEMO_VERSION = 2
IMAGE_SIZE = 64
NUM_TRAIN = 64
NUM_EVAL = 8
_GENERATOR_SEED = 20240611
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
}


# Never trained on; each shape, colour and background still appears in training in other combinations.
HELD_OUT = (
    ("circle", "red", "blue"), ("square", "green", "yellow"), ("triangle", "blue", "red"),
    ("circle", "yellow", "green"), ("square", "blue", "green"), ("triangle", "red", "yellow"),
)


def demo_root(workspace: Workspace) -> Path:
    return workspace.datasets_dir / DEMO_NAME


def _combos() -> list[tuple[str, str, str]]:
    """(shape, colour, background) with colour != background: 3 x 4 x 3 = 36."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def caption_of(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def _draw(shape: str, colour: str, background: str, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[background])
    draw = ImageDraw.Draw(im)
    size = rng.randint(22, 40)
    x0 = rng.randint(2, IMAGE_SIZE - size - 2)
    y0 = rng.randint(2, IMAGE_SIZE - size - 2)
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return im


def _write_split(folder: Path, items: list[tuple[str, str, str]], rng: random.Random) -> None:
    folder.mkdir(parents=True)
    for index, (shape, colour, background) in enumerate(items):
        stem = f"{index:04d}_{colour}_{shape}_on_{background}"
        # optimize=False and no metadata keep the PNG bytes identical across runs.
        _draw(shape, colour, background, rng).save(folder / f"{stem}.png", format="PNG")
        (folder / f"{stem}.txt").write_text(caption_of(shape, colour, background) + "\n", encoding="utf-8")


def _current(root: Path) -> bool:
    """The folder is complete and of this version."""
    try:
        return json.loads((root / "DONE").read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def ensure_demo_dataset(workspace: Workspace) -> Path:
    """Write the demo dataset once (atomically); return its root folder."""
    root = demo_root(workspace)
    if _current(root):
        return root
    # Another process (rank) may finish first: its folder is as good as ours. An incomplete folder (an older
    # crash) or one of an earlier version (other held-out combinations) is replaced: it is generated data.
    with atomic_folder(root, existing="keep", is_complete=_current) as tmp:
        rng = random.Random(_GENERATOR_SEED)
        order = [c for c in _combos() if c not in HELD_OUT]
        rng.shuffle(order)
        # Every trained combination appears at least once; the rest cycle again. The held-out ones only in eval/.
        train = [order[i % len(order)] for i in range(NUM_TRAIN)]
        evals = [HELD_OUT[i % len(HELD_OUT)] for i in range(NUM_EVAL)]
        _write_split(tmp / "train", train, rng)
        _write_split(tmp / "eval", evals, rng)
        meta = {"version": DEMO_VERSION, "train": NUM_TRAIN, "eval": NUM_EVAL, "image_size": IMAGE_SIZE}
        (tmp / "DONE").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return root


def write_shapes(folder: Path, *, count: int, size: int, seed: int = 0) -> Path:
    """`count` pictures of the demo's kind at `size` px with textfile captions, for real-size runs (the GPU
    benchmark): the shapes over a lightly noisy background, so the VAE sees more than flat colour. Atomic."""
    import numpy as np

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    with atomic_folder(folder, existing="keep", is_complete=lambda f: (f / "DONE").is_file()) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            shape, colour, background = rng.choice(_combos())
            small = _draw(shape, colour, background, rng)
            big = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
            big += noise.normal(0.0, 6.0, big.shape)
            stem = f"{index:04d}_{colour}_{shape}_on_{background}"
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(tmp / f"{stem}.png", format="PNG")
            (tmp / f"{stem}.txt").write_text(caption_of(shape, colour, background) + "\n", encoding="utf-8")
        (tmp / "DONE").write_text(json.dumps({"count": count, "size": size, "seed": seed}) + "\n", encoding="utf-8")
    return folder


def demo_config_entries(workspace: Workspace) -> list[dict]:
    """The demo as multidatabackend.json entries (what a user would write for it)."""
    return [
        {
            "id": DEMO_NAME,
            "type": "local",
            "instance_data_dir": str(demo_root(workspace) / "train"),
            "caption_strategy": "textfile",
            "resolution": IMAGE_SIZE,
            "resolution_type": "pixel_area",
            "minimum_image_size": IMAGE_SIZE,
            "crop": False,
            "repeats": 0,
            "cache_dir_vae": str(workspace.cache_dir / "vae" / DEMO_NAME),
            "metadata_backend": "discovery",
        },
        {
            "id": "demo-text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(workspace.cache_dir / "text" / "demo"),
            "write_batch_size": 64,
        },
    ]


def held_out_prompts() -> list[str]:
    return [caption_of(*combo) for combo in HELD_OUT]


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(shape, colour, background) of a demo caption, or None for any other text."""
    words = caption.strip().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        return None
    return shape, colour, background


def _nearest(rgb) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def image_colours(image: Image.Image) -> tuple[str, str | None]:
    """(background colour, shape colour) of a generated picture, each the nearest demo colour: the background
    from the median of the outer ring of pixels, the shape from the median of the pixels far from the
    background (None when fewer than 3% of the pixels are: no shape drawn)."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    ring = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3), pixels[:, :3].reshape(-1, 3),
                           pixels[:, -3:].reshape(-1, 3)])
    background = np.median(ring, axis=0)
    far = np.linalg.norm(pixels - background, axis=-1) > 80.0
    shape = None
    if far.mean() >= 0.03:
        shape = _nearest(np.median(pixels[far], axis=0))
    return _nearest(background), shape


def colour_score(images) -> dict[str, float]:
    """Over {caption: picture} or [(caption, picture)]: the fraction whose background, and whose shape, has the
    prompted colour (chance: 1 in 4)."""
    pairs = list(images.items() if isinstance(images, dict) else images)
    hits_bg = hits_shape = 0
    for caption, image in pairs:
        _, colour, background = parse_caption(caption)
        got_bg, got_shape = image_colours(image)
        hits_bg += got_bg == background
        hits_shape += got_shape == colour
    n = max(1, len(pairs))
    return {"background": hits_bg / n, "shape": hits_shape / n}
