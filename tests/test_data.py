"""Dataloader config, discovery, bad-input handling, image transforms, demo dataset.

Run: OMP_NUM_THREADS=1 pytest tests/test_data.py -q
All images are generated in code in a tmp folder; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_appliance.core.errors import ConfigError, DataError, ExitCode
from sana_appliance.core.workspace import Workspace
from sana_appliance.data.backends import load_data_config
from sana_appliance.data.demo import demo_config_entries, ensure_demo_dataset
from sana_appliance.data.images import area_bucket, load_pixels, probe_image
from sana_appliance.data.plan import build_plan, demo_eval_samples

# The seed guide's multidatabackend.json (sana-quickstart), verbatim. Its paths are
# relative, and relative paths resolve against the workspace root, so no path needs
# changing: the test workspace holds datasets/ and cache/ like a real one.
SEED_GUIDE_CONFIG = """
[
  {
    "id": "pseudo-camera-10k-sana",
    "type": "local",
    "crop": true,
    "crop_aspect": "square",
    "crop_style": "center",
    "resolution": 512,
    "minimum_image_size": 512,
    "maximum_image_size": 512,
    "target_downsample_size": 512,
    "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/sana/pseudo-camera-10k",
    "instance_data_dir": "datasets/pseudo-camera-10k",
    "disabled": false,
    "skip_file_discovery": "",
    "caption_strategy": "filename",
    "metadata_backend": "discovery",
    "repeats": 0,
    "is_regularisation_data": true
  },
  {
    "id": "dreambooth-subject",
    "type": "local",
    "crop": false,
    "resolution": 1024,
    "minimum_image_size": 1024,
    "maximum_image_size": 1024,
    "target_downsample_size": 1024,
    "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/sana/dreambooth-subject",
    "instance_data_dir": "datasets/dreambooth-subject",
    "caption_strategy": "instanceprompt",
    "instance_prompt": "the name of your subject goes here",
    "metadata_backend": "discovery",
    "repeats": 1000
  },
  {
    "id": "dreambooth-subject-512",
    "type": "local",
    "crop": false,
    "resolution": 512,
    "minimum_image_size": 512,
    "maximum_image_size": 512,
    "target_downsample_size": 512,
    "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/sana/dreambooth-subject-512",
    "instance_data_dir": "datasets/dreambooth-subject",
    "caption_strategy": "instanceprompt",
    "instance_prompt": "the name of your subject goes here",
    "metadata_backend": "discovery",
    "repeats": 1000
  },
  {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": true,
    "cache_dir": "cache/text/sana",
    "disabled": false,
    "write_batch_size": 128
  }
]
"""


def ws(tmp_path: Path) -> Workspace:
    return Workspace(root=tmp_path / "workspace", hf_home=tmp_path / "hf")


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A non-flat image (flat ones compress to nothing and hide resize bugs)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(rgb, "RGB")


def write_config(path: Path, entries: list | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries), encoding="utf-8")
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG a few hundred bytes long whose header claims width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# ---------------------------------------------------------------- config


def test_seed_guide_config_loads_and_builds(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(w.config_dir / "multidatabackend.json", SEED_GUIDE_CONFIG)
    cam = w.datasets_dir / "pseudo-camera-10k"
    subject = w.datasets_dir / "dreambooth-subject"
    cam.mkdir(parents=True)
    subject.mkdir(parents=True)
    gradient(768, 576).save(cam / "a_photo_of_a_street.jpg", quality=90)
    gradient(600, 600).save(cam / "a_red_car (2).png")
    gradient(400, 300).save(cam / "too_small.jpg")  # under minimum_image_size 512 (area)
    gradient(1024, 1024).save(subject / "subject_01.png")
    gradient(1280, 1024).save(subject / "subject_02.jpg")

    backends, text = load_data_config(str(cfg), w)
    assert [b.id for b in backends] == ["pseudo-camera-10k-sana", "dreambooth-subject", "dreambooth-subject-512"]
    cam_b, sub_b, sub512 = backends
    assert cam_b.crop and cam_b.crop_aspect == "square" and cam_b.crop_style == "center"
    assert cam_b.is_regularisation_data and cam_b.repeats == 0 and cam_b.resolution_type == "pixel_area"
    assert cam_b.cache_dir_vae == w.root / "cache/vae/sana/pseudo-camera-10k"
    assert cam_b.instance_data_dir == cam
    assert sub_b.repeats == 1000 and sub_b.caption_strategy == "instanceprompt" and not sub_b.crop
    assert text.id == "text-embeds" and text.cache_dir == w.root / "cache/text/sana" and text.write_batch_size == 128

    plan = build_plan(str(cfg), w, size_multiple=32, seed=0, min_samples=8)
    by_backend = {}
    for s in plan.samples:
        by_backend.setdefault(s.backend_id, []).append(s)
    assert {s.caption for s in by_backend["pseudo-camera-10k-sana"]} == {"a photo of a street", "a red car"}
    assert all(s.size == (512, 512) for s in by_backend["pseudo-camera-10k-sana"])  # square crops
    assert {s.caption for s in by_backend["dreambooth-subject"]} == {"the name of your subject goes here"}
    sizes = sorted(s.size for s in by_backend["dreambooth-subject"])
    assert sizes[0] == (1024, 1024)
    (bw, bh) = sizes[1]  # 1280x1024 (aspect 1.25) -> a 1024^2-area bucket of nearly that aspect
    assert bw % 32 == 0 and bh % 32 == 0 and abs(bw * bh / 1024**2 - 1) < 0.1 and abs(bw / bh / 1.25 - 1) < 0.02
    assert all(abs(s.size[0] * s.size[1] / 512**2 - 1) < 0.12 for s in by_backend["dreambooth-subject-512"])
    [small] = plan.skipped
    assert small["path"].endswith("too_small.jpg") and "too small" in small["reason"]
    for s in plan.samples:
        t = load_pixels(s)
        assert t.shape == (3, s.size[1], s.size[0]) and t.dtype.is_floating_point


def test_unknown_field_named_with_suggestion_and_file(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(
        tmp_path / "mdb.json",
        [{"id": "photos", "type": "local", "instance_data_dir": "x", "resolutin": 512},
         {"id": "te", "dataset_type": "text_embeds", "cache_dir": "c", "write_batchsize": 8}],
    )
    with pytest.raises(ConfigError) as info:
        load_data_config(str(cfg), w)
    text = str(info.value)
    assert "`resolutin`" in text and "`resolution`" in text and "`photos`" in text and str(cfg) in text
    assert "`write_batchsize`" in text and "`write_batch_size`" in text  # both problems reported at once
    assert info.value.exit_code == ExitCode.CONFIG


def test_string_booleans_disabled_and_relative_paths(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(
        tmp_path / "mdb.json",
        [
            {"id": "a", "instance_data_dir": "datasets/a", "crop": "true", "crop_aspect": "preserve",
             "is_regularisation_data": "false", "repeats": "2", "skip_file_discovery": ""},
            {"id": "off", "instance_data_dir": "nowhere", "disabled": "true", "not_a_field": 1},
            {"id": "te", "dataset_type": "text_embeds", "default": "true", "cache_dir": "cache/te"},
        ],
    )
    [a], text = load_data_config(str(cfg), w)
    assert a.crop is True and a.is_regularisation_data is False and a.repeats == 2
    assert a.instance_data_dir == w.root / "datasets/a" and a.cache_dir_vae == w.cache_dir / "vae" / "a"
    assert text.cache_dir == w.root / "cache/te"


def test_boolean_words_are_the_main_configs(tmp_path):
    """multidatabackend.json reads yes/no, on/off, 1/0 like config.json and SANA_<KEY> do (core.parsing)."""
    from sana_appliance.config.resolve import convert

    w = ws(tmp_path)
    for word, value in (("on", True), ("yes", True), ("1", True), ("y", True), ("off", False), ("no", False),
                        ("0", False), ("n", False)):
        cfg = write_config(tmp_path / "mdb.json", [
            {"id": "a", "instance_data_dir": "datasets/a", "crop": word},
            {"id": "te", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/te"},
        ])
        [a], _ = load_data_config(str(cfg), w)
        assert a.crop is value == convert("gradient_checkpointing", word), word


def test_bad_values_are_collected(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(
        tmp_path / "mdb.json",
        [{"id": "a", "instance_data_dir": "d", "crop": "maybe", "resolution_type": "pixels",
          "caption_strategy": "instanceprompt", "probability": 0, "crop_style": "face"}],
    )
    with pytest.raises(ConfigError) as info:
        load_data_config(str(cfg), w)
    problems = "\n".join(info.value.problems)
    for needle in ("crop='maybe'", "resolution_type", "instance_prompt", "probability", "face"):
        assert needle in problems


def test_huggingface_backend_parses_to_download_folder(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(tmp_path / "mdb.json", [{"id": "hub", "type": "huggingface", "dataset_name": "user/pics",
                                                 "caption_strategy": "textfile", "metadata_backend": "huggingface"}])
    [b], _ = load_data_config(str(cfg), w)
    assert b.type == "huggingface" and b.hf_dataset_name == "user/pics" and b.hf_revision == "main"
    assert b.instance_data_dir == w.datasets_dir / "user--pics"


def test_simpletuner_cache_path_placeholders_are_filled_or_refused(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(tmp_path / "mdb.json", [
        {"id": "subject", "instance_data_dir": "datasets/s", "cache_dir_vae": "cache/vae/{model_family}/{id}"},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text/{model_family}"},
    ])
    [b], text = load_data_config(str(cfg), w)
    assert b.cache_dir_vae == w.root / "cache/vae/sana/subject" and text.cache_dir == w.root / "cache/text/sana"
    write_config(cfg, [{"id": "s", "instance_data_dir": "d", "cache_dir_vae": "{output_dir}/vae/{model_family}"},
                       {"id": "t", "dataset_type": "text_embeds", "cache_dir": "c/{modelfamily}"}])
    with pytest.raises(ConfigError) as info:
        load_data_config(str(cfg), w)
    problems = "\n".join(info.value.problems)
    assert "dataset `s`: cache_dir_vae='{output_dir}/vae/{model_family}': unknown placeholder {output_dir}" in problems
    assert "dataset `t`: cache_dir='c/{modelfamily}': unknown placeholder {modelfamily}" in problems
    assert "write the rest of the path out" in problems


def test_filename_captions_keep_trailing_digits():
    """Only a copy counter ` (N)` is dropped; a trailing `-N` is part of the name."""
    from sana_appliance.data.plan import filename_caption

    cases = {"iphone-15.png": "iphone-15", "ak-47.png": "ak-47", "route_66-2.png": "route 66-2",
             "f-16_over_the_sea.jpg": "f-16 over the sea", "a_red_car (2).png": "a red car",
             "a_red_car(12).png": "a red car"}
    assert {name: filename_caption(Path(name)) for name in cases} == cases


# ---------------------------------------------------------------- bad input


def make_salted_folder(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    outside.mkdir(parents=True)

    def caption(name: str, text: str = "a test image") -> None:
        (root / name).with_suffix(".txt").write_text(text, encoding="utf-8")

    gradient(96, 64).save(root / "good.png")
    caption("good.png")
    buf = io.BytesIO()
    gradient(96, 64).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    caption("truncated.png")
    buf = io.BytesIO()
    gradient(96, 64).save(buf, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    caption("truncated.jpg")
    (root / "zero.jpg").write_bytes(b"")
    caption("zero.jpg")
    (root / "notimage.png").write_text("this is a text file, not a PNG", encoding="utf-8")
    caption("notimage.png")
    gradient(96, 64, "CMYK").save(root / "cmyk.jpg", quality=95)
    caption("cmyk.jpg")
    gradient(96, 64).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    caption("palette.png")
    Image.fromarray(np.full((64, 96), 32896, dtype=np.uint16)).save(root / "sixteen.png")  # ~50% grey in 16 bit
    caption("sixteen.png")
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[:, :48] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    caption("rgba.png")
    stored = np.zeros((64, 96, 3), dtype=np.uint8)
    stored[:32] = (255, 0, 0)  # stored top half red, bottom half blue
    stored[32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the red top becomes the right side
    Image.fromarray(stored).save(root / "exif_rotated.jpg", quality=95, exif=exif.tobytes())
    caption("exif_rotated.jpg")
    gradient(8, 8).save(root / "tiny.png")
    caption("tiny.png")
    (root / "bomb.png").write_bytes(bomb_png(30000, 30000))  # PIL itself refuses this one
    caption("bomb.png")
    (root / "bomb_mid.png").write_bytes(bomb_png(12000, 12000))  # only PIL's warning range: our guard
    caption("bomb_mid.png")
    gradient(96, 64).save(root / "nocaption.png")
    gradient(96, 64).save(root / "latin1.png")
    (root / "latin1.txt").write_bytes("un café à Paris".encode("latin-1"))
    gradient(96, 64).save(root / "ünïcødé_名前.png")
    caption("ünïcødé_名前.png", "ein Bild mit Umlauten")
    gradient(96, 64).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    caption("link.png")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")


BAD = {
    "truncated.png": "corrupt or truncated",
    "truncated.jpg": "corrupt or truncated",
    "zero.jpg": "empty file",
    "notimage.png": "not an image",
    "tiny.png": "too small",
    "bomb.png": "decompression-bomb",
    "bomb_mid.png": "decompression-bomb",
    "nocaption.png": "missing",
    "latin1.png": "not valid UTF-8",
    "link.png": "outside the dataset folder",
    "notes.pdf": "not an image file",
}
GOOD = {"good.png", "cmyk.jpg", "palette.png", "sixteen.png", "rgba.png", "exif_rotated.jpg", "ünïcødé_名前.png"}


def salted_plan(tmp_path: Path, min_samples: int = 1, **extra):
    w = ws(tmp_path)
    make_salted_folder(w.datasets_dir / "salted", tmp_path / "outside")
    entry = {"id": "salted", "instance_data_dir": "datasets/salted", "caption_strategy": "textfile",
             "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 32, "crop": False, **extra}
    cfg = write_config(tmp_path / "mdb.json", [entry])
    return w, build_plan(str(cfg), w, size_multiple=16, seed=3, min_samples=min_samples)


@pytest.mark.filterwarnings("error")  # bad files are reported in the plan, not as stray warnings
def test_salted_folder_skips_each_bad_file_with_reason_and_keeps_convertible(tmp_path):
    w, plan = salted_plan(tmp_path)
    skipped = {Path(row["path"]).name: row["reason"] for row in plan.skipped}
    for name, needle in BAD.items():
        assert name in skipped, f"{name} not skipped: {skipped}"
        assert needle in skipped[name], (name, skipped[name])
    assert set(skipped) == set(BAD)
    by_name = {s.path.name: s for s in plan.samples}
    assert set(by_name) == GOOD
    assert by_name["ünïcødé_名前.png"].caption == "ein Bild mit Umlauten"

    for s in plan.samples:
        t = load_pixels(s)
        assert t.shape == (3, s.size[1], s.size[0])
        assert -1.0 <= float(t.min()) and float(t.max()) <= 1.0
        assert s.size[0] % 16 == 0 and s.size[1] % 16 == 0

    rot = by_name["exif_rotated.jpg"]
    assert rot.size[1] > rot.size[0], "EXIF orientation 6 must give a portrait bucket"
    t = load_pixels(rot)
    right, left = t[:, :, -4:].mean(dim=(1, 2)), t[:, :, :4].mean(dim=(1, 2))
    assert right[0] > 0.5 and right[2] < -0.5, "stored top (red) must end up on the right"
    assert left[2] > 0.5 and left[0] < -0.5

    rgba = load_pixels(by_name["rgba.png"])
    assert float(rgba[:, :, -8:].min()) > 0.95, "transparent pixels composite on white"
    assert rgba[0, :, :8].mean() > 0.9 and rgba[1, :, :8].mean() < -0.9
    grey = load_pixels(by_name["sixteen.png"])
    assert abs(float(grey.mean())) < 0.02, "16-bit mid grey stays mid grey (not clipped to white)"
    cmyk = load_pixels(by_name["cmyk.jpg"])
    good = load_pixels(by_name["good.png"])
    assert cmyk.shape == good.shape and float((cmyk - good).abs().mean()) < 0.15

    report = json.loads(plan.write_report(tmp_path / "out").read_text(encoding="utf-8"))
    assert report["backends"]["salted"]["usable"] == len(GOOD)
    assert {Path(r["path"]).name for r in report["skipped"]} == set(BAD)
    assert all(r["reason"] for r in report["skipped"])


def test_too_few_samples_is_data_error_that_explains_repeats(tmp_path):
    with pytest.raises(DataError) as info:
        salted_plan(tmp_path, min_samples=50)
    assert info.value.exit_code == ExitCode.DATA == 4
    text = str(info.value)
    assert "`salted`" in text and "repeats" in text and '"repeats": 7' in text


def test_repeats_make_a_small_dataset_enough(tmp_path):
    _, plan = salted_plan(tmp_path, min_samples=50, repeats=7)
    assert plan.stats["salted"]["samples_per_epoch"] == 7 * 8


def test_missing_folder_is_data_error(tmp_path):
    w = ws(tmp_path)
    cfg = write_config(tmp_path / "mdb.json", [{"id": "gone", "instance_data_dir": "datasets/gone"}])
    with pytest.raises(DataError, match="does not exist"):
        build_plan(str(cfg), w, size_multiple=32, seed=0, min_samples=1)


# ---------------------------------------------------------------- buckets and transforms


@pytest.mark.parametrize("multiple,side", [(32, 1024), (32, 512), (8, 64)])
def test_area_buckets_are_multiples_near_target_area_and_aspect(multiple, side):
    area = side * side
    for aspect in np.exp(np.linspace(math.log(1 / 4), math.log(4), 41)):
        w, h = area_bucket(float(aspect), area, multiple)
        assert w % multiple == 0 and h % multiple == 0
        assert abs(w * h / area - 1) <= 0.1, (aspect, w, h)
        assert abs(math.log((w / h) / aspect)) < (0.03 if side >= 512 else 0.2), (aspect, w, h)
    assert area_bucket(1.0, area, multiple) == (side, side)


def test_plan_buckets_random_crop_stable_and_content_keyed(tmp_path):
    w = ws(tmp_path)
    folder = w.datasets_dir / "mixed"
    folder.mkdir(parents=True)
    for i, (width, height) in enumerate([(300, 200), (200, 300), (400, 100), (256, 256), (333, 222)]):
        gradient(width, height).save(folder / f"img_{i}.png")
    entries = [{"id": "mixed", "instance_data_dir": "datasets/mixed", "resolution": 128,
                "resolution_type": "pixel_area", "crop": True, "crop_aspect": "preserve", "crop_style": "random"}]
    cfg = write_config(tmp_path / "mdb.json", entries)
    plan = build_plan(str(cfg), w, size_multiple=16, seed=5, min_samples=1)
    for s in plan.samples:
        assert s.size[0] % 16 == 0 and s.size[1] % 16 == 0
        assert abs(s.size[0] * s.size[1] / 128**2 - 1) < 0.2
        assert load_pixels(s).shape == (3, s.size[1], s.size[0])
    again = build_plan(str(cfg), w, size_multiple=16, seed=5, min_samples=1)
    assert again.fingerprint() == plan.fingerprint()
    assert [s.transform for s in again.samples] == [s.transform for s in plan.samples]
    other_seed = build_plan(str(cfg), w, size_multiple=16, seed=6, min_samples=1)
    assert [s.transform["crop_box"] for s in other_seed.samples] != [s.transform["crop_box"] for s in plan.samples]
    # Same pixels twice; a file edited after the scan is refused, never silently mis-keyed.
    s = plan.samples[0]
    assert bool((load_pixels(s) == load_pixels(s)).all())
    gradient(300, 200).rotate(90).save(s.path)
    with pytest.raises(DataError, match="changed after"):
        load_pixels(s)


def test_crop_true_downsamples_big_images_before_cropping(tmp_path):
    w = ws(tmp_path)
    folder = w.datasets_dir / "big"
    folder.mkdir(parents=True)
    gradient(2048, 1536).save(folder / "big.png")
    entries = [{"id": "big", "instance_data_dir": "datasets/big", "resolution": 512, "resolution_type": "pixel_area",
                "crop": True, "crop_aspect": "square", "maximum_image_size": 1024, "target_downsample_size": 768}]
    cfg = write_config(tmp_path / "mdb.json", entries)
    [s] = build_plan(str(cfg), w, size_multiple=32, seed=0, min_samples=1).samples
    rw, rh = s.transform["resize"]
    assert s.size == (512, 512) and abs(math.sqrt(rw * rh) - 768) < 2  # area brought to ~768^2, then cropped


def test_probe_does_not_decode_pixels_of_big_png(tmp_path):
    path = tmp_path / "big.png"
    gradient(2000, 1500).save(path)
    info = probe_image(path)
    assert (info.width, info.height, info.orientation) == (2000, 1500, 1)


# ---------------------------------------------------------------- demo dataset


def test_demo_dataset_is_deterministic_with_matching_captions(tmp_path):
    a = ensure_demo_dataset(ws(tmp_path / "a"))
    b = ensure_demo_dataset(ws(tmp_path / "b"))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    pngs = sorted((a / "train").glob("*.png"))
    assert len(pngs) == 64 and len(list((a / "eval").glob("*.png"))) == 8
    for png in pngs:
        _, colour, shape, _, background = png.stem.split("_")
        assert png.with_suffix(".txt").read_text(encoding="utf-8").strip() == (
            f"a {colour} {shape} on a {background} background"
        )
        im = Image.open(png)
        assert im.size == (64, 64)
    assert not list(a.parent.glob(".demo-shapes.*")), "temp folder left behind"


def test_builtin_demo_plan_and_eval_samples(tmp_path):
    w = ws(tmp_path)
    plan = build_plan("builtin:demo-shapes", w, size_multiple=8, seed=0, min_samples=8)
    assert len(plan.samples) == 64 and not plan.skipped
    assert all(s.size == (64, 64) for s in plan.samples)
    assert plan.text_embeds.cache_dir == w.cache_dir / "text" / "demo"
    assert plan.backends[0].cache_dir_vae.is_relative_to(w.cache_dir) and not plan.backends[0].crop
    captions = {s.caption for s in plan.samples}
    assert "a blue circle on a red background" in captions and "a red circle on a blue background" not in captions
    evals = demo_eval_samples(w, size_multiple=8)
    assert len(evals) == 8 and all(s.backend_id == "demo-shapes" and s.size == (64, 64) for s in evals)
    assert not {s.path for s in evals} & {s.path for s in plan.samples}
    assert demo_config_entries(w)[0]["resolution_type"] == "pixel_area"
