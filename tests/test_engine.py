"""The training engine end to end on the tiny built-in Sana (real CLI, CPU).

Run: pytest tests/test_engine.py   (~2 minutes on 2 cores)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from conftest import PLANTED_TOKEN, cli_env, run_cli
from safetensors.torch import load_file

from sana_appliance.flow import FlowSchedule
from sana_appliance.resolve import resolve


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
                 max_sequence_length=48, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_same_seed_gives_bit_identical_weights_and_caches_hit(demo_run, shared_workspace):
    output, _ = demo_run
    second = shared_workspace / "out-again"
    result = run_cli(cli_env(shared_workspace, second))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(output / "transformer.safetensors"), load_file(second / "transformer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
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


def test_nonfinite_steps_are_skipped_then_exit_5(shared_workspace, tmp_path):
    """Poisoned cached latents: some steps skipped and counted; all poisoned: exit 5, checkpoints intact."""
    ws = tmp_path / "ws"
    shutil.copytree(shared_workspace / "cache", ws / "cache")
    shutil.copytree(shared_workspace / "datasets", ws / "datasets")
    from safetensors.torch import save_file

    latent_files = sorted((ws / "cache").rglob("*.safetensors"))
    latent_files = [f for f in latent_files if "latents" in load_file(f)]
    assert latent_files
    for f in latent_files:
        t = load_file(f)
        save_file({"latents": torch.full_like(t["latents"], float("nan"))}, f)
    result = run_cli(cli_env(ws, tmp_path / "out", SANA_MAX_NONFINITE_STEPS="3", SANA_CHECKPOINTING_STEPS="2",
                             SANA_VALIDATION_STEPS="0"))
    assert result.returncode == 5, result.stderr[-3000:]
    assert "diverged" in result.stderr and "step 3" in result.stderr and "non-finite" in result.stderr
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    assert (ckpt / "COMPLETE").is_file()
    weights = load_file(ckpt / "transformer.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_training_schedule_has_shift_3_from_sana_scheduler_config(tmp_path):
    """FACTS.md trap: FlowMatchEulerDiscreteScheduler on Sana's DPM config silently gives shift 1.0."""
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
