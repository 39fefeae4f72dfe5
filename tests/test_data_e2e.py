"""Data handling end to end: the real CLI trains the tiny built-in Sana on user-style datasets.

Covers the seed guide's multidatabackend.json found in the workspace, a folder salted with bad
files, cache reuse and invalidation across runs, vae_cache_disable and too-little-data errors.

Run: OMP_NUM_THREADS=1 pytest tests/test_data_e2e.py   (~2 minutes on 2 cores)

One workspace serves the whole file (the tiny model is built once, caches are shared); every
CLI run writes its own output folder. Images are generated in code; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, run_cli
from PIL import Image
from safetensors import safe_open

# The short settings for every run here: no PRESET, so schema defaults apply (train_batch_size 1)
# and the workspace's config/multidatabackend.json is found when DATALOADER_CONFIG is unset.
SHORT = {
    "SANA_PRETRAINED_MODEL_NAME_OR_PATH": "builtin:tiny-sana",
    "SANA_MAX_TRAIN_STEPS": "4",
    "SANA_VALIDATION_STEPS": "0",
    "SANA_MIXED_PRECISION": "no",
    "SANA_OPTIMIZER": "adamw",
    "SANA_TOKENIZER_MAX_LENGTH": "48",
    "SANA_VALIDATION_RESOLUTION": "64x64",
}
INSTANCE_PROMPT = "the name of your subject goes here"

# The seed guide's multidatabackend.json (sana-quickstart), same entries, keys and paths.
# Only the sizes differ: resolution / minimum_image_size / maximum_image_size /
# target_downsample_size are 64 instead of 512 and 1024, so the tiny model trains in seconds
# on CPU. Paths stay relative: they resolve against the workspace root.
GUIDE_CONFIG = [
    {
        "id": "pseudo-camera-10k-sana",
        "type": "local",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "resolution": 64,
        "minimum_image_size": 64,
        "maximum_image_size": 64,
        "target_downsample_size": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/sana/pseudo-camera-10k",
        "instance_data_dir": "datasets/pseudo-camera-10k",
        "disabled": False,
        "skip_file_discovery": "",
        "caption_strategy": "filename",
        "metadata_backend": "discovery",
        "repeats": 0,
        "is_regularisation_data": True,
    },
    {
        "id": "dreambooth-subject",
        "type": "local",
        "crop": False,
        "resolution": 64,
        "minimum_image_size": 64,
        "maximum_image_size": 64,
        "target_downsample_size": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/sana/dreambooth-subject",
        "instance_data_dir": "datasets/dreambooth-subject",
        "caption_strategy": "instanceprompt",
        "instance_prompt": INSTANCE_PROMPT,
        "metadata_backend": "discovery",
        "repeats": 1000,
    },
    {
        "id": "dreambooth-subject-512",
        "type": "local",
        "crop": False,
        "resolution": 64,
        "minimum_image_size": 64,
        "maximum_image_size": 64,
        "target_downsample_size": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/sana/dreambooth-subject-512",
        "instance_data_dir": "datasets/dreambooth-subject",
        "caption_strategy": "instanceprompt",
        "instance_prompt": INSTANCE_PROMPT,
        "metadata_backend": "discovery",
        "repeats": 1000,
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/sana",
        "disabled": False,
        "write_batch_size": 128,
    },
]
TEXT_EMBEDS = GUIDE_CONFIG[-1]
CAMERA_NAMES = ["a_city_street_at_night.png", "a_dog_on_the_beach.jpg", "an_old_red_barn.png", "mountains_in_fog.jpg"]
SUBJECT_NAMES = ["IMG_0001.jpg", "IMG_0002.png", "IMG_0003.jpg"]

# The salted folder: which files must be skipped, and a word their reason must contain.
SALTED_SKIPS = {
    "truncated.png": "truncated",
    "zero.jpg": "empty file",
    "notes.png": "not an image",
    "tiny.png": "too small",
    "bomb.png": "decompression-bomb",
    "uncaptioned.png": "missing",
    "latin1.png": "UTF-8",
    "outside_link.png": "symlink pointing outside",
}
UNICODE_NAME = "café_ñandú_日本.png"
SALTED_USABLE = ["plain.png", "plain.jpg", "cmyk.jpg", "palette.png", "sixteen_bit.png", "rgba.png", "rotated.jpg",
                 UNICODE_NAME]


# ---------------------------------------------------------------- building the workspace


def noise(w: int, h: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def rgb(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(noise(w, h, seed))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming width x height, no pixel data: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_json(path: Path, entries: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2))


def backend(id_: str, folder: str, **fields) -> dict:
    """A plain local dataset entry at 64 px (pixel_area), no crop, for the non-guide configs."""
    entry = {"id": id_, "type": "local", "instance_data_dir": folder, "cache_dir_vae": f"cache/vae/{id_}",
             "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 48, "crop": False,
             "caption_strategy": "filename", "repeats": 0}
    entry.update(fields)
    return entry


def make_salted(folder: Path, outside: Path) -> None:
    folder.mkdir(parents=True)

    def caption(name: str, text: str | bytes) -> None:
        target = folder / Path(name).with_suffix(".txt").name
        target.write_bytes(text if isinstance(text, bytes) else text.encode())

    # Usable, in every awkward colour mode and orientation.
    rgb(72, 72, 1).save(folder / "plain.png")
    rgb(80, 64, 2).save(folder / "plain.jpg", quality=90)
    Image.fromarray(noise(72, 72, 3, channels=4), mode="CMYK").save(folder / "cmyk.jpg")
    rgb(72, 72, 4).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(noise(72, 72, 5, channels=1)[..., 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(noise(72, 72, 6, channels=4), mode="RGBA").save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rgb(96, 64, 7).save(folder / "rotated.jpg", exif=exif)
    rgb(72, 72, 8).save(folder / UNICODE_NAME)
    for i, name in enumerate(SALTED_USABLE):
        caption(name, f"usable image number {i} named {Path(name).stem}")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK" and Image.open(folder / "palette.png").mode == "P"
    assert Image.open(folder / "sixteen_bit.png").mode.startswith("I")

    # Unusable, each for its own reason (each has a caption, so the caption is never the reason but for two).
    full = (folder / "plain.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("these are my notes, not an image\n")
    rgb(16, 16, 9).save(folder / "tiny.png")
    (folder / "bomb.png").write_bytes(png_header_only(30000, 30000))
    rgb(72, 72, 10).save(folder / "uncaptioned.png")
    rgb(72, 72, 11).save(folder / "latin1.png")
    outside.parent.mkdir(parents=True, exist_ok=True)
    rgb(72, 72, 12).save(outside)
    (folder / "outside_link.png").symlink_to(outside)
    for name in SALTED_SKIPS:
        if name == "latin1.png":
            caption(name, "café au lait, naïve".encode("latin-1"))
        elif name != "uncaptioned.png":
            caption(name, f"caption for {name}")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data-e2e")
    ds = root / "datasets"
    (ds / "pseudo-camera-10k").mkdir(parents=True)
    for i, name in enumerate(CAMERA_NAMES):  # taller than wide: the square crop has room to move
        rgb(80 + 16 * (i % 2), 112, 100 + i).save(ds / "pseudo-camera-10k" / name)
    (ds / "dreambooth-subject").mkdir()
    for i, name in enumerate(SUBJECT_NAMES):
        rgb(64, 80, 200 + i).save(ds / "dreambooth-subject" / name)
    make_salted(ds / "salted", root / "elsewhere" / "not_in_dataset.png")
    (ds / "pair").mkdir()
    for i in range(2):
        rgb(64, 64, 300 + i).save(ds / "pair" / f"pair_image_{i}.png")

    write_json(root / "config" / "multidatabackend.json", GUIDE_CONFIG)
    corner = [dict(e, crop_style="corner") if e["id"] == "pseudo-camera-10k-sana" else e for e in GUIDE_CONFIG]
    write_json(root / "config" / "guide-corner.json", corner)
    salted = backend("salted", "datasets/salted", caption_strategy="textfile")
    write_json(root / "config" / "salted.json", [salted, TEXT_EMBEDS])
    write_json(root / "config" / "pair.json", [backend("pair", "datasets/pair"), TEXT_EMBEDS])
    write_json(root / "config" / "pair-repeats.json", [backend("pair", "datasets/pair", repeats=1), TEXT_EMBEDS])
    nolatents = backend("nolatents", "datasets/dreambooth-subject", caption_strategy="instanceprompt",
                        instance_prompt=INSTANCE_PROMPT)
    write_json(root / "config" / "nolatents.json", [nolatents, TEXT_EMBEDS])
    return root


def run(ws: Path, out_name: str, config: str | None = None, **extra: str):
    env = cli_env(ws, ws / out_name, **SHORT, **extra)
    env.pop("DATALOADER_CONFIG", None)
    if config:
        env["DATALOADER_CONFIG"] = f"config/{config}"
    result = run_cli(env)
    return ws / out_name, result


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cached_captions(text_cache: Path) -> set[str]:
    captions = set()
    for f in text_cache.rglob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            captions.add(fh.metadata()["caption"])
    return captions


def latent_files(folder: Path) -> set[str]:
    return {f.name for f in folder.rglob("*.safetensors")} if folder.exists() else set()


@pytest.fixture(scope="module")
def guide_run(ws):
    out, result = run(ws, "out-guide")
    ok(result)
    return out, result


@pytest.fixture(scope="module")
def salted_run(ws):
    out, result = run(ws, "out-salted", "salted.json")
    ok(result)
    return out, result


# ---------------------------------------------------------------- the seed guide's config


def test_seed_guide_config_found_in_workspace_trains(guide_run, ws):
    out, result = guide_run
    log = result.stderr
    assert "DEMO RUN" not in log  # the workspace's multidatabackend.json is the user's data, not the demo's
    report = read(out / "data_report.json")
    counts = {bid: (b["usable"], b["skipped"], b["samples_per_epoch"]) for bid, b in report["backends"].items()}
    assert counts == {"pseudo-camera-10k-sana": (4, 0, 4), "dreambooth-subject": (3, 0, 3003),
                      "dreambooth-subject-512": (3, 0, 3003)}
    assert report["backends"]["pseudo-camera-10k-sana"]["buckets"] == {"64x64": 4}  # crop square at 64
    assert report["num_skipped"] == 0 and report["skipped"] == []
    info = read(out / "run.json")
    assert info["config"]["data_backend_config"] == str(ws / "config" / "multidatabackend.json")
    assert info["provenance"]["data_backend_config"].startswith("default")
    assert info["preset"] is None and info["config"]["train_batch_size"] == 1
    assert [(d["id"], d["samples"]) for d in info["datasets"]] == [
        ("pseudo-camera-10k-sana", 4), ("dreambooth-subject", 3), ("dreambooth-subject-512", 3)]
    prints = [d["fingerprint"] for d in info["datasets"]]
    # One fingerprint per dataset, of what it trains: both subject sets hold the same images at the
    # same (reduced) size with the same prompt, so they match; the camera set differs.
    assert prints[1] == prints[2] != prints[0] and all(len(p) == 64 for p in prints)
    assert info["steps"] == 4
    # Captions: file names for the camera set, the one instance prompt for both subject sets
    # (4 + 1 distinct captions, not the subject files' names).
    captions = cached_captions(ws / "cache" / "text" / "sana")
    assert INSTANCE_PROMPT in captions
    assert {"a city street at night", "a dog on the beach", "an old red barn", "mountains in fog"} <= captions
    assert not any("IMG" in c for c in captions)
    assert info["caches"]["text_encoded"] == 5
    # Latents land in the guide's per-dataset cache folders; 4 + 3 + 3 entries.
    vae = ws / "cache" / "vae" / "sana"
    assert [len(latent_files(vae / d)) for d in ("pseudo-camera-10k", "dreambooth-subject", "dreambooth-subject-512")] \
        == [4, 3, 3]
    assert info["caches"]["latent_encoded"] == 10
    assert re.search(r"dataset dreambooth-subject: 3 usable images, 0 skipped .*repeats 1000 -> 3003", log)


def test_caches_hit_on_rerun_and_only_changed_backend_reencodes(guide_run, ws):
    vae = ws / "cache" / "vae" / "sana"
    before = {d: latent_files(vae / d) for d in ("pseudo-camera-10k", "dreambooth-subject", "dreambooth-subject-512")}
    # Same data, same config: everything comes from the caches.
    out, result = run(ws, "out-guide-again")
    ok(result)
    caches = read(out / "run.json")["caches"]
    assert caches["latent_encoded"] == 0 and caches["text_encoded"] == 0, caches
    assert caches["latent_hits"] == 10 and caches["text_hits"] == 5, caches
    assert "hit rate 100%" in result.stderr
    # One dataset's crop changes (center -> corner): only its 4 latents are encoded again.
    out, result = run(ws, "out-guide-corner", "guide-corner.json")
    ok(result)
    caches = read(out / "run.json")["caches"]
    assert caches["latent_encoded"] == 4 and caches["latent_hits"] == 6 and caches["text_encoded"] == 0, caches
    after = {d: latent_files(vae / d) for d in before}
    assert len(after["pseudo-camera-10k"] - before["pseudo-camera-10k"]) == 4
    assert after["dreambooth-subject"] == before["dreambooth-subject"]
    assert after["dreambooth-subject-512"] == before["dreambooth-subject-512"]


# ---------------------------------------------------------------- bad files


def test_salted_folder_trains_and_reports_every_skipped_file(salted_run, ws):
    out, result = salted_run
    report = read(out / "data_report.json")
    reasons = {Path(row["path"]).name: row["reason"] for row in report["skipped"]}
    assert set(reasons) == set(SALTED_SKIPS), reasons
    for name, word in SALTED_SKIPS.items():
        assert word in reasons[name], (name, reasons[name])
    assert all(row["backend"] == "salted" for row in report["skipped"])
    stats = report["backends"]["salted"]
    assert stats["usable"] == len(SALTED_USABLE) and stats["skipped"] == len(SALTED_SKIPS)
    # The one-line summary names the counts and the kinds of problems.
    line = re.search(r"dataset salted: (\d+) usable images, (\d+) skipped \(([^)]*)\)", result.stderr)
    assert line, result.stderr[-3000:]
    assert (int(line[1]), int(line[2])) == (len(SALTED_USABLE), len(SALTED_SKIPS))
    assert all(kind in line[3] for kind in ("corrupt", "empty", "not an image", "too small", "symlink", "caption"))
    # The awkward-but-valid images were trained: their captions (unicode file name included) were encoded.
    captions = cached_captions(ws / "cache" / "text" / "sana")
    assert f"usable image number {SALTED_USABLE.index(UNICODE_NAME)} named café_ñandú_日本" in captions
    datasets = read(out / "run.json")["datasets"]
    assert [(d["id"], d["samples"]) for d in datasets] == [("salted", len(SALTED_USABLE))] and len(datasets[0]["fingerprint"]) == 64
    # The EXIF-rotated 96x64 JPEG trains as the portrait it shows: its bucket is taller than wide.
    buckets = [tuple(map(int, b.split("x"))) for b in stats["buckets"]]
    assert any(h > w for w, h in buckets), stats["buckets"]


def test_too_few_usable_images_exit_4_mentions_repeats(salted_run, ws):
    _, result = run(ws, "out-salted-big-batch", "salted.json", SANA_TRAIN_BATCH_SIZE="16")
    assert result.returncode == 4, result.stderr[-3000:]
    assert "repeats" in result.stderr and "not enough training data" in result.stderr
    assert f"`salted`: {len(SALTED_USABLE)} image(s)" in result.stderr


def test_changing_one_caption_reencodes_one_text_embedding(salted_run, ws):
    caption = ws / "datasets" / "salted" / "plain.txt"
    caption.write_text("a brand new caption for the plain png")
    out, result = run(ws, "out-salted-caption", "salted.json")
    ok(result)
    caches = read(out / "run.json")["caches"]
    assert caches["text_encoded"] == 1 and caches["latent_encoded"] == 0, caches
    assert caches["latent_hits"] == len(SALTED_USABLE)
    assert "a brand new caption for the plain png" in cached_captions(ws / "cache" / "text" / "sana")


# ---------------------------------------------------------------- vae_cache_disable, little data


def test_vae_cache_disable_trains_without_latent_files(ws):
    out, result = run(ws, "out-nolatents", "nolatents.json", SANA_VAE_CACHE_DISABLE="true")
    ok(result)
    assert latent_files(ws / "cache" / "vae" / "nolatents") == set()
    info = read(out / "run.json")
    assert info["caches"]["latent_encoded"] == 0 and info["caches"]["latent_hits"] == 0
    assert info["steps"] == 4 and (out / "transformer.safetensors").is_file()
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_two_images_batch_4_needs_repeats(ws):
    _, result = run(ws, "out-pair", "pair.json", SANA_TRAIN_BATCH_SIZE="4")
    assert result.returncode == 4, result.stderr[-3000:]
    assert "one epoch holds 2 samples" in result.stderr and "at least 4" in result.stderr
    assert '"repeats": 1' in result.stderr  # the suggested value, which the next run uses
    out, result = run(ws, "out-pair-repeats", "pair-repeats.json", SANA_TRAIN_BATCH_SIZE="4")
    ok(result)
    report = read(out / "data_report.json")
    assert report["backends"]["pair"]["usable"] == 2 and report["backends"]["pair"]["samples_per_epoch"] == 4
    assert read(out / "run.json")["steps"] == 4



def test_missing_or_broken_dataloader_config_fails_before_any_download(tmp_path):
    """A real preset with no data must not download 10 GB of weights before saying so."""
    from hubserver import FakeHub

    ws = tmp_path / "ws"
    with FakeHub() as hub:
        env = cli_env(ws, ws / "output", PRESET="24g", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        for key in ("SANA_MAX_TRAIN_STEPS", "SANA_CHECKPOINTING_STEPS", "SANA_VALIDATION_STEPS"):
            env.pop(key)
        none = run_cli(env)
        assert none.returncode == 2 and "multidatabackend.json" in none.stderr and "DATALOADER_CONFIG" in none.stderr
        (ws / "config").mkdir(parents=True)
        (ws / "config" / "multidatabackend.json").write_text(json.dumps(
            [{"id": "mine", "type": "local", "instance_data_dir": "datasets/mine"}]))
        absent = run_cli(env)
        assert absent.returncode == 4 and "datasets/mine" in absent.stderr
        assert hub.hits() == 0


def test_huggingface_dataset_backend_downloads_through_assets(tmp_path):
    """`type: huggingface`: the dataset repo is fetched (sha-pinned) into the workspace and trained on."""
    import io

    from hubserver import FakeHub

    files = {}
    for i, (colour, name) in enumerate([((200, 30, 30), "red"), ((30, 200, 30), "green"), ((30, 30, 200), "blue"),
                                        ((200, 200, 30), "yellow")]):
        buf = io.BytesIO()
        Image.new("RGB", (72, 64), colour).save(buf, format="PNG")
        files[f"img{i}.png"] = buf.getvalue()
        files[f"img{i}.txt"] = f"a flat {name} image".encode()
    ws = tmp_path / "ws"
    (ws / "config").mkdir(parents=True)
    (ws / "config" / "multidatabackend.json").write_text(json.dumps([
        {"id": "hub-shapes", "type": "huggingface", "dataset_name": "acme/flat-colours", "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 32, "cache_dir_vae": "cache/vae/hub"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text/hub"},
    ]))
    with FakeHub() as hub:
        repo = hub.add_repo("acme/flat-colours", files, repo_type="dataset")
        result = run_cli(cli_env(ws, ws / "output", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url,
                                 SANA_PRETRAINED_MODEL_NAME_OR_PATH="builtin:tiny-sana", SANA_MAX_TRAIN_STEPS="2",
                                 SANA_VALIDATION_STEPS="0", SANA_TRAIN_BATCH_SIZE="2", SANA_MIXED_PRECISION="no",
                                 SANA_OPTIMIZER="adamw", SANA_TOKENIZER_MAX_LENGTH="48"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((ws / "output" / "data_report.json").read_text())
    stats = report["backends"]["hub-shapes"]
    assert stats["hub_dataset"] == {"repo_id": "acme/flat-colours", "commit": repo.sha}
    assert report["num_samples"] == 4 and report["num_skipped"] == 0
