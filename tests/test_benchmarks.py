"""Smoke tests of the benchmark scripts: each runs at tiny size on CPU and reports its numbers.

They check that the scripts work and measure what they say (the right sizes, positive
rates, results that agree with the printed lines), not how fast anything is.

Run: OMP_NUM_THREADS=1 pytest tests/test_benchmarks.py   (~30 s on 2 cores)
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sana_appliance.benchmarks import data, engine, gpu, save


def test_engine_benchmark_times_the_real_run_and_the_bare_loop(tmp_path, capsys):
    results = engine.main(["--quick", "--workspace", str(tmp_path / "ws"), "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert "engine (Run.train)" in out and "bare loop" in out and "engine overhead" in out
    variants = results["variants"]
    assert set(variants) >= {"bare loop (preloaded batches)", "engine (Run.train)", "bare + clip, LR schedule, EMA"}
    # Every variant timed the same number of steps (3 per segment: 4 steps, first excluded).
    assert {v["timed_steps"] for v in variants.values()} == {3}
    assert all(v["steps_per_s"] > 0 for v in variants.values())
    assert json.loads((tmp_path / "e.json").read_text())["overhead_pct"] == pytest.approx(results["overhead_pct"])
    # The engine really trained: its metrics file has one line per step of both segments (warm-up + timed).
    lines = (Path(results["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == list(range(1, 9))


def test_data_benchmark_builds_the_cache_and_compares_loaders(tmp_path, capsys):
    results = data.main(["--quick", "--images", "8", "--batches", "4", "--json", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert "images/s" in out and "batches/s" in out and "naive" in out
    for key in ("decode_images_per_s", "cache_build_images_per_s", "cached_0_workers_batches_per_s",
                "cached_2_workers_batches_per_s", "naive_batches_per_s", "naive_with_vae_batches_per_s"):
        assert results[key] > 0, key
    # Decoding alone is part of building the cache, so it cannot be slower than all of it.
    assert results["decode_images_per_s"] > results["cache_build_images_per_s"]
    assert results["text_entry_bytes"] > 16 * 32 * 2  # the quick run's 16 x 32 bf16 embeddings


def test_data_benchmark_images_are_bucketed_at_the_requested_size(tmp_path):
    data.make_images(tmp_path / "img", 3, 64)
    _, plan = data.build_plan(tmp_path, tmp_path / "img", 64, 4)
    assert [s.size for s in plan.samples] == [(64, 64)] * 3


def test_gpu_flops_formula_reproduces_the_documented_figures():
    """docs/recipe.md (section 6) states the TFLOP per sample at 1024px and 512px; the formula gives them."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "recipe.md").read_text()
    match = re.search(r"([\d.]+) TFLOP per 1024px sample \(1024 image tokens\), ([\d.]+) TFLOP at 512px", doc)
    assert match, "docs/recipe.md lost its FLOPs figures"
    documented_1024, documented_512 = map(float, match.groups())
    at_1024 = gpu.train_flops(gpu.SANA_1600M, 32, 300, recomputed_blocks=20)
    assert at_1024["model"] / 1e12 == pytest.approx(documented_1024, abs=0.005)
    assert gpu.train_flops(gpu.SANA_1600M, 16, 300)["model"] / 1e12 == pytest.approx(documented_512, abs=0.005)
    assert at_1024["hardware"] / at_1024["model"] == pytest.approx(4 / 3, rel=0.01)
    half = gpu.train_flops(gpu.SANA_1600M, 32, 300, recomputed_blocks=10)
    assert half["hardware"] / half["model"] == pytest.approx(7 / 6, rel=0.01)


def test_gpu_config_has_the_real_parameter_count():
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):
        model = SanaTransformer2DModel(**gpu.SANA_1600M)
    assert sum(p.numel() for p in model.parameters()) == gpu.SANA_1600M_PARAMETERS == 1_604_462_752


def test_gpu_benchmark_tiny_runs_every_preset_with_its_settings(tmp_path, capsys):
    assert gpu.main(["--tiny", "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "g.json")]) == 0
    rows = {r["preset"]: r for r in json.loads((tmp_path / "g.json").read_text())}
    assert set(rows) == set(gpu.PRESETS)
    assert rows["lowest-vram"]["samples_per_step"] == 4 and rows["lowest-vram"]["optimizer"] == "bnb-lion8bit-paged"
    assert rows["multi-gpu"]["checkpointed_blocks"] == 1 and rows["multi-gpu"]["ema"] is True  # interval 2 of 2
    assert rows["24g"]["checkpointed_blocks"] == 2 and rows["24g"]["weight_dtype"] == "bfloat16"
    assert all(r["samples_per_s"] > 0 and r["mfu"] > 0 for r in rows.values())
    assert "lowest-vram" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_benchmark_without_cuda_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "sana_appliance.benchmarks.gpu"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_save_benchmark_writes_the_real_byte_counts_scaled(tmp_path, capsys):
    rows = save.main(["--scale", "0.002", "--dir", str(tmp_path), "--json", str(tmp_path / "s.json")])
    by = {r["preset"]: r for r in rows}
    n = 1_604_462_752
    # bf16 weights + optimizer state (+ fp32 EMA): the estimates checkpoints.estimate_bytes also uses.
    assert by["24g"]["gib"] * 2**30 == pytest.approx(n * (2 + 6) * 0.002, rel=1e-3)
    assert by["lowest-vram"]["gib"] * 2**30 == pytest.approx(n * (2 + 1.5 + 4 / 256) * 0.002, rel=1e-3)
    assert by["multi-gpu"]["gib"] * 2**30 == pytest.approx(n * (2 + 6 + 4) * 0.002, rel=1e-3)
    assert all(r["measured_gib"] == pytest.approx(r["gib"], rel=1e-3) and not r["extrapolated"] for r in rows)
    assert all(r["save_s"] > 0 and r["gb_per_s"] > 0 for r in rows)
    assert list(tmp_path.iterdir()) == [tmp_path / "s.json"]  # nothing left behind
    assert "GB/s" in capsys.readouterr().out


def test_save_benchmark_extrapolates_when_ram_is_capped_and_skips_when_disk_is_short(tmp_path, monkeypatch):
    capped = save.main(["--presets", "24g", "--scale", "0.002", "--max-ram-gib", "0.01", "--dir", str(tmp_path)])[0]
    assert capped["extrapolated"] and capped["measured_gib"] == pytest.approx(0.01, rel=0.01)
    assert capped["gib"] * 2**30 == pytest.approx(1_604_462_752 * 8 * 0.002, rel=1e-3)
    assert math.isclose(capped["save_s"], capped["measured_s"] * capped["gib"] / capped["measured_gib"], rel_tol=1e-6)

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(save.shutil, "disk_usage", lambda _path: Usage)
    skipped = save.main(["--presets", "lowest-vram", "--scale", "0.002", "--dir", str(tmp_path)])[0]
    assert "skipped" in skipped and "free" in skipped["skipped"]


def test_hub_outage_benchmark_compares_rates_and_checks_the_hub(shared_workspace, tmp_path, capsys):
    from sana_appliance.benchmarks import hub_outage

    # The suite's shared workspace: the tiny model and caches are built once for every end-to-end test.
    results = hub_outage.main(["--quick", "--workspace", str(shared_workspace), "--json", str(tmp_path / "h.json")])
    out = capsys.readouterr().out
    runs = results["runs"]
    assert list(runs) == ["uploads off", "uploads on, Hub outage", "uploads off again"]
    assert all(r["samples_per_s"] > 0 for r in runs.values())
    on = runs["uploads on, Hub outage"]
    assert on["outage_started"] and on["upload_retries_logged"] >= 1  # the outage really hit the uploads
    assert on["missing_on_hub"] == [] and results["everything_uploaded"]
    assert "uploads on during the outage: " in out and "the uploads-off rate" in out
    assert json.loads((tmp_path / "h.json").read_text())["slowdown_pct"] == pytest.approx(results["slowdown_pct"])


def test_gpu_config_fsdp_units_are_the_memory_models():
    """The FSDP memory model's unit sizes (README: Sharded training) are Sana 1.6B's: its largest
    `_no_split_modules` unit and what the root module keeps."""
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):
        model = SanaTransformer2DModel(**gpu.SANA_1600M)
    names = set(model._no_split_modules)
    units = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]
    assert max(units) == gpu.SANA_1600M_BLOCK_PARAMETERS
    assert gpu.SANA_1600M_PARAMETERS - sum(units) == gpu.SANA_1600M_ROOT_PARAMETERS


def test_appliance_benchmark_tiny_runs_the_real_cli_per_preset_and_reads_its_records(tmp_path, capsys):
    """The issue-14 GPU script's logic on CPU: each preset through entrypoint.py, numbers from run.json and
    metrics.jsonl (samples/s after warm-up, memory by phase, cache rates, checkpoint and validation times)."""
    from sana_appliance.benchmarks import appliance

    out = tmp_path / "a.json"
    code = appliance.main(["--tiny", "--presets", "24g", "lowest-vram", "lowest-vram-lokr", "fsdp", "--steps", "6", "--root",
                           str(tmp_path / "root"), "--out", str(out), "--log", str(tmp_path / "runs.log")])
    summary = json.loads(out.read_text())
    assert code == 0, [r.get("log_tail") for r in summary["results"]]
    by = {r["preset"]: r for r in summary["results"]}
    assert sorted(by) == ["24g", "fsdp", "lowest-vram", "lowest-vram-lokr"]
    lokr = by["lowest-vram-lokr"]  # the preset itself, end to end on the tiny model: LoKr on the nf4 base
    assert (lokr["model_type"], lokr["base_precision"], lokr["optimizer"]) == ("lora", "nf4-bnb", "bnb-lion8bit-paged")
    from sana_appliance.benchmarks import gpu

    full, frozen = (gpu.train_flops(gpu.SANA_1600M, 32, 300, frozen_base=f)["model"] for f in (False, True))
    assert frozen == pytest.approx(full * 2 / 3)  # a frozen base has no weight gradients: 2 forwards a step, not 3
    assert by["24g"]["optimizer"] == "optimi-adamw" and by["lowest-vram"]["optimizer"] == "bnb-lion8bit-paged"
    assert by["fsdp"]["strategy"] == "fsdp" and by["fsdp"]["optimizer"] == "adamw"
    for r in by.values():
        assert r["exit_code"] == 0 and r["samples_per_s"] > 0 and r["mfu"] > 0
        assert r["allocator_peak_gib"]["caching_peak_gib"] > 0 and r["allocator_peak_gib"]["training_peak_gib"] > 0
        assert r["cache_latents_per_s"] > 0 and r["cache_text_per_s"] > 0
        assert r["checkpoint_save_s"] is not None and r["validation_s"] is not None
        # Halfway (step 3 of 6) a checkpoint is written by a thread while training goes on; FSDP's shards are not.
        background = r["background_checkpoint"]
        if r["preset"] == "fsdp":
            assert background is None
        else:
            assert background["step"] == 3 and 0 <= background["loop_wait_s"] <= background["save_s"], background
        # The heavy outputs are gone (the next preset needs the disk); the records stay.
        output = tmp_path / "root" / r["preset"] / "output"
        assert not (output / "checkpoints").exists() and not (output / "final").exists()
        assert (output / "run.json").is_file() and r["disk_free_gib"] > 0
    assert "samples/s" in capsys.readouterr().out
    assert all(f"===== {name} (exit 0" in (tmp_path / "runs.log").read_text() for name in by)
    # Each preset built its own caches in its own workspace; the model folder was shared.
    assert all(by[name]["caches"]["latent_encoded"] > 0 for name in by)
    assert [p.name for p in (tmp_path / "root" / "models-cache" / "models").iterdir() if p.is_dir()] == ["tiny-sana-v4"]


def test_appliance_benchmark_without_cuda_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "sana_appliance.benchmarks.appliance"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_rounding_benchmark_tiny_times_bare_eager_and_compiled_lion(tmp_path, capsys):
    """The faithful 8-bit Lion against the bare one on Sana 1.6B's block shapes (shrunk), on CPU: all three
    variants run, the compiled one really with its compiled kernels, and the ratios are reported."""
    from sana_appliance.benchmarks import rounding

    out = tmp_path / "r.json"
    results = rounding.main(["--tiny", "--shrink", "8", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text())["variants"].keys() == {"bare", "eager", "compiled"}
    assert results["tensors"] == 19 and all(v["median_step_s"] > 0 for v in results["variants"].values())
    assert results["variants"]["bare"]["vs_bare"] == 1.0
    assert "of bare" in capsys.readouterr().out
