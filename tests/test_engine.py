"""The training engine end to end on the tiny built-in Sana (real CLI, CPU).

Run: pytest tests/test_engine.py   (~3-5 minutes on 2 cores)
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PLANTED_TOKEN, cli_env, run_cli
from safetensors.torch import load_file

from sana_appliance.config.resolve import resolve
from sana_appliance.model.flow import FlowSchedule


def all_text_under(folder: Path) -> str:
    chunks = []
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".txt", ".yaml"):
            chunks.append(f.read_text(errors="replace"))
    return "\n".join(chunks)


def test_demo_outputs_are_complete(demo_run):
    output, result = demo_run
    log = result.stdout + result.stderr
    # Checkpoints, each with its completion marker.
    ckpts = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-16", "checkpoint-8"]
    assert all((output / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    # Validation PNGs named by step, nickname and resolution.
    pngs = sorted(p.name for p in (output / "validation").glob("*.png"))
    assert "step0000008_validation_64x64.png" in pngs and "step0000016_validation_64x64.png" in pngs
    # Single-file exports: the trained and the EMA transformer.
    trained = load_file(output / "transformer.safetensors")
    ema = load_file(output / "transformer_ema.safetensors")
    assert trained.keys() == ema.keys() and any(not torch.equal(trained[k], ema[k]) for k in trained)
    # metrics.jsonl: one line per step with the numbers a person reads.
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, 17))
    assert all({"loss", "lr", "samples_per_s", "peak_mem_gib", "grad_norm"} <= x.keys() for x in lines if "loss" in x)
    # run.json: config, versions, model identity, data fingerprint, timings.
    run = json.loads((output / "run.json").read_text())
    assert run["config"]["max_train_steps"] == 16 and run["seed"] == 42
    assert run["model"]["kind"] == "builtin" and run["packages"]["diffusers"]
    assert run["datasets"][0]["fingerprint"] and run["timings_s"]["train_s"] > 0
    assert run["eval_loss"]["end"] < run["eval_loss"]["start"], run["eval_loss"]
    assert "held-out eval loss" in log
    # Outputs are readable by whoever mounts the volume: no 0600 files or 0700 folders, none world-writable.
    for path in output.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    # The planted token appears in no output file, log or model card.
    assert PLANTED_TOKEN not in all_text_under(output)
    assert PLANTED_TOKEN not in log


def test_final_pipeline_loads_and_generates(demo_run):
    from diffusers import SanaPipeline

    output, _ = demo_run
    final = output / "final"
    card = (final / "README.md").read_text()
    assert "builtin:tiny-sana" in card and "learning_rate" in card and "samples/" in card
    assert list((final / "samples").glob("*.png"))
    pipe = SanaPipeline.from_pretrained(final)
    # The pipeline's transformer holds the EMA weights (use_ema is on in the demo).
    ema = load_file(output / "transformer_ema.safetensors")
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 max_sequence_length=48, use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_same_seed_gives_bit_identical_weights_and_caches_hit(demo_run, shared_workspace):
    output, _ = demo_run
    # Another workspace (a copy of the first, so its caches hit): nothing of the folder may reach the outputs.
    elsewhere = _workspace_copy(shared_workspace, shared_workspace.parent / "workspace-copy")
    second = elsewhere / "out-again"
    result = run_cli(cli_env(elsewhere, second))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(output / "transformer.safetensors"), load_file(second / "transformer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Byte for byte too (safetensors would write its metadata in a per-process order), and what validation drew.
    same = ["transformer.safetensors", "transformer_ema.safetensors", "final/transformer/diffusion_pytorch_model.safetensors",
            "final/transformer/config.json"]
    same += [str(p.relative_to(output)) for p in sorted((output / "validation").glob("*.png"))]
    assert any("grid_step" in name for name in same)
    for name in same:
        assert (output / name).read_bytes() == (second / name).read_bytes(), name
    # The second run over the same data computes nothing.
    run = json.loads((second / "run.json").read_text())
    assert run["caches"]["latent_encoded"] == 0 and run["caches"]["text_encoded"] == 0
    assert run["caches"]["latent_hits"] > 0
    assert re.search(r"hit rate 100%", result.stderr)


def test_different_seed_gives_different_weights(demo_run, shared_workspace):
    output, _ = demo_run
    other = shared_workspace / "out-seed7"
    result = run_cli(cli_env(shared_workspace, other, SANA_SEED="7", SANA_MAX_TRAIN_STEPS="4", SANA_VALIDATION_STEPS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(output / "transformer.safetensors"), load_file(other / "transformer.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _workspace_copy(shared_workspace: Path, dest: Path) -> Path:
    shutil.copytree(shared_workspace / "cache", dest / "cache")
    shutil.copytree(shared_workspace / "datasets", dest / "datasets")
    return dest


def _poison_latents(files: list[Path]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in files:
        with safe_open(f, "pt") as handle:
            meta, latents = handle.metadata(), handle.get_tensor("latents")
        save_file({"latents": torch.full_like(latents, float("nan"))}, f, meta)


def _loss_lines(output: Path) -> list[dict]:
    return [x for x in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def test_nonfinite_steps_are_skipped_then_exit_5(demo_run, shared_workspace, tmp_path):  # demo_run fills the caches
    """Every cached latent poisoned: each step is skipped (weights unchanged) and counted in
    skipped_steps; max_nonfinite_steps in a row is exit 5 with the checkpoints intact."""
    from sana_appliance.model.parts import builtin_model_path

    ws = _workspace_copy(shared_workspace, tmp_path / "ws")
    latent_files = [f for f in sorted((ws / "cache").rglob("*.safetensors")) if "latents" in load_file(f)]
    assert latent_files
    _poison_latents(latent_files)
    out = tmp_path / "out"
    result = run_cli(cli_env(ws, out, SANA_MAX_NONFINITE_STEPS="3", SANA_CHECKPOINTING_STEPS="2", SANA_VALIDATION_STEPS="0"))
    assert result.returncode == 5, result.stderr[-3000:]
    assert "diverged" in result.stderr and "step 3" in result.stderr and "non-finite" in result.stderr
    # Steps 1 and 2 were logged as skipped (step 3 stopped the run before its line).
    assert [(x["step"], x["skipped_steps"]) for x in _loss_lines(out)] == [(1, 1), (2, 2)]
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "COMPLETE").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["nonfinite_total"] == 2
    # The demo's fused AdamW skips on the device; the host then held the schedule and the EMA count back.
    assert torch.load(ckpt / "lr_scheduler.pt", weights_only=False)["last_epoch"] == 0
    assert torch.load(ckpt / "ema_meta.pt", weights_only=False)["num_updates"] == 0
    # Skipped means skipped: the checkpoint holds the untouched base weights.
    weights = load_file(ckpt / "transformer.safetensors")
    base = load_file(builtin_model_path(ws / "cache") / "transformer" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == base.keys() and all(torch.equal(weights[k], base[k]) for k in base)


def test_one_nonfinite_step_is_skipped_and_recorded_then_training_goes_on(demo_run, shared_workspace, tmp_path):
    """One poisoned training image: the one step that draws it is skipped, the rest train, and
    metrics.jsonl, the log and run.json all say exactly one step was skipped."""
    from safetensors import safe_open

    ws = _workspace_copy(shared_workspace, tmp_path / "ws")
    train_latents = []
    for f in sorted((ws / "cache").rglob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            meta = handle.metadata() or {}
        if "tiny-sana" in meta.get("vae", "") and "/train/" in meta.get("source", ""):
            train_latents.append(f)
    assert len(train_latents) == 64
    _poison_latents(train_latents[:1])
    out = tmp_path / "out"
    # 16 steps of batch 4 are one epoch of the 64 images: the poisoned one is drawn exactly once.
    result = run_cli(cli_env(ws, out, SANA_CHECKPOINTING_STEPS="100", SANA_VALIDATION_STEPS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _loss_lines(out)
    assert [x["step"] for x in lines] == list(range(1, 17))
    bad = [x["step"] for x in lines if not math.isfinite(x["loss"])]
    assert len(bad) == 1, bad
    assert [x["skipped_steps"] for x in lines] == [int(x["step"] >= bad[0]) for x in lines]
    assert f"step {bad[0]}: non-finite loss or gradients" in result.stderr and "update skipped" in result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["skipped_steps"] == 1 and run["steps"] == 16
    assert all(torch.isfinite(v).all() for v in load_file(out / "transformer.safetensors").values())
    assert math.isfinite(run["eval_loss"]["end"]) and run["eval_loss"]["end"] < run["eval_loss"]["start"]


def test_training_schedule_has_shift_3_from_sana_scheduler_config(tmp_path):
    """docs/recipe.md trap: FlowMatchEulerDiscreteScheduler on Sana's DPM config silently gives shift 1.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sana_style = {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0, "use_flow_sigmas": True,
                  "prediction_type": "flow_prediction", "num_train_timesteps": 1000}
    trap = FlowMatchEulerDiscreteScheduler.from_config(sana_style)
    assert trap.config.shift == 1.0  # the trap is real; we do not go through it
    cfg = resolve({"WORKSPACE": str(tmp_path), "PRESET": "24g"}).config
    schedule = FlowSchedule.from_config(cfg, sana_style)
    assert schedule.shift == 3.0 and schedule.shift_for(1024, 1024) == 3.0
    sigmas = schedule.sample_sigmas(20000, torch.Generator().manual_seed(0), schedule.shift)
    # Logit-normal median 0.5 shifted by 3: 3*0.5 / (1 + 2*0.5) = 0.75.
    assert abs(float(sigmas.median()) - 0.75) < 0.01
    assert float(sigmas.min()) > 0 and float(sigmas.max()) < 1
    auto = FlowSchedule(shift=3.0, auto_shift=True)
    assert auto.shift_for(1024, 1024) == 3.0 and abs(auto.shift_for(512, 512) - 1.5) < 1e-9
    custom = FlowSchedule.from_config(resolve({"WORKSPACE": str(tmp_path), "SANA_FLOW_SCHEDULE_SHIFT": "1.5"}).config)
    assert custom.shift == 1.5


def test_validation_prompts_resolutions_trackers_and_no_rng_disturbance(shared_workspace, tmp_path):
    """Validation with a prompt library at two resolutions, TensorBoard + offline wandb; the same
    run without validation ends with bit-identical weights (validation leaves the RNG alone)."""
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"green square": "a green square on a yellow background", "circle": "a red circle"}))
    common = {"SANA_MAX_TRAIN_STEPS": "4", "SANA_CHECKPOINTING_STEPS": "100", "SANA_USE_EMA": "false"}
    with_val = run_cli(cli_env(shared_workspace, tmp_path / "val", SANA_VALIDATION_STEPS="2",
                               SANA_USER_PROMPT_LIBRARY=str(library), SANA_VALIDATION_RESOLUTION="64x64,96x64",
                               SANA_REPORT_TO="all", WANDB_MODE="offline", **common))
    assert with_val.returncode == 0, with_val.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "val" / "validation").glob("*.png"))
    for step in (2, 4):
        for nick in ("validation", "green_square", "circle"):
            for res in ("64x64", "96x64"):
                assert f"step{step:07d}_{nick}_{res}.png" in names, names
    from PIL import Image

    assert Image.open(tmp_path / "val" / "validation" / "step0000004_circle_96x64.png").size == (96, 64)
    assert list((tmp_path / "val" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "val" / "wandb").glob("offline-run-*"))
    for f in (tmp_path / "val").rglob("*"):  # tracker files included, byte for byte
        assert not f.is_file() or PLANTED_TOKEN.encode() not in f.read_bytes(), f
    without = run_cli(cli_env(shared_workspace, tmp_path / "noval", SANA_VALIDATION_STEPS="0", **common))
    assert without.returncode == 0, without.stderr[-3000:]
    a = load_file(tmp_path / "val" / "transformer.safetensors")
    b = load_file(tmp_path / "noval" / "transformer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_from_a_hub_repo_records_its_commit(shared_workspace, tmp_path):
    """The real download path: huggingface_hub against a local Hub server serving the tiny model."""
    from hubserver import FakeHub

    from sana_appliance.model.parts import builtin_model_path

    folder = builtin_model_path(shared_workspace / "cache")
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with FakeHub() as hub:
        repo = hub.add_repo("acme/tiny-sana", files)
        env = cli_env(shared_workspace, tmp_path / "out", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url,
                      HF_HOME=str(tmp_path / "hf"), SANA_PRETRAINED_MODEL_NAME_OR_PATH="acme/tiny-sana",
                      SANA_MAX_TRAIN_STEPS="2", SANA_VALIDATION_STEPS="0")
        result = run_cli(env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"]["repo_id"] == "acme/tiny-sana" and run["model"]["commit_sha"] == repo.sha
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "acme/tiny-sana" in card and repo.sha in card
    assert PLANTED_TOKEN not in all_text_under(tmp_path / "out")
    # An unknown repo is exit 3 with the repo named.
    with FakeHub() as hub:
        env.update(HF_ENDPOINT=hub.url, SANA_PRETRAINED_MODEL_NAME_OR_PATH="acme/missing")
        missing = run_cli(env)
    assert missing.returncode == 3 and "acme/missing" in missing.stderr


def _checkpointing_trace(transformer) -> tuple[torch.Tensor, set[int], int]:
    """One forward + backward: the gradients, the blocks whose layers ran again during backward
    (recomputed activations) and the bytes autograd saved for backward outside checkpointed regions."""
    in_backward, recomputed, saved = [False], set(), [0]
    hooks = [block.attn1.register_forward_pre_hook(lambda *_, i=i: recomputed.add(i) if in_backward[0] else None)
             for i, block in enumerate(transformer.transformer_blocks)]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, generator=g)
    e = torch.randn(2, 6, transformer.config.caption_channels, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = transformer(x, encoder_hidden_states=e, encoder_attention_mask=torch.ones(2, 6),
                          timestep=torch.tensor([100.0, 700.0])).sample
    in_backward[0] = True
    out.pow(2).mean().backward()
    for hook in hooks:
        hook.remove()
    return torch.cat([p.grad.flatten() for p in transformer.parameters()]), recomputed, saved[0]


def test_block_checkpointing_recomputes_the_chosen_blocks_and_keeps_numbers(tmp_path):
    """gradient_checkpointing really recomputes every interval-th block in backward (so autograd
    keeps fewer activations), with the same gradients and state_dict keys as without it."""
    from sana_appliance.model import parts as models

    folder = models.builtin_model_path(tmp_path)
    stored = set(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    traces = {}
    for interval in (None, 1, 2):
        t = models.load_parts(folder, "x", torch.float32).transformer
        if interval:
            wrapped = models.enable_block_checkpointing(t, interval)
            assert wrapped == len(range(0, len(t.transformer_blocks), interval))
        traces[interval] = _checkpointing_trace(t)
        assert set(t.state_dict()) == stored
    num_blocks = len(t.transformer_blocks)
    (grads, recomputed, saved), (grads1, recomputed1, saved1), (grads2, recomputed2, saved2) = traces.values()
    assert recomputed == set()
    assert recomputed1 == set(range(num_blocks)) and recomputed2 == set(range(0, num_blocks, 2))
    assert saved1 < saved2 < saved  # checkpointed blocks keep only their inputs
    assert torch.allclose(grads, grads1, atol=1e-6) and torch.allclose(grads, grads2, atol=1e-6)


def test_text_encoder_nf4_for_caching(shared_workspace, tmp_path):
    """lowest-vram's nf4 Gemma while caching: its layers really are 4-bit (the log says how many)
    and its embeddings are cached under their own keys."""
    result = run_cli(cli_env(shared_workspace, tmp_path / "out", SANA_TEXT_ENCODER_1_PRECISION="nf4-bnb",
                             SANA_MAX_TRAIN_STEPS="2", SANA_VALIDATION_STEPS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    # The tiny Gemma-2 has 2 layers of 7 linear layers each (q, k, v, o, gate, up, down): all 4-bit.
    assert "text encoder in nf4 (bitsandbytes): 14 of 14 linear layers 4-bit" in result.stderr
    caches = json.loads((tmp_path / "out" / "run.json").read_text())["caches"]
    assert caches["text_encoded"] > 0
    from safetensors import safe_open

    encoders = set()
    for f in (shared_workspace / "cache" / "text").rglob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            encoders.add(handle.metadata()["encoder"].split("|")[-1])
    assert "text_encoder:nf4-bnb" in encoders  # nf4 embeddings never mix with full-precision ones


def test_nf4_text_encoder_is_quantized_and_close_to_full_precision(tmp_path):
    import bitsandbytes as bnb

    from sana_appliance.model import parts as models

    folder = models.builtin_model_path(tmp_path)
    cpu = torch.device("cpu")
    nf4 = models.load_text_encoder(folder, SimpleNamespace(text_encoder_1_precision="nf4-bnb", quantize_via="cpu"), cpu)
    full = models.load_text_encoder(folder, SimpleNamespace(text_encoder_1_precision="no_change", quantize_via="cpu"), cpu)
    linear = [m for m in nf4.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 14 and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in full.modules())
    ids = torch.tensor([[2, 270, 271, 272, 273, 274, 275]])
    with torch.no_grad():
        a, b = nf4(input_ids=ids).last_hidden_state.float(), full(input_ids=ids).last_hidden_state.float()
    assert not torch.equal(a, b)  # quantization changes the numbers: these are not the fp32 weights
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_failed_nf4_load_is_a_config_error_with_the_fix(tmp_path, monkeypatch):
    from sana_appliance.core.errors import ConfigError
    from sana_appliance.model import parts as models

    folder = models.builtin_model_path(tmp_path)
    cfg, cpu = SimpleNamespace(text_encoder_1_precision="nf4-bnb", quantize_via="cpu"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError) as caught:
        models.load_text_encoder(folder, cfg, cpu)
    message = caught.value.message
    assert "text_encoder_1_precision='nf4-bnb'" in message and "bitsandbytes is not installed" in message
    assert "SANA_TEXT_ENCODER_1_PRECISION=no_change" in message


def test_nf4_kernel_refusal_exits_2_with_the_fix(shared_workspace, tmp_path):
    """A text encoder narrower than bitsandbytes' 64-value nf4 block: its CPU kernel refuses it on
    AVX512-BF16 hosts (exit 2 naming the key and the fix) and runs it elsewhere. Never a traceback."""
    from sana_appliance.model import parts as models

    narrow = tmp_path / "narrow-sana"
    models.build_tiny_sana(narrow, text_width=32)
    result = run_cli(cli_env(shared_workspace, tmp_path / "out", SANA_PRETRAINED_MODEL_NAME_OR_PATH=str(narrow),
                             SANA_TEXT_ENCODER_1_PRECISION="nf4-bnb", SANA_MAX_TRAIN_STEPS="2", SANA_VALIDATION_STEPS="0"))
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.returncode in (0, 2), result.stderr[-3000:]
    if result.returncode == 2:
        assert "text_encoder_1_precision='nf4-bnb'" in result.stderr and "refused to run" in result.stderr
        assert "SANA_TEXT_ENCODER_1_PRECISION=no_change" in result.stderr


def test_nf4_kernel_refusal_is_a_config_error_on_any_cpu(tmp_path, monkeypatch):
    """The kernel-refusal path itself, on every host: a 4-bit layer whose kernel raises (as
    bitsandbytes' CPU nf4 kernel does on AVX512-BF16 hosts) becomes the ConfigError with the fix."""
    import bitsandbytes

    from sana_appliance.core.errors import ConfigError
    from sana_appliance.model import parts as models

    def refuse(self, x):
        raise RuntimeError("shape '[32, 0]' is invalid for input of size 64")

    folder = models.builtin_model_path(tmp_path)
    monkeypatch.setattr(bitsandbytes.nn.Linear4bit, "forward", refuse)
    cfg, cpu = SimpleNamespace(text_encoder_1_precision="nf4-bnb", quantize_via="cpu"), torch.device("cpu")
    with pytest.raises(ConfigError) as caught:
        models.load_text_encoder(folder, cfg, cpu)
    message = caught.value.message
    assert "4-bit kernel refused to run" in message and "SANA_TEXT_ENCODER_1_PRECISION=no_change" in message


def test_compile_transformer_trains_the_demo_like_eager(demo_run, shared_workspace, tmp_path):  # demo_run: caches
    """compile_transformer=true on the CPU (inductor): the blocks are compiled (logged), the losses follow the
    eager run's within float tolerance (inductor fuses and reorders fp32 math), validation renders (eager), and
    the checkpoint and the export keep the eager state_dict keys."""
    from safetensors import safe_open

    steps = {"SANA_MAX_TRAIN_STEPS": "6", "SANA_CHECKPOINTING_STEPS": "3", "SANA_VALIDATION_STEPS": "6",
             "SANA_LOGGING_STEPS": "1"}
    eager = run_cli(cli_env(shared_workspace, tmp_path / "eager", **steps))
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run_cli(cli_env(shared_workspace, tmp_path / "compiled", SANA_COMPILE_TRANSFORMER="true", **steps),
                       timeout=900)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "transformer blocks compiled with torch.compile" in compiled.stderr
    assert "compiled with torch.compile" not in eager.stderr
    a, b = ([x["loss"] for x in _loss_lines(tmp_path / name)] for name in ("eager", "compiled"))
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a, b)), (a, b)
    assert list((tmp_path / "compiled" / "validation").rglob("*.png"))

    def keys(path: Path) -> list[str]:
        with safe_open(path, "pt") as handle:
            return sorted(handle.keys())

    for rel in ("checkpoints/checkpoint-3/transformer.safetensors", "transformer.safetensors"):
        assert keys(tmp_path / "compiled" / rel) == keys(tmp_path / "eager" / rel), rel
