"""FSDP2 (`distributed_strategy: fsdp`): the transformer, its optimizer state and its EMA sharded across ranks.

Each of diffusers' `_no_split_modules` of the transformer (every SanaTransformerBlock, the patch
embedding, the output norm) is one `fully_shard` unit, and the root module holds the rest. Between
steps a rank holds 1/N of every weight, gradient, AdamW moment and EMA shadow; a block's full weights
exist only while it runs (all-gathered before, freed after).

Precision under FSDP: the trainable weights are fp32 master weights, sharded. With
`mixed_precision: bf16` FSDP casts each block's gathered weights to bf16 for the forward and
backward and reduces gradients in fp32 (the standard FSDP recipe: with 1/N of the master weights
per GPU there is no need for the pure-bf16 storage the single-GPU presets use). fp16 is refused:
its loss scaler would need its overflow check agreed across shards.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its own shards into
`checkpoint-<step>/sharded/` (with node-local disks, the machines then exchange shard files so
each disk holds them all), and a resume loads them onto any number of ranks (DCP reshards).

Rank 0 validates, measures the eval loss and exports on a plain copy of the transformer kept in
host memory, filled from a full state dict gathered from the shards when it is needed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHARDED = "sharded"  # the DCP folder inside a checkpoint
def ensure_group() -> None:
    """FSDP needs a process group; a single process gets a group of one (so an FSDP checkpoint resumes on one
    GPU with the same strategy and format)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def mixed_precision_policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        # The inputs keep their dtype: the timestep (sigma x 1000) in bf16 would round to steps of 4 above 512,
        # conditioning on another time than the target's; the run's autocast casts what the matmuls read.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def shard(transformer: torch.nn.Module, device: torch.device, mixed_precision: str) -> tuple[torch.nn.Module, int]:
    """fully_shard each of the model's `_no_split_modules`, then the root (in place). Returns (model, units)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that the patch embedding and the root return views (an in-place op on one would skip its
    # all-gather). Sana's forward never writes into them: measured, the patch embedding's weights train as without
    # FSDP (max |diff| 9e-8 after 20 demo steps on one process), so the warning is noise for a user.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(mixed_precision)
    names = set(getattr(transformer, "_no_split_modules", None) or ())
    units = [m for m in transformer.modules() if type(m).__name__ in names and m is not transformer]
    for module in units:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    return transformer, len(units) + 1


def plain_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) copy on the CPU, for rank 0's validation, eval and export. Made before sharding."""
    return copy.deepcopy(transformer).to("cpu").requires_grad_(False)


def full_state(model: torch.nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on rank 0's CPU (None elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if main else None


def full_ema(ema, main: bool) -> dict[str, torch.Tensor] | None:
    """The EMA's full fp32 shadows on rank 0's CPU (None elsewhere), gathered one tensor at a time. A collective."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, shadow in ema.shadow.items():
        full = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
        if main:
            out[name] = full.to("cpu", copy=True)
        del full
    return out if main else None


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total gradient norm over every shard (a plain tensor), and the gradients clipped to max_norm."""
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _states(model, optimizer, ema, with_optimizer: bool, with_ema: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if with_optimizer:  # (torch fills an empty optimizer state with a zero step: only when there is one to load)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if with_ema:
        state["ema"] = dict(ema.shadow)
    return state


def save(folder: Path, model, optimizer, ema) -> list[str]:
    """Every rank writes its shards of the weights, optimizer state and EMA into `folder` (a collective).
    Returns the names saved (recorded in the checkpoint's trainer state)."""
    import torch.distributed.checkpoint as dcp

    # An optimizer without state (every update so far skipped as non-finite) saves none, as it has none.
    state = _states(model, optimizer, ema, bool(optimizer.state), ema is not None)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True, thread_count=1))
    return sorted(state)


def load(folder: Path, saved: list[str], model, optimizer, ema) -> bool:
    """Load a sharded checkpoint onto this job's ranks, whatever their number (a collective). Returns False when
    the checkpoint has no EMA (the caller then starts one from the loaded weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    with_ema = ema is not None and "ema" in saved
    state = _states(model, optimizer, ema, "optimizer" in saved, with_ema)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
    set_model_state_dict(model, state["model"])
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if with_ema:  # DCP loaded the shadows in place
        for name, value in state["ema"].items():
            if value is not ema.shadow[name]:
                ema.shadow[name].copy_(value)
    return with_ema or ema is None


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """The module on `device` for the block, back on the CPU after (the GPU memory is the shards')."""
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


def cast_(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters and buffers to `dtype`, in place (the export's dtype)."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    return module


def failures(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions a torch.distributed.checkpoint CheckpointException carries (else [exc])."""
    found = getattr(exc, "failures", None)
    if isinstance(found, dict) and found:
        return [f[0] if isinstance(f, tuple) else f for f in found.values()]
    return [exc]


def describe(exc: BaseException) -> str:
    """One line for a user: the first failing rank's error (DCP's own text embeds tracebacks)."""
    found = getattr(exc, "failures", None)
    if isinstance(found, dict) and found:
        rank = min(found)
        first = found[rank][0] if isinstance(found[rank], tuple) else found[rank]
        text = str(first).strip().splitlines()[0][:300] if str(first).strip() else ""
        return f"rank {rank}: {type(first).__name__}: {text}"
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def disk_failure(exc: BaseException) -> str | None:
    """When every failure is a file-system error (a full or read-only disk): what and where, else None."""
    errors = failures(exc)
    if not all(isinstance(e, OSError) for e in errors):
        return None
    first = errors[0]
    return f"{first.filename + ': ' if first.filename else ''}{first.strerror or first}"
