"""Resumable checkpoints: the only module that writes checkpoint folders.

A checkpoint is `checkpoints/checkpoint-<step>/`. It is assembled in a hidden temp folder
beside it, every file fsynced, the marker `COMPLETE` written last, then the folder is
renamed into place and the parent fsynced. A folder without the marker is never a
checkpoint (a kill at any moment leaves either the previous state or a complete new one).
All paths stored inside are relative, so the volume can be mounted anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, DataError
from .fsutil import fsync_path, make_readable

log = logging.getLogger("sana_appliance.checkpoints")

MARKER = "COMPLETE"
NAME = re.compile(r"^checkpoint-(\d+)$")
# Keys whose change makes a checkpoint unusable (another model, another batch geometry).
INCOMPATIBLE_KEYS = ("pretrained_model_name_or_path", "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "optimizer")
# Keys that do not affect what a checkpoint holds.
NEUTRAL_KEYS = ("output_dir", "resume_from_checkpoint", "max_train_steps", "num_train_epochs", "validation_steps",
                "checkpointing_steps", "checkpoints_total_limit", "report_to", "push_to_hub", "push_checkpoints_to_hub",
                "hub_model_id", "hub_retry_window_s", "tracker_run_name", "tracker_project_name", "logging_steps", "dataloader_num_workers")


def config_hash(config: dict) -> str:
    relevant = {k: v for k, v in config.items() if k not in NEUTRAL_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(path)


def list_checkpoints(root: Path) -> tuple[list[CheckpointRef], list[Path]]:
    """(valid checkpoints oldest first, invalid folders that look like checkpoints)."""
    valid, invalid = [], []
    if not root.is_dir():
        return valid, invalid
    for entry in root.iterdir():
        match = NAME.match(entry.name)
        if not match or not entry.is_dir():
            continue
        if (entry / MARKER).is_file():
            valid.append(CheckpointRef(entry, int(match.group(1))))
        else:
            invalid.append(entry)
    valid.sort(key=lambda ref: ref.step)
    return valid, invalid


def find_resume(setting: str, root: Path) -> CheckpointRef | None:
    """Which checkpoint `resume_from_checkpoint` designates (None: start fresh)."""
    if setting.lower() in ("none", "false", ""):
        return None
    if setting.lower() == "latest":
        valid, invalid = list_checkpoints(root)
        for path in invalid:
            log.warning("skipping %s: no %s marker (an interrupted save); it is not a checkpoint", path, MARKER)
        return valid[-1] if valid else None
    path = Path(setting)
    if not path.is_absolute():
        path = root / path
    match = NAME.match(path.name)
    if not path.is_dir() or not match:
        raise ConfigError(f"resume_from_checkpoint={setting!r}: {path} is not a checkpoint-<step> folder; use `latest` or `none`")
    if not (path / MARKER).is_file():
        raise ConfigError(f"resume_from_checkpoint={setting!r}: {path} has no {MARKER} marker (an interrupted save); use `latest`")
    return CheckpointRef(path, int(match.group(1)))


def save(
    root: Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write checkpoint-<step> atomically. `tensors`: name -> state dict saved as safetensors;
    `objects`: name -> picklable state (optimizer, RNG...); `state`: JSON trainer state."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=root))
    try:
        for name, tensor_dict in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, tmp / f"{name}.safetensors")
        for name, obj in objects.items():
            torch.save(obj, tmp / f"{name}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        make_readable(tmp)
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step}))
        fsync_path(tmp / MARKER)
        fsync_path(tmp)
        stale = None
        if final.exists():  # a folder of the same step: move it aside in one atomic rename, never delete in place
            stale = root / f".checkpoint-{step}.stale-{os.getpid()}.tmp"
            os.replace(final, stale)
        os.replace(tmp, final)
        fsync_path(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except Exception as exc:  # OSError, or safetensors' own error wrapping ENOSPC
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"saving checkpoint-{step} in {root} failed ({exc}); earlier checkpoints are intact. "
            "Free disk space or lower checkpoints_total_limit, then restart to resume."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load(ref: CheckpointRef) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    tensors = {p.stem: load_file(p) for p in ref.path.glob("*.safetensors")}
    objects = {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in ref.path.glob("*.pt")}
    state = json.loads((ref.path / "trainer_state.json").read_text())
    return tensors, objects, state


def prune(root: Path, limit: int | None) -> list[Path]:
    """Delete the oldest valid checkpoints beyond `limit` (never the newest) and leftover temp folders."""
    removed = []
    for leftover in root.glob(".checkpoint-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not limit:
        return removed
    valid, _ = list_checkpoints(root)
    for ref in valid[: max(0, len(valid) - limit)]:
        # Remove the marker first: a kill mid-delete leaves an invalid folder, never a broken "valid" one.
        (ref.path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(ref.path, ignore_errors=True)
        removed.append(ref.path)
    return removed


def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(errors for changes that cannot be honoured, notes for changes where the current value wins)."""
    errors, notes = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key in INCOMPATIBLE_KEYS:
            errors.append(f"{key}: checkpoint has {old!r}, config now says {new!r}")
        elif key not in ("output_dir", "resume_from_checkpoint"):
            notes.append(f"{key}: checkpoint {old!r} -> now {new!r} (the current value wins)")
    return errors, notes


def estimate_bytes(num_params: int, weight_bytes: int, optimizer_bytes_per_param: float, ema: bool) -> int:
    total = num_params * (weight_bytes + optimizer_bytes_per_param + (4 if ema else 0))
    return int(total * 1.02) + (1 << 20)


def check_disk(root: Path, checkpoint_bytes: int) -> None:
    """Refuse to start when free space cannot hold two checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < 2 * checkpoint_bytes:
        raise DataError(
            f"not enough disk space in {root}: {free / 2**30:.2f} GiB free, but one checkpoint needs about "
            f"{checkpoint_bytes / 2**30:.2f} GiB and the run needs room for two "
            f"({2 * checkpoint_bytes / 2**30:.2f} GiB). Free space or mount a larger volume."
        )
