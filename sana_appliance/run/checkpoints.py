"""Resumable checkpoints: the only module that writes checkpoint folders.

A checkpoint is `checkpoints/checkpoint-<step>/`. It is assembled in a hidden temp folder
beside it, every file fsynced, the marker `COMPLETE` written last, then the folder is
renamed into place and the parent fsynced. A folder without the marker is never a
checkpoint (a kill at any moment leaves either the previous state or a complete new one).
All paths stored inside are relative, so the volume can be mounted anywhere.

The marker also records every file's size and xxh3-128 digest: a checkpoint damaged after
it was written (a truncated copy, a bad disk, a file deleted by hand) is found before use,
moved aside as `checkpoint-<step>.damaged` (never deleted: it may be all there is), and the
next older valid checkpoint is used instead, so a restart never loops on the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import ApplianceError, ConfigError, DataError
from ..core.fsutil import atomic_folder, fsync_path, fsync_tree, safetensors_problem

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MARKER_FORMAT = 2  # 1: {"step"} only; 2: + "files": {name: {"bytes", "xxh3_128"}}
NAME = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_SUFFIX = ".damaged"
STATE_FILE = "trainer_state.json"
SHARDED = "sharded"  # torch.distributed.checkpoint shards (distributed_strategy: fsdp)
# Keys whose change makes a checkpoint unusable (another model, another batch geometry).
INCOMPATIBLE_KEYS = ("pretrained_model_name_or_path", "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "optimizer",
                     "distributed_strategy", "model_type", "lora_type", "lora_rank", "lora_alpha", "lora_target_modules")
# What a key missing from an older checkpoint's config meant (it was written before the key existed).
OLD_DEFAULTS = {"distributed_strategy": "ddp", "lora_type": "standard", "lora_rank": 16, "lora_alpha": None,
                "lora_dropout": 0.0, "lora_target_modules": "to_q,to_k,to_v,to_out.0", "lycoris_config": None,
                "lora_export_merged": False}
# Keys baked into loaded state (optimizer param groups, LR schedule, random streams) that
# the run re-applies from the current config after loading, and how each then applies.
REAPPLIED_KEYS = {
    "learning_rate": "applied to the optimizer and LR schedule from this step on",
    "lr_scheduler": "the schedule is rebuilt from the config at the resumed step",
    "lr_warmup_steps": "the schedule is rebuilt from the config at the resumed step",
    "max_train_steps": "the schedule is rebuilt for the new length",
    "num_train_epochs": "the schedule is rebuilt for the new length",
    "adam_beta1": "applied to the optimizer from this step on",
    "adam_beta2": "applied to the optimizer from this step on",
    "adam_weight_decay": "applied to the optimizer from this step on",
    "adam_epsilon": "applied to the optimizer from this step on",
    "seed": "noise and data order are drawn from the new seed from this step on",
    "use_ema": "an EMA started now begins at the resumed weights",
}
# Keys that do not affect what a checkpoint holds.
NEUTRAL_KEYS = ("output_dir", "resume_from_checkpoint", "max_train_steps", "num_train_epochs", "validation_steps",
                "checkpointing_steps", "checkpoints_total_limit", "report_to", "push_to_hub", "push_checkpoints_to_hub",
                "hub_model_id", "hub_retry_window_s", "hub_private", "hub_keep_checkpoints", "hub_sync_interval_s",
                "hub_upload_wait_s", "hub_stop_upload_s", "tracker_run_name", "tracker_project_name", "logging_steps", "dataloader_num_workers",
                "num_processes", "max_restarts", "rendezvous_timeout_s", "lora_export_merged")


def config_hash(config: dict) -> str:
    # A key added later counts only when set away from what its absence meant: runs of older versions keep their
    # hash (their Hub checkpoints and completion marker stay theirs).
    relevant = {k: v for k, v in config.items()
                if k not in NEUTRAL_KEYS and not (k in OLD_DEFAULTS and v == OLD_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(config: dict, workspace_root: Path) -> str:
    """The run's identity on the Hub: `config_hash` with paths under the workspace written relative to it, so the
    same run on a machine that mounts its workspace elsewhere is still the same run."""
    root = str(workspace_root).rstrip("/") + "/"
    relative = {k: f"$WORKSPACE/{v[len(root):]}" if isinstance(v, str) and v.startswith(root) else v
                for k, v in config.items()}
    return config_hash(relative)


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int


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


class CheckpointDamaged(ApplianceError):
    """A checkpoint with its marker whose contents are not what was written."""

    def __init__(self, ref: CheckpointRef, problems: list[str]):
        self.ref, self.problems = ref, problems
        super().__init__(f"{ref.path.name} is damaged: {'; '.join(problems)}")


def _digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under the folder (a sharded checkpoint's shards too), by path relative to it."""
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "xxh3_128": _digest(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder).as_posix() != MARKER}


def _structural_problems(path: Path) -> list[str]:
    """Cheap checks for a marker without a manifest (format 1): the file must at least parse."""
    import zipfile

    try:
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            return [problem] if problem else []
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return [f"{path.name}: corrupt member {bad}"]
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        return [f"{path.name}: unreadable ({exc.__class__.__name__}: {exc})"]
    return []


def verify(ref: CheckpointRef) -> list[str]:
    """What is wrong with a marked checkpoint (empty: it is intact). Reads every file once."""
    try:
        marker = json.loads((ref.path / MARKER).read_text() or "{}")
    except (OSError, ValueError) as exc:
        return [f"{MARKER}: unreadable ({exc})"]
    files = marker.get("files") if isinstance(marker, dict) else None
    problems = []
    if files is None:  # written before manifests existed
        if not (ref.path / STATE_FILE).is_file():
            problems.append(f"{STATE_FILE}: missing")
        for f in sorted(ref.path.iterdir()):
            if f.is_file() and f.name != MARKER:
                problems += _structural_problems(f)
        return problems
    if not isinstance(files, dict):
        return [f"{MARKER}: its file list is not readable"]
    for name, expected in sorted(files.items()):
        f = ref.path / name
        try:
            if not f.is_file():
                problems.append(f"{name}: missing")
            elif f.stat().st_size != expected["bytes"]:
                problems.append(f"{name}: {f.stat().st_size} bytes, {expected['bytes']} were written (truncated?)")
            elif _digest(f) != expected["xxh3_128"]:
                problems.append(f"{name}: contents changed since it was written (checksum mismatch)")
        except (OSError, KeyError, TypeError) as exc:  # a bad disk, a file we may not read, a mangled marker
            problems.append(f"{name}: unreadable ({exc.__class__.__name__}: {exc})")
    return problems


def quarantine(ref: CheckpointRef, problems: list[str]) -> Path:
    """Move a damaged checkpoint aside (kept for inspection, never used again) and say so."""
    target = ref.path.with_name(ref.path.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        target = ref.path.with_name(f"{ref.path.name}{DAMAGED_SUFFIX}-{n}")
        n += 1
    try:
        os.replace(ref.path, target)
        fsync_path(ref.path.parent)
    except OSError as exc:  # a read-only volume: the folder stays, and the next start checks it again
        log.warning("%s is damaged (%s) and could not be moved aside (%s); skipping it", ref.path.name,
                    "; ".join(problems), exc.strerror)
        return ref.path
    try:
        (target / "DAMAGED.json").write_text(json.dumps({"problems": problems}, indent=2))
    except OSError:
        pass  # the record is a courtesy; the log line below is the report
    log.warning("%s is damaged (%s): moved aside to %s, not deleted; inspect or delete it to free the space",
                ref.path.name, "; ".join(problems), target.name)
    return target


def starts_fresh(setting: str) -> bool:
    """True when `resume_from_checkpoint` asks for no resume at all."""
    return setting.strip().lower() in ("none", "false", "")


def find_resume(setting: str, root: Path) -> CheckpointRef | None:
    """Which checkpoint `resume_from_checkpoint` designates (None: start fresh).

    `latest` verifies the newest marked checkpoint and falls back, oldest last, past any
    damaged one (each moved aside). An explicit path that is damaged is a config error."""
    if starts_fresh(setting):
        return None
    if setting.lower() == "latest":
        valid, invalid = list_checkpoints(root)
        for path in invalid:
            log.warning("skipping %s: no %s marker (an interrupted save); it is not a checkpoint", path, MARKER)
        for ref in reversed(valid):
            problems = verify(ref)
            if not problems:
                return ref
            quarantine(ref, problems)
        if valid:
            log.warning("no intact checkpoint is left in %s: training starts from step 0", root)
        return None
    path = Path(setting)
    if not path.is_absolute():
        path = root / path
    match = NAME.match(path.name)
    if not path.is_dir() or not match:
        raise ConfigError(f"resume_from_checkpoint={setting!r}: {path} is not a checkpoint-<step> folder; use `latest` or `none`")
    if not (path / MARKER).is_file():
        raise ConfigError(f"resume_from_checkpoint={setting!r}: {path} has no {MARKER} marker (an interrupted save); use `latest`")
    ref = CheckpointRef(path, int(match.group(1)))
    problems = verify(ref)
    if problems:
        raise ConfigError(f"resume_from_checkpoint={setting!r}: {path} is damaged ({'; '.join(problems)}); "
                          "use `latest` (falls back to the newest intact checkpoint) or another checkpoint")
    return ref


def save(
    root: Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    state: dict[str, Any],
    sharded: Path | None = None,
) -> Path:
    """Write checkpoint-<step> atomically. `tensors`: name -> state dict saved as safetensors;
    `objects`: name -> picklable state (optimizer, RNG...); `state`: JSON trainer state; `sharded`: a folder
    of torch.distributed.checkpoint shards already written (beside the checkpoints), moved in as `sharded/`."""
    final = root / f"checkpoint-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        # A folder of the same step already there is moved aside in one rename, never deleted in place.
        with atomic_folder(final, existing="replace") as tmp:
            for name, tensor_dict in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, tmp / f"{name}.safetensors")
            for name, obj in objects.items():
                torch.save(obj, tmp / f"{name}.pt")
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
            if sharded is not None:
                os.replace(sharded, tmp / SHARDED)
            fsync_tree(tmp)  # the files are durable before the marker that vouches for them
            # Digests are read back from the written files: the marker vouches for what is on disk.
            (tmp / MARKER).write_text(json.dumps({"step": step, "format": MARKER_FORMAT, "files": _manifest(tmp)}, indent=1))
    except Exception as exc:  # OSError, or safetensors' own error wrapping ENOSPC
        raise DataError(
            f"saving checkpoint-{step} in {root} failed ({exc}); earlier checkpoints are intact. "
            "Free disk space or lower checkpoints_total_limit, then restart to resume."
        ) from exc
    return final


def load(ref: CheckpointRef) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(tensors, objects, trainer state); a file that will not load raises CheckpointDamaged."""
    try:
        tensors = {p.stem: load_file(p) for p in ref.path.glob("*.safetensors")}
        objects = {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in ref.path.glob("*.pt")}
        state = json.loads((ref.path / STATE_FILE).read_text())
    except Exception as exc:  # safetensors, zip, pickle and JSON each raise their own kind
        raise CheckpointDamaged(ref, [f"does not load ({exc.__class__.__name__}: {exc})"]) from None
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
    """(errors for changes that cannot be honoured, notes saying how each other change is applied).

    The current config always decides: keys in REAPPLIED_KEYS are re-applied by the run
    over the loaded optimizer and schedule state, every other key is read from the config
    where it is used; only INCOMPATIBLE_KEYS cannot change under a checkpoint."""
    errors, notes = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, OLD_DEFAULTS.get(key)), current.get(key)
        if old == new or key in ("output_dir", "resume_from_checkpoint"):
            continue
        if key in INCOMPATIBLE_KEYS:
            errors.append(f"{key}: checkpoint has {old!r}, config now says {new!r}; set {key} back to {old!r}")
        else:
            how = REAPPLIED_KEYS.get(key, "used from here on")
            notes.append(f"{key}: checkpoint {old!r} -> now {new!r} ({how})")
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


def host_copy(obj: Any) -> Any:
    """A copy of a (nested) state on the host that training can no longer change: every tensor copied to the
    CPU (a clone when already there; from a GPU one blocking copy per tensor into pageable memory, which pins
    nothing for the rest of the run), dicts, lists and tuples rebuilt, other values shared (they are immutable:
    numbers, strings, None)."""
    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            return value.clone() if value.device.type == "cpu" else value.to("cpu", copy=True)
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, list):
            return [copy(item) for item in value]
        if isinstance(value, tuple):
            return tuple(copy(item) for item in value)
        return value

    return copy(obj)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state: what host_copy allocates."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def host_memory_available() -> int | None:
    """Host memory this process may still take, in bytes (None where it cannot be read): MemAvailable from
    /proc/meminfo, capped by this process's memory cgroup (a container's limit): its limit less its working set,
    i.e. its usage without the inactive file cache, which the kernel reclaims before it would kill (as docker and
    kubernetes count it)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    free = _cgroup_free()
    if free is not None:
        available = free if available is None else min(available, free)
    return available


def _cgroup_free() -> int | None:
    """This process's cgroup (v2 or v1 memory controller): limit - (usage - inactive file cache), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2
            folder, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            folder, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                            "total_inactive_file")
        else:
            continue
        # The process's own cgroup where it is visible, else the namespace's root (a container's own).
        for base in (folder / path.lstrip("/"), folder):
            try:
                limit = (base / files[0]).read_text().strip()
                usage = int((base / files[1]).read_text())
                stat = dict(x.split() for x in (base / "memory.stat").read_text().splitlines() if len(x.split()) == 2)
            except (OSError, ValueError):
                continue
            if not limit.isdigit() or int(limit) >= 1 << 60:  # "max" / v1's unlimited
                return None
            return max(0, int(limit) - (usage - int(stat.get(files[2], 0))))
    return None


class BackgroundSave:
    """One checkpoint being written by a thread while training goes on.

    The caller has already copied the state to the host (:func:`host_copy`): training may change the live
    tensors at once. The thread runs :func:`save` and :func:`prune`; :meth:`result` waits for it and returns
    the folder or raises save's DataError. A kill at any moment leaves at most a temp folder (save is atomic),
    which the next prune removes."""

    def __init__(self, root: Path, step: int, limit: int | None, *, tensors: dict, objects: dict, state: dict):
        self.step, self.started = step, time.monotonic()
        self.finished: float | None = None
        self.reported = False  # the caller has logged and queued it
        self._path: Path | None = None
        self.error: BaseException | None = None

        def write() -> None:
            try:
                self._path = save(root, step, tensors=tensors, objects=objects, state=state)
                prune(root, limit)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop's thread by result()
                self.error = exc
            finally:
                self.finished = time.monotonic()

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}-writer", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Path:
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self._path is not None
        return self._path
