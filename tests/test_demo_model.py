"""The demo's built-in parts that make its pictures real: the trained tiny DC-AE shipped in the package (and the
script that trains it), the tokenizer that keeps the captions' words whole, the held-out combinations, and the
colour score that reads a generated picture.

Run: pytest tests/test_demo_model.py   (~30 s on 2 cores)
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_appliance.core.workspace import Workspace
from sana_appliance.data import demo
from sana_appliance.model import parts

ROOT = Path(__file__).resolve().parent.parent


def _pictures(folder: Path) -> dict[str, Image.Image]:
    return {p.with_suffix(".txt").read_text().strip(): Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))}


def test_the_shipped_dcae_is_the_recorded_one_and_small():
    record = json.loads(parts.TINY_VAE_WEIGHTS.with_suffix(".json").read_text())
    data = parts.TINY_VAE_WEIGHTS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"] < 2 * 2**20
    assert "scripts/train_tiny_dcae.py" in record["command"] and (ROOT / "scripts" / "train_tiny_dcae.py").is_file()


def test_the_tiny_dcae_reconstructs_the_demo_pictures(tmp_path):
    """Held-out demo images through encode/decode keep their pixels (mean error under 3 of 255) and so their
    colours: what the transformer learns decodes to a picture, not speckle. The latents are near unit scale."""
    root = demo.ensure_demo_dataset(Workspace(root=tmp_path, hf_home=tmp_path / "hf"))
    pictures = _pictures(root / "eval")
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in pictures.values()])
    x = x / 127.5 - 1.0
    vae = parts.tiny_vae().eval()
    with torch.no_grad():
        latent = vae.encode(x).latent
        recon = vae.decode(latent).sample.clamp(-1, 1)
    assert ((recon - x).abs().mean() * 127.5).item() < 3.0
    assert 0.7 < (latent * vae.config.scaling_factor).std().item() < 1.4
    for original, back in zip(pictures.values(), recon):
        image = Image.fromarray(((back.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        assert demo.image_colours(image) == demo.image_colours(original)


def test_the_training_script_runs_and_records_what_it_wrote(tmp_path):
    out = tmp_path / "dcae.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_dcae.py"), "--steps", "2", "--batch", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and "--steps 2" in record["command"]


def test_held_out_combinations_are_never_trained_on(tmp_path):
    root = demo.ensure_demo_dataset(Workspace(root=tmp_path, hf_home=tmp_path / "hf"))
    train = {demo.parse_caption(c) for c in _pictures(root / "train")}
    held = {demo.parse_caption(c) for c in _pictures(root / "eval")}
    assert held == set(demo.HELD_OUT) and not train & held and None not in train | held
    # Everything a held-out prompt names is taught by other combinations.
    assert {s for s, _, _ in train} == set(demo.SHAPES)
    assert {c for _, c, _ in train} == {b for _, _, b in train} == set(demo.COLOURS)


def test_the_colour_score_reads_true_pictures_and_not_noise():
    rng = random.Random(0)
    drawn = {demo.caption_of(*combo): demo._draw(*combo, rng) for combo in demo.HELD_OUT}
    assert demo.colour_score(drawn) == {"background": 1.0, "shape": 1.0}
    noise = np.random.default_rng(0)
    speckle = {c: Image.fromarray(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for c in drawn}
    assert demo.colour_score(speckle)["shape"] <= 0.5
    swapped = {demo.caption_of(s, b, c): demo._draw(s, c, b, rng) for s, c, b in demo.HELD_OUT}  # colours swapped
    assert demo.colour_score(swapped) == {"background": 0.0, "shape": 0.0}


def test_the_tiny_tokenizer_keeps_every_caption_word_whole():
    assert set(parts.TINY_WORDS) == {w for c in (demo.caption_of(*k) for k in demo._combos()) for w in c.split()}
    tokenizer = parts._tiny_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(demo.caption_of("triangle", "yellow", "green")).input_ids)
    assert tokens == ["<bos>", "a", "▁yellow", "▁triangle", "▁on", "▁a", "▁green", "▁background"]


def test_a_demo_dataset_of_an_earlier_version_is_replaced(tmp_path):
    """A workspace from before the held-out split holds every combination in train/: it is regenerated, not
    trained on (it is the appliance's generated data, nobody's files)."""
    workspace = Workspace(root=tmp_path, hf_home=tmp_path / "hf")
    root = demo.demo_root(workspace)
    (root / "train").mkdir(parents=True)
    (root / "train" / "0000_red_circle_on_blue.txt").write_text("a red circle on a blue background\n")
    (root / "DONE").write_text(json.dumps({"version": 1}))
    demo.ensure_demo_dataset(workspace)
    assert json.loads((root / "DONE").read_text())["version"] == demo.DEMO_VERSION
    assert not (root / "train" / "0000_red_circle_on_blue.txt").exists()


def test_the_shipped_text_encoder_is_the_recorded_one_and_tells_the_colours_roles_apart():
    """Trained by scripts/train_tiny_text_encoder.py: through the real encode_prompt path (with the complex human
    instruction, at the demo's tokenizer_max_length), a linear read-out of the background colour and of the shape
    colour fitted on the training captions' embeddings is right for every held-out caption. (The untrained encoder
    passes this too; what the training changes, the demo's held-out score shows: README, The demo.)"""
    from diffusers import SanaPipeline

    record = json.loads(parts.TINY_TEXT_WEIGHTS.with_suffix(".json").read_text())
    data = parts.TINY_TEXT_WEIGHTS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"] < 2 * 2**20
    assert "scripts/train_tiny_text_encoder.py" in record["command"]
    train = [c for c in demo._combos() if c not in demo.HELD_OUT]
    colours = list(demo.COLOURS)

    def held_out_accuracy(pretrained: bool) -> tuple[float, ...]:
        tokenizer, encoder = parts.tiny_text_encoder(pretrained=pretrained)
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt([demo.caption_of(*c) for c in train + list(demo.HELD_OUT)],
                                                    do_classifier_free_guidance=False, device=torch.device("cpu"),
                                                    max_sequence_length=48)
        pooled = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        x = torch.cat([pooled, torch.ones(len(pooled), 1)], dim=1).double()
        found = []
        for role in (1, 2):  # shape colour, background colour
            y = torch.nn.functional.one_hot(torch.tensor([colours.index(c[role]) for c in train + list(demo.HELD_OUT)]))
            fit = torch.linalg.lstsq(x[:len(train)], y[:len(train)].double(), driver="gelsd").solution
            guess = (x[len(train):] @ fit).argmax(-1)
            found.append((guess == y[len(train):].argmax(-1)).double().mean().item())
        return tuple(found)

    assert held_out_accuracy(True) == (1.0, 1.0)


def test_the_text_encoder_script_runs_and_records_what_it_wrote(tmp_path):
    out = tmp_path / "gemma.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_text_encoder.py"), "--steps", "1",
                           "--batch", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and "--steps 1" in record["command"]
