"""The whole appliance at real size, per preset, on one GPU: the issue-14 GPU run.

    python -m sana_appliance.benchmarks.appliance --out appliance.json                # H100/H200 (estimated 5-8 min)
    python -m sana_appliance.benchmarks.appliance --tiny --out tiny.json              # its logic on CPU, ~2 min
    bash scripts/gpu-session.sh                                                       # on a lent GPU machine

What runs is the real CLI (``entrypoint.py``), one fresh process per preset, each in a workspace of its own
(the caches are built anew per preset; the model folder is shared): the built-in real-size model
``builtin:sana-1600m-random`` (built once first, on the GPU, by its own process), a generated dataset of
``--images`` 1024px pictures (``sana_appliance.data.demo.write_shapes``), and the preset's config with
only these changed: ``max_train_steps``, a checkpoint halfway (written in the background) and at the end, one
validation round (1024x1024, at the end),
logging every step, ``num_processes: 1``. Presets: ``24g``, ``lowest-vram`` (text encoder in nf4 while
caching), ``multi-gpu`` (its per-GPU config on one process), ``fsdp`` (multi-gpu with
``distributed_strategy: fsdp`` and torch AdamW, as FSDP requires), ``24g-compiled`` (24g with
``compile_transformer: true``: compiled blocks against the eager 24g), ``lowest-vram-lokr`` (LoKr on the nf4 base,
the guide's lowest-VRAM recipe; its MFU counts 2 forwards a step, the frozen base having no weight gradients).

Reported per preset, from the run's own records (run.json, metrics.jsonl) and the parent's watch:
- samples/s over the steps after ``--warmup`` (metrics.jsonl's ``elapsed_s``), MFU and HFU from the
  analytic FLOPs (``benchmarks.gpu.train_flops``, block recomputation at the preset's interval);
- peak memory, the allocator's (run.json ``memory``: caching and training phases) and the device-wide use
  (``nvidia-smi`` every 0.2 s, CUDA context and bitsandbytes' paged state included) in the same phases,
  told apart by the run's log lines;
- cache build: text embeddings and VAE latents per second (run.json ``caches``);
- the final checkpoint's save time, the halfway checkpoint's write time and how long the loop waited for
  its host copy, the validation round's time, the wall time and the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import write_json

ROOT = Path(__file__).resolve().parents[2]
RUNS = {  # preset run name -> the environment beside the common one
    "24g": {"PRESET": "24g"},
    "lowest-vram": {"PRESET": "lowest-vram"},
    "lowest-vram-lokr": {"PRESET": "lowest-vram-lokr"},  # LoKr on the nf4 base (the guide's lowest-VRAM table)
    "multi-gpu": {"PRESET": "multi-gpu"},
    "fsdp": {"PRESET": "multi-gpu", "SANA_DISTRIBUTED_STRATEGY": "fsdp", "SANA_OPTIMIZER": "adamw"},
    "24g-compiled": {"PRESET": "24g", "SANA_COMPILE_TRANSFORMER": "true"},  # compile_transformer on vs 24g off
}
# Phase markers in the run's log (run/train.py, data/precompute.py): the device-wide samples between them.
CACHING_STARTS = "caching text embeddings"
CACHING_ENDS = "caches: text embeddings"
TRAINING_STARTS = "held-out eval loss at step"
TRAINING_ENDS = "saved checkpoint-"
GIB = 2**30


BACKGROUND_SAVE = re.compile(r"saved checkpoint-(\d+) \(([\d.]+) s, written while training went on; "
                             r"the loop waited ([\d.]+) s")


def _background_save(lines: list[str]) -> dict | None:
    """The mid-run checkpoint (written by a thread while training went on): its step, the write's seconds and
    the seconds the loop waited for the host copy, from the run's log line (run/train.py)."""
    for line in lines:
        found = BACKGROUND_SAVE.search(line)
        if found:
            return {"step": int(found[1]), "save_s": float(found[2]), "loop_wait_s": float(found[3])}
    return None


class DeviceWatch:
    """Device-wide used memory from nvidia-smi, sampled in a thread (no CUDA context in this process)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.samples = interval_s, []
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append((time.monotonic(), int(out[0]) * 2**20))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join(timeout=10)

    def peak_gib(self, start: float | None, end: float | None, baseline: int = 0) -> float | None:
        if start is None:
            return None
        values = [used for t, used in self.samples if t >= start and (end is None or t <= end)]
        return round((max(values) - baseline) / GIB, 3) if values else None


def prepare(root: Path, images: int, size: int) -> Path:
    """The generated dataset and its multidatabackend.json (shared by every preset's workspace)."""
    from ..data import demo

    data = root / "data" / f"shapes-{size}"
    if not (data / "DONE").is_file():
        demo.write_shapes(data, count=images, size=size, seed=0)
    config = root / "multidatabackend.json"
    config.write_text(json.dumps([
        {"id": f"shapes-{size}", "type": "local", "instance_data_dir": str(data), "caption_strategy": "textfile",
         "resolution": size, "resolution_type": "pixel", "crop": False, "minimum_image_size": size},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local"},
    ], indent=2))
    return config


def build_model(root: Path, tiny: bool) -> dict:
    """Build the real-size model once, in its own process (its memory is not the presets')."""
    if tiny:
        return {"build_s": None}
    started = time.monotonic()
    code = ("import torch; from pathlib import Path; from sana_appliance.model import BUILTIN_RANDOM, parts; "
            f"parts.builtin_model_path(Path({str(root / 'models-cache')!r}), BUILTIN_RANDOM, torch.device('cuda'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"building the real-size model failed:\n{proc.stderr[-3000:]}")
    return {"build_s": round(time.monotonic() - started, 1)}


def run_preset(name: str, root: Path, config: Path, args) -> dict:
    """One preset through the real CLI in a fresh process; its numbers."""
    from ..model import BUILTIN_MODEL, BUILTIN_RANDOM
    from . import gpu

    workspace = root / name
    (workspace / "cache").mkdir(parents=True, exist_ok=True)
    models = workspace / "cache" / "models"
    if not models.exists():
        (root / "models-cache" / "models").mkdir(parents=True, exist_ok=True)
        models.symlink_to(root / "models-cache" / "models", target_is_directory=True)
    output = workspace / "output"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANA_") and k not in ("PRESET", "CONFIG_PATH")}
    env.update(RUNS[name], WORKSPACE=str(workspace), OUTPUT_DIR=str(output), DATALOADER_CONFIG=str(config),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               SANA_PRETRAINED_MODEL_NAME_OR_PATH=BUILTIN_MODEL if args.tiny else BUILTIN_RANDOM,
               SANA_MAX_TRAIN_STEPS=str(args.steps), SANA_CHECKPOINTING_STEPS=str(max(1, args.steps // 2)),
               SANA_VALIDATION_STEPS=str(args.steps), SANA_LOGGING_STEPS="1", SANA_NUM_PROCESSES="1",
               SANA_VALIDATION_RESOLUTION=f"{args.size}x{args.size}", SANA_REPORT_TO="none",
               SANA_VALIDATION_NUM_INFERENCE_STEPS=str(args.validation_steps), SANA_PUSH_TO_HUB="false")
    if args.tiny:  # the tiny model's text width and the CPU
        env.update(SANA_MIXED_PRECISION="no", SANA_TOKENIZER_MAX_LENGTH="48", SANA_DATALOADER_NUM_WORKERS="0",
                   SANA_TEXT_ENCODER_1_PRECISION="no_change")
    marks: dict[str, float] = {}
    lines: list[str] = []
    with DeviceWatch() as watch:
        time.sleep(0.5 if watch.available else 0)
        baseline = watch.samples[-1][1] if watch.samples else 0
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # A preset that runs past its share of the time is stopped like a preemption (SIGTERM, then SIGKILL).
        timer = threading.Timer(args.preset_timeout, _stop, (proc,))
        timer.start()
        for line in proc.stdout:
            lines.append(line.rstrip())
            now = time.monotonic()
            for key, marker in (("caching", CACHING_STARTS), ("cached", CACHING_ENDS), ("training", TRAINING_STARTS),
                                ("trained", f"{TRAINING_ENDS}{args.steps} (")):
                if marker in line and key not in marks:
                    marks[key] = now
        code = proc.wait()
        timer.cancel()
        wall = time.monotonic() - started
    if args.log is not None:
        with open(args.log, "a", encoding="utf-8") as log:
            log.write(f"===== {name} (exit {code}, {wall:.1f} s)\n" + "\n".join(lines) + "\n")
    result = {"preset": name, "exit_code": code, "wall_s": round(wall, 1),
              "timed_out": wall >= args.preset_timeout}
    if code != 0:
        oom = any("out of memory" in line.lower() for line in lines[-60:])
        result.update(error="out of memory" if oom else ("timed out" if result["timed_out"] else "failed"),
                      log_tail=lines[-12:])
    run_file = output / "run.json"
    if not run_file.is_file() or not (output / "metrics.jsonl").is_file():
        result.setdefault("error", "no run.json")
        return result
    run = json.loads(run_file.read_text())  # a run that failed late (export, disk) still measured its steps
    cfg = run["config"]
    metrics = []
    for raw in (output / "metrics.jsonl").read_text().splitlines():
        try:
            metrics.append(json.loads(raw))
        except ValueError:
            pass
    steps = [m for m in metrics if "elapsed_s" in m and m["step"] > args.warmup]
    per_step = cfg["train_batch_size"] * cfg["gradient_accumulation_steps"]
    samples_per_s = None
    if len(steps) >= 2:
        span = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
        samples_per_s = (steps[-1]["step"] - steps[0]["step"]) * per_step / span if span > 0 else None
    model_config = gpu.TINY if args.tiny else gpu.SANA_1600M
    hw = args.size // 32 if not args.tiny else args.size // 4
    blocks = model_config["num_layers"]
    interval = cfg.get("gradient_checkpointing_interval") or 1
    recomputed = (blocks + interval - 1) // interval if cfg.get("gradient_checkpointing") else 0
    flops = gpu.train_flops(model_config, hw, cfg["tokenizer_max_length"], recomputed_blocks=recomputed,
                            frozen_base=cfg.get("model_type") == "lora")
    caches = run.get("caches", {})
    timings = run.get("timings_s", {})
    result.update(
        batch=f"{cfg['train_batch_size']}x{cfg['gradient_accumulation_steps']}", optimizer=cfg["optimizer"],
        strategy=cfg.get("distributed_strategy"), mixed_precision=cfg["mixed_precision"],
        model_type=cfg.get("model_type"), base_precision=cfg.get("base_model_precision"),
        text_encoder_precision=cfg.get("text_encoder_1_precision"), checkpointed_blocks=recomputed,
        samples_per_s=round(samples_per_s, 3) if samples_per_s else None,
        step_s_median=round(statistics.median(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])), 4)
        if len(steps) >= 2 else None,
        model_tflop_per_sample=round(flops["model"] / 1e12, 3),
        mfu=flops["model"] * samples_per_s / (args.peak_tflops * 1e12) if samples_per_s else None,
        hfu=flops["hardware"] * samples_per_s / (args.peak_tflops * 1e12) if samples_per_s else None,
        allocator_peak_gib=run.get("memory", {}),
        device_peak_gib={"caching": watch.peak_gib(marks.get("caching"), marks.get("cached")),
                         "training": watch.peak_gib(marks.get("training"), marks.get("trained")),
                         "whole_run": watch.peak_gib(started, None),
                         "baseline_gib": round(baseline / GIB, 3)},
        cache_text_per_s=round(caches["text_encoded"] / caches["text_s"], 2) if caches.get("text_s") else None,
        cache_latents_per_s=round(caches["latent_encoded"] / caches["latent_s"], 2) if caches.get("latent_s") else None,
        caches=caches, checkpoint_save_s=timings.get("last_checkpoint_save_s"),
        background_checkpoint=_background_save(lines),
        validation_s=timings.get("last_validation_s"), setup_s=timings.get("setup_s"), cache_s=timings.get("cache_s"),
        train_s=timings.get("train_s"), eval_loss=run.get("eval_loss"),
        output_gib=round(sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) / GIB, 2),
    )
    # The next preset needs the disk: checkpoints, export and single-file weights go (the records stay).
    for heavy in ("checkpoints", "final"):
        shutil.rmtree(output / heavy, ignore_errors=True)
    for single in output.glob("transformer*.safetensors"):
        single.unlink(missing_ok=True)
    result["disk_free_gib"] = round(shutil.disk_usage(root).free / GIB, 1)
    return result


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (it saves and exits 143), SIGKILL 60 s later if it is still there."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def environment() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda)
        if shutil.which("nvidia-smi"):
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            info["gpu"] = query[0] if query else None
    except ImportError:
        pass
    for name in ("diffusers", "transformers", "bitsandbytes", "torch-optimi", "accelerate"):
        try:
            from importlib import metadata

            info[name] = metadata.version(name)
        except Exception:  # noqa: BLE001 (a missing package is reported as such)
            info[name] = None
    return info


def report(results: list[dict]) -> None:
    for r in results:
        if "error" in r:
            print(f"  {r['preset']:<12} {r['error']} (exit {r['exit_code']}): " + " | ".join(r.get("log_tail", [])[-3:]))
            if "samples_per_s" not in r:
                continue
        mem, dev = r["allocator_peak_gib"], r["device_peak_gib"]
        print(f"  {r['preset']:<12} batch {r['batch']:<5} {r['samples_per_s'] or 0:8.2f} samples/s  MFU "
              f"{100 * (r['mfu'] or 0):5.1f}%  HFU {100 * (r['hfu'] or 0):5.1f}%  allocator peak caching "
              f"{mem.get('caching_peak_gib')} / training {mem.get('training_peak_gib')} GiB; device caching "
              f"{dev['caching']} / training {dev['training']} GiB; latents {r['cache_latents_per_s']}/s, text "
              f"{r['cache_text_per_s']}/s; checkpoint {r['checkpoint_save_s']} s (halfway, in the background: "
              f"{(r['background_checkpoint'] or {}).get('save_s')} s, the loop waited "
              f"{(r['background_checkpoint'] or {}).get('loop_wait_s')} s); validation {r['validation_s']} s; "
              f"wall {r['wall_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=50, help="training steps per preset (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of samples/s (default 5)")
    parser.add_argument("--images", type=int, default=64, help="generated training images (default 64)")
    parser.add_argument("--validation-steps", type=int, default=8, help="sampler steps of the validation round")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON (rewritten after each preset)")
    parser.add_argument("--log", type=Path, help="append every run's whole log here")
    parser.add_argument("--preset-timeout", type=float, default=170.0,
                        help="seconds one preset may take before it is stopped like a preemption (default 170)")
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in model at 64px on CPU: checks the logic")
    args = parser.parse_args(argv)
    args.size = 64 if args.tiny else 1024
    if args.tiny:
        args.images, args.steps, args.warmup = min(args.images, 8), min(args.steps, 6), min(args.warmup, 2)
    else:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if not cuda:
            print("no CUDA device: this benchmark runs the appliance at real size on an NVIDIA GPU; nothing to do here. "
                  "Add --tiny to check its logic on CPU.")
            return 0
    temp = None
    root = args.root
    if root is None:
        temp = tempfile.TemporaryDirectory(prefix="sana-appliance-bench-")
        root = Path(temp.name)
    try:
        started = time.monotonic()
        config = prepare(root, args.images, args.size)
        built = build_model(root, args.tiny)
        print(f"appliance benchmark: {'tiny model on CPU (numbers meaningless)' if args.tiny else 'Sana 1.6B, random weights, 1024px'}; "
              f"{args.steps} steps per preset; model built in {built['build_s']} s", flush=True)
        results = []
        env_info = environment()
        for name in args.presets:
            results.append(run_preset(name, root, config, args))
            report(results[-1:])
            sys.stdout.flush()
            if args.out:  # after every preset: a kill of the whole script keeps what was measured
                write_json(args.out, {"environment": env_info, "args": {k: str(v) for k, v in vars(args).items()},
                                      **built, "total_s": round(time.monotonic() - started, 1), "results": results})
        return 0 if all("error" not in r for r in results) else 1
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
