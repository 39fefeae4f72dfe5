"""output/run.json: what ran, with which versions, weights, data and timings (no secrets)."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from ..core.fsutil import atomic_write_json

PACKAGES = ("sana-appliance", "torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub",
            "bitsandbytes", "torch-optimi", "wandb", "pillow", "numpy")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_sha(build: dict) -> str | None:
    if build.get("git_sha"):
        return build["git_sha"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write(path: Path, *, resolved, model_info: dict, datasets: list[dict], timings: dict, extra: dict) -> None:
    from ..core.workspace import redact

    doc = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": resolved.redacted(),
        "provenance": resolved.provenance,
        "preset": resolved.preset,
        "seed": resolved.config.seed,
        "model": model_info,
        "datasets": datasets,
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "git_sha": git_sha(resolved.build),
        "image": resolved.build.get("image"),
        "image_digest": resolved.build.get("image_digest"),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **extra,
    }
    doc = redact(doc, resolved.credentials.values())
    atomic_write_json(path, doc, indent=2, default=str)


COMPLETE_MARKER = "TRAINING_COMPLETE.json"


def _completion_key(cfg) -> dict:
    import dataclasses

    from ..model.adapters import identity_settings
    from .checkpoints import config_hash

    return {"config_hash": config_hash({**dataclasses.asdict(cfg), **identity_settings(cfg)}),
            "max_train_steps": cfg.max_train_steps,
            "num_train_epochs": cfg.num_train_epochs}


def mark_complete(output_dir: Path, cfg, step: int, upload: dict | None = None) -> None:
    """Written after export, and again once the upload is done or has failed: a restarted container
    sees the job is done and, from `upload` (repo, endpoint, status, commit), whether final/ still
    has to be pushed. None: push_to_hub was off."""
    atomic_write_json(output_dir / COMPLETE_MARKER, {**_completion_key(cfg), "step": step, "upload": upload}, indent=2)


def completion_record(output_dir: Path, cfg) -> dict | None:
    """The marker's content if this exact job (same config and length) already finished, else None."""
    path = output_dir / COMPLETE_MARKER
    from .checkpoints import starts_fresh

    if starts_fresh(cfg.resume_from_checkpoint) or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("step"), int):
        return None
    key = _completion_key(cfg)
    return doc if all(doc.get(k) == v for k, v in key.items()) else None


def completed_step(output_dir: Path, cfg) -> int | None:
    """The final step if this exact job (same config and length) already finished, else None."""
    record = completion_record(output_dir, cfg)
    return record["step"] if record is not None else None
