"""``builtin:demo-shapes``: a generated dataset whose captions match the pictures.

64 training and 8 held-out 64x64 PNG images of one shape (circle, square,
triangle) in one colour on a background of another colour, with positions and
sizes jittered, each with a caption such as "a red circle on a blue background"
in a same-stem .txt file. The generator is seeded by a constant, so every
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
DEMO_VERSION = 1
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


def ensure_demo_dataset(workspace: Workspace) -> Path:
    """Write the demo dataset once (atomically); return its root folder."""
    root = demo_root(workspace)
    if (root / "DONE").is_file():
        return root
    # Another process (rank) may finish first: its folder is as good as ours. An incomplete
    # folder (an older crash) is replaced.
    with atomic_folder(root, existing="keep", is_complete=lambda d: (d / "DONE").is_file()) as tmp:
        rng = random.Random(_GENERATOR_SEED)
        combos = _combos()
        order = combos[:]
        rng.shuffle(order)
        # Every combination appears in training at least once; the rest cycle again.
        train = [order[i % len(order)] for i in range(NUM_TRAIN)]
        evals = [order[(i * 5) % len(order)] for i in range(NUM_EVAL)]
        _write_split(tmp / "train", train, rng)
        _write_split(tmp / "eval", evals, rng)
        meta = {"version": DEMO_VERSION, "train": NUM_TRAIN, "eval": NUM_EVAL, "image_size": IMAGE_SIZE}
        (tmp / "DONE").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return root


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
