"""Validation rules: single-key rules from the schema's metadata, and the cross-field rules.

Pure functions over converted values; :mod:`sana_appliance.config.resolve` runs both on every
resolution (cross-field rules even when single keys failed, so one report lists everything).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .. import tracking
from ..model import BUILTIN_MODELS
from .schema import field_map

if TYPE_CHECKING:
    from ..core.workspace import Credentials, HubSettings

ADAPTER_BASE_PRECISIONS = ("nf4-bnb", "int8-bnb")  # model/adapters.py quantizes the frozen base with bitsandbytes
QUANTIZED_PRECISIONS = {
    "nf4-bnb", "int8-bnb", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto",
    "int8-torchao", "fp8-torchao", "int4-torchao",
}
# Sana's DC-AE compresses 32x and the transformer's patch is 1: image sides are multiples of 32.
SIZE_MULTIPLE = 32
FSDP_OPTIMIZERS = ("adamw",)  # elementwise torch optimizers that step DTensor shards as they are


def check_rules(key: str, value: Any) -> str | None:
    """The rule a single value breaks (schema metadata: choices, minimum, maximum), or None."""
    meta = field_map()[key].metadata
    if value is None:
        return None
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of: {', '.join(meta['choices'])}"
    if "minimum" in meta and value < meta["minimum"]:
        return f"must be >= {meta['minimum']}"
    if "exclusive_minimum" in meta and value <= meta["exclusive_minimum"]:
        return f"must be > {meta['exclusive_minimum']}"
    if "maximum" in meta and value > meta["maximum"]:
        return f"must be <= {meta['maximum']}"
    return None


MAX_VALIDATION_SIDE = 4096
EXAMPLES = {"learning_rate": "1e-5", "ema_decay": "0.999", "flow_schedule_shift": "3.0", "hub_retry_window_s": "300"}


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """`1024x1024,1280x768` or `512` -> [(width, height), ...]."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not match:
            raise ValueError(part)
        width = int(match.group(1))
        height = int(match.group(2) or width)
        if width <= 0 or height <= 0:
            raise ValueError(part)
        sizes.append((width, height))
    if not sizes:
        raise ValueError(text)
    return sizes


def cross_field(cfg: dict[str, Any], where: dict[str, str], cred: Credentials, hub: HubSettings) -> list[str]:
    """Rules between keys (and the environment's credentials / offline mode), one line per problem."""
    problems = []

    def say(key: str, rule: str) -> None:
        problems.append(f"{key}={cfg[key]!r} (from {where[key]}): {rule}")

    precision = str(cfg["base_model_precision"]).lower()
    adapter = cfg["model_type"] == "lora"
    if precision in QUANTIZED_PRECISIONS and not adapter:
        say(
            "base_model_precision",
            "quantized weights cannot be trained in a full-rank fine-tune (model_type: full). "
            "Train an adapter on the quantized base with model_type: lora (PRESET=lowest-vram-lokr is the guide's "
            "nf4 + LoKr recipe), or use `no_change`; PRESET=lowest-vram trains full rank in the least memory "
            "(bf16 weights, 8-bit Lion, only the frozen text encoder quantized).",
        )
    elif precision in QUANTIZED_PRECISIONS and precision not in ADAPTER_BASE_PRECISIONS:
        say("base_model_precision", "quanto and torchao quantization are not supported here: use nf4-bnb or int8-bnb "
            "(bitsandbytes)")
    elif precision not in ("no_change", *ADAPTER_BASE_PRECISIONS):
        say("base_model_precision", "must be `no_change`, or with model_type: lora `nf4-bnb` or `int8-bnb`")
    if adapter:
        defaults = {f.name: f.default for f in field_map().values()}
        if cfg["lora_type"] == "standard" and cfg["lycoris_config"] is not None:
            say("lycoris_config", "is a LyCORIS option and lora_type is `standard` (PEFT LoRA): set lora_type: "
                "lycoris to train LoKr from this file, or remove lycoris_config")
        if cfg["lora_type"] == "lycoris":
            for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"):
                if cfg[key] != defaults[key]:
                    say(key, "is a standard-LoRA option and lora_type is `lycoris`: LyCORIS reads its rank, alpha and "
                        "targets from lycoris_config (linear_dim, linear_alpha, apply_preset); remove it, or set "
                        "lora_type: standard")
        if cfg["distributed_strategy"] == "fsdp":
            say("distributed_strategy", "adapters train with ddp (each GPU holds the frozen base, the adapter is small): "
                "set distributed_strategy: ddp, or model_type: full")
        if cfg["compile_transformer"]:
            say("compile_transformer", "compiling is not supported with an adapter (model_type: lora) yet: set "
                "compile_transformer: false")
    else:
        for key in ("lora_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lycoris_config",
                    "lora_export_merged"):
            if where[key] != "default" and cfg[key] != field_map()[key].default:
                say(key, "has no effect with model_type: full; set model_type: lora to train an adapter, or remove it")
    if cfg["distributed_strategy"] == "fsdp":  # distributed/fsdp.py: fp32 master weights, sharded
        if cfg["optimizer"] not in FSDP_OPTIMIZERS:
            say("optimizer", "distributed_strategy=fsdp trains with fp32 master weights sharded across the GPUs and "
                "torch AdamW stepping the shards: set optimizer: adamw (or distributed_strategy: ddp)")
        if cfg["mixed_precision"] == "fp16":
            say("mixed_precision", "distributed_strategy=fsdp does not support fp16 (its loss scaler's overflow check "
                "is not agreed across shards): use mixed_precision: bf16")
        if cfg["compile_transformer"]:
            say("compile_transformer", "compiling the blocks is not supported with distributed_strategy=fsdp yet: "
                "set compile_transformer: false (or distributed_strategy: ddp)")
    model = str(cfg["pretrained_model_name_or_path"])
    if model.startswith("builtin:") and model not in BUILTIN_MODELS:
        say("pretrained_model_name_or_path", f"no such built-in model; the built-in ones are {', '.join(BUILTIN_MODELS)}")
    if cfg["max_train_steps"] == 0 and cfg["num_train_epochs"] == 0:
        say("max_train_steps", "max_train_steps and num_train_epochs are both 0: set one, e.g. max_train_steps: 1000")
    try:
        sizes = parse_resolutions(cfg["validation_resolution"])
    except ValueError as exc:
        say("validation_resolution", f"cannot read {str(exc)!r}: use WxH pairs separated by commas, e.g. 1024x1024,1280x768")
    else:
        if any(side % SIZE_MULTIPLE for size in sizes for side in size):
            say("validation_resolution", f"sides must be multiples of {SIZE_MULTIPLE}, e.g. "
                f"{_nearest_resolution(cfg['validation_resolution'])}")
        if any(side > MAX_VALIDATION_SIDE for size in sizes for side in size):
            say("validation_resolution", f"sides must be at most {MAX_VALIDATION_SIDE} (Sana's largest models "
                "render 4096x4096), e.g. 1024x1024")
    pushes = [k for k in ("push_to_hub", "push_checkpoints_to_hub") if cfg[k]]
    if pushes:
        also = f" (and {pushes[1]})" if len(pushes) > 1 else ""
        if not cfg["hub_model_id"]:
            say(pushes[0], "needs hub_model_id, e.g. hub_model_id: your-name/sana-finetune")
        if hub.offline:
            say(pushes[0], f"cannot upload while HF_HUB_OFFLINE is set (no network is used); unset HF_HUB_OFFLINE, "
                f"or set {pushes[0]}: false{also} and upload output/final yourself later")
        elif not cred.hf_token:
            say(pushes[0], "needs a Hugging Face write token in the HF_TOKEN environment variable")
    if cfg["push_checkpoints_to_hub"] and not cfg["push_to_hub"]:
        say("push_checkpoints_to_hub", "needs push_to_hub: true (checkpoints go to the hub_model_id repo the final "
            "model goes to)")
    for name in tracking.selected(cfg["report_to"]):
        problem = tracking.TRACKERS[name].problem(cred, hub)
        if problem:
            say("report_to", problem)
    if cfg["gradient_checkpointing_interval"] > 1 and not cfg["gradient_checkpointing"]:
        say("gradient_checkpointing_interval", "has no effect unless gradient_checkpointing: true")
    resume = cfg["resume_from_checkpoint"]
    if not resume.strip():
        say("resume_from_checkpoint", "must be `latest`, `none` or a checkpoint folder")
    return problems


def _nearest_resolution(text: str) -> str:
    """Valid sizes nearest to `text`: `1000` -> `992 or 1024`, `1000x600,512` -> `992x608,512`."""

    def near(side: int) -> int:
        return max(SIZE_MULTIPLE, (side + SIZE_MULTIPLE // 2) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and "x" not in parts[0]:
        side = int(parts[0])
        low = max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)
        return f"{low} or {low + SIZE_MULTIPLE}" if side > low else str(low)
    fixed = []
    for part in parts:
        sides = [near(int(s)) for s in part.split("x")]
        fixed.append("x".join(str(s) for s in sides))
    return ",".join(fixed)
