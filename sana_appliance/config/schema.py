"""The typed configuration schema: every key, its type, default and meaning.

Key names follow SimpleTuner's flat names wherever the concept is the same, so a
SimpleTuner ``config.json`` loads as is. Each field's docstring lives in its
metadata (``doc``) and is what ``sana-appliance config`` and the README show.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from .. import tracking
from ..model import BUILTIN_MODEL, BUILTIN_RANDOM
from ..model.optimizers import ALIASES, LR_SCHEDULERS, OPTIMIZERS

REAL_MODEL = "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers"
BUILTIN_DATASET = "builtin:demo-shapes"

# SimpleTuner spellings that mean one of ours (from the optimizers table), and known names we refuse.
OPTIMIZER_ALIASES = {
    **ALIASES,
    "adamw_schedulefree": None,  # known but unsupported: handled in validation
}


def _opt(default: Any, doc: str, **rules: Any) -> Any:
    """A schema field: default, documentation and validation rules in metadata."""
    return field(default=default, metadata={"doc": doc, **rules})


@dataclass(frozen=True)
class TrainConfig:
    # --- model -------------------------------------------------------------
    model_type: str = _opt(
        "full",
        "Training type: `full` (full-rank fine-tune of the whole transformer) or `lora` (an adapter on the frozen, "
        "optionally quantized transformer: lora_type chooses PEFT LoRA or LyCORIS/LoKr).",
        choices=("full", "lora"),
    )
    lora_type: str = _opt(
        "standard",
        "With model_type lora: `standard` (PEFT LoRA: lora_rank, lora_alpha, lora_dropout, lora_target_modules) or "
        "`lycoris` (LyCORIS, read from lycoris_config: LoKr by default).",
        choices=("standard", "lycoris"),
    )
    lora_rank: int = _opt(16, "Standard LoRA: rank of each adapter.", minimum=1)
    lora_alpha: float | None = _opt(
        None, "Standard LoRA: alpha (the update is scaled by alpha/rank). Empty: equal to lora_rank.", exclusive_minimum=0.0
    )
    lora_dropout: float = _opt(0.0, "Standard LoRA: dropout on the adapter's input.", minimum=0.0, maximum=0.9)
    lora_target_modules: str = _opt(
        "to_q,to_k,to_v,to_out.0",
        "Standard LoRA: comma-separated module names the adapters wrap (PEFT names, matched at the end of the module "
        "path), by default the attention projections of every block.",
    )
    lycoris_config: str | None = _opt(
        None,
        "LyCORIS: SimpleTuner's lycoris_config.json (algo, multiplier, linear_dim, linear_alpha, factor, apply_preset). "
        "Empty: the built-in LoKr config (factor 16 on every Attention module). Bypass mode is on unless the file "
        "sets bypass_mode: false (refused over a quantized base); multiplier must be 1.0 (exports load at 1.0).",
    )
    lora_export_merged: bool = _opt(
        False,
        "With model_type lora: also export final/merged/, a full pipeline with the adapter merged onto the "
        "unquantized base weights.",
    )
    model_family: str = _opt("sana", "Model family. Only `sana`.", choices=("sana",))
    pretrained_model_name_or_path: str = _opt(
        REAL_MODEL,
        "Base model: a Hub repo id (diffusers layout), a local folder, or "
        f"`{BUILTIN_MODEL}` (the demo's tiny model, built in code), or `{BUILTIN_RANDOM}` (Sana 1.6B at real size "
        "with random weights, built on the run's device: for benchmarks, it draws noise).",
    )
    revision: str = _opt(
        "main",
        "Hub revision (branch, tag or commit) of the base model; resolved to a commit sha "
        "and recorded in run.json.",
    )
    base_model_precision: str = _opt(
        "no_change",
        "Precision of the transformer's base weights: `no_change` (the checkpoint's dtype under mixed precision), or, "
        "with model_type lora only (a frozen base), `nf4-bnb` (4-bit) or `int8-bnb` (8-bit), bitsandbytes quantizing "
        "every linear layer of the blocks. A quantized base cannot be trained in full rank.",
    )
    text_encoder_1_precision: str = _opt(
        "no_change",
        "Precision of the frozen Gemma-2 text encoder while captions are cached: "
        "`no_change` or `nf4-bnb` (4-bit, saves ~4 GB during caching).",
        choices=("no_change", "nf4-bnb"),
    )
    quantize_via: str = _opt(
        "accelerator",
        "Where frozen parts (the text encoder, an nf4 base) are quantized: `accelerator` or `cpu` (slower, "
        "avoids OOM at start on <=16 GB cards). An int8 base is quantized layer by layer on the accelerator either way.",
        choices=("accelerator", "cpu"),
    )
    sana_complex_human_instruction: str = _opt(
        "default",
        "Instruction prepended to every caption before the Gemma-2 encoder, exactly as "
        "SanaPipeline does at inference. `default` uses diffusers' instruction, `disabled` "
        "uses none, any other text is used as the instruction (lines separated by newlines).",
    )
    tokenizer_max_length: int = _opt(
        300, "Caption length in tokens (Sana uses 300).", minimum=1
    )

    # --- paths ---------------------------------------------------------------
    output_dir: str = _opt(
        "output",
        "Where checkpoints, validation images, metrics and the final model go. Relative paths "
        "resolve against WORKSPACE. Env alias: OUTPUT_DIR.",
    )
    data_backend_config: str | None = _opt(
        None,
        "Dataloader config (SimpleTuner multidatabackend.json). Default: "
        f"$WORKSPACE/config/multidatabackend.json when present. `{BUILTIN_DATASET}` is the "
        "demo's generated dataset. Env alias: DATALOADER_CONFIG.",
    )
    user_prompt_library: str | None = _opt(
        None,
        "JSON file of extra validation prompts: {\"nickname\": \"prompt\", ...}. Read before training "
        "starts; nicknames that would share a file name get _2, _3... (reported).",
    )

    # --- schedule ------------------------------------------------------------
    seed: int = _opt(42, "Seed for weights init of new parts, data order and noise.")
    train_batch_size: int = _opt(1, "Samples per device per micro-batch.", minimum=1)
    gradient_accumulation_steps: int = _opt(
        1, "Micro-batches accumulated per optimizer step.", minimum=1
    )
    max_train_steps: int = _opt(
        10000, "Optimizer steps to train for. 0 means use num_train_epochs.", minimum=0
    )
    num_train_epochs: int = _opt(
        0, "Epochs to train for when max_train_steps is 0.", minimum=0
    )
    learning_rate: float = _opt(
        1e-5, "Peak learning rate (full-rank Sana: around 1e-5).", exclusive_minimum=0.0
    )
    lr_scheduler: str = _opt("constant", "LR schedule after warmup.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "Linear warmup steps.", minimum=0)
    optimizer: str = _opt(
        "optimi-adamw",
        "Optimizer: " + "; ".join(f"{spec.name} ({spec.doc})" for spec in OPTIMIZERS.values()) + ".",
        choices=tuple(OPTIMIZERS),
    )
    adam_beta1: float = _opt(0.9, "First moment decay (AdamW and Lion).", minimum=0.0, maximum=1.0)
    adam_beta2: float = _opt(0.999, "Second moment decay (AdamW; Lion's beta2).", minimum=0.0, maximum=1.0)
    adam_weight_decay: float = _opt(0.0, "Decoupled weight decay.", minimum=0.0)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", exclusive_minimum=0.0)
    max_grad_norm: float = _opt(
        0.1, "Clip gradients to this total norm (NVlabs Sana uses 0.1). 0 disables clipping.",
        minimum=0.0,
    )
    caption_dropout_probability: float = _opt(
        0.1, "Share of samples trained with the empty caption (for guidance).",
        minimum=0.0, maximum=1.0,
    )
    flow_schedule_shift: float = _opt(
        3.0,
        "Timestep shift s: sigma' = s*sigma / (1 + (s-1)*sigma), applied to logit-normal "
        "sigmas. Sana's own value is 3.0.",
        exclusive_minimum=0.0,
    )
    flow_schedule_auto_shift: bool = _opt(
        False,
        "Resolution-dependent shift instead of flow_schedule_shift: s = "
        "(pixels / 1024^2)^0.5 * 3.0, so 1024px keeps 3.0, 512px uses 1.5.",
    )
    max_nonfinite_steps: int = _opt(
        10,
        "Stop (exit 5) after this many consecutive steps with non-finite loss or gradients; "
        "each such step is skipped.",
        minimum=1,
    )

    # --- precision and memory -------------------------------------------------
    mixed_precision: str = _opt(
        "bf16", "Compute precision: bf16 (recommended), fp16 (not recommended for Sana), no.",
        choices=("bf16", "fp16", "no"),
    )
    gradient_checkpointing: bool = _opt(False, "Recompute block activations in backward.")
    gradient_checkpointing_interval: int = _opt(
        1, "Checkpoint every n-th transformer block (needs gradient_checkpointing).", minimum=1
    )
    compile_transformer: bool = _opt(
        False,
        "torch.compile each transformer block (inductor) for training; validation stays eager. The first step "
        "at each new bucket shape compiles (tens of seconds); needs a C/C++ compiler and the Python headers "
        "(the image has them); the kernels are kept in $WORKSPACE/cache/torch-compile for the next start. Not "
        "with distributed_strategy fsdp.",
    )
    allow_tf32: bool = _opt(True, "Allow TF32 matmuls on Ampere and newer.")
    vae_cache_disable: bool = _opt(
        False, "Encode images with the VAE at every step instead of caching latents on disk."
    )
    vae_batch_size: int = _opt(4, "Images per VAE encode batch while caching.", minimum=1)
    dataloader_num_workers: int = _opt(
        2, "Worker processes that load cached latents.", minimum=0
    )

    num_processes: int = _opt(
        1,
        "Training processes on this machine (data parallel): 1, N, or 0 for one per visible GPU. "
        "The appliance launches them itself (torch's elastic agent); with several machines, set NUM_NODES, "
        "NODE_RANK and MASTER_ADDR on each (README: More than one machine).",
        minimum=0,
    )
    distributed_strategy: str = _opt(
        "ddp",
        "With several processes: `ddp` (every GPU holds the whole model, optimizer state and EMA) or `fsdp` "
        "(FSDP2: weights, gradients, AdamW state and EMA sharded across the GPUs, fp32 master weights, bf16 "
        "compute; needs optimizer: adamw). A checkpoint resumes only with the strategy that wrote it.",
        choices=("ddp", "fsdp"),
    )
    max_restarts: int = _opt(
        3,
        "With the appliance's launcher: how many times a process that crashes or is killed makes the whole "
        "group restart from the last checkpoint (a stop or an error with an exit code 2-6 is not restarted).",
        minimum=0,
    )
    rendezvous_timeout_s: float = _opt(
        600.0,
        "How long the processes and machines of a job wait for each other to start before giving up (exit 7). "
        "Also bounds how long a worker started with RANK/WORLD_SIZE waits for its rendezvous.",
        minimum=1,
    )

    # --- EMA -------------------------------------------------------------------
    use_ema: bool = _opt(False, "Keep an exponential moving average of the weights (fp32).")
    ema_decay: float = _opt(0.999, "EMA decay per optimizer step.", exclusive_minimum=0.0, maximum=1.0)

    # --- checkpoints --------------------------------------------------------------
    checkpointing_steps: int = _opt(500, "Save a resumable checkpoint every N steps.", minimum=1)
    checkpoints_total_limit: int | None = _opt(
        3, "Keep at most this many checkpoints (oldest pruned). Empty keeps all.", minimum=1
    )
    resume_from_checkpoint: str = _opt(
        "latest",
        "`latest` (newest valid checkpoint, if any), `none` (start fresh), or a checkpoint path.",
    )

    # --- validation -------------------------------------------------------------
    validation_steps: int = _opt(
        500, "Generate validation images every N steps (and at the end). 0 disables.", minimum=0
    )
    validation_prompt: str | None = _opt(
        "A photo-realistic image of a cat", "Primary validation prompt."
    )
    validation_negative_prompt: str = _opt("", "Negative prompt used with guidance.")
    validation_resolution: str = _opt(
        "1024x1024",
        "Comma-separated WxH (or a single N for NxN), e.g. `1024x1024,1280x768`; sides are multiples of 32.",
    )
    validation_guidance: float = _opt(4.5, "Classifier-free guidance scale.", minimum=0.0)
    validation_num_inference_steps: int = _opt(20, "Sampler steps per image.", minimum=1)
    validation_seed: int = _opt(42, "Seed of the validation noise (fixed across steps).")

    # --- tracking and upload --------------------------------------------------------
    report_to: str = _opt(
        "none", "Trackers besides metrics.jsonl: none, "
        + ", ".join(f"{spec.name} ({spec.doc})" for spec in tracking.TRACKERS.values()) + ", or all.",
        choices=("none", *tracking.TRACKERS, "all"),
    )
    tracker_project_name: str = _opt("sana-appliance", "wandb project name.")
    tracker_run_name: str | None = _opt(None, "Tracker run name (default: derived).")
    logging_steps: int = _opt(1, "Write a metrics.jsonl line every N steps.", minimum=1)
    push_to_hub: bool = _opt(
        False, "Upload to the Hugging Face Hub in the background: the final model at the end, validation images and "
        "metrics while training (needs HF_TOKEN and hub_model_id; refused with HF_HUB_OFFLINE)."
    )
    push_checkpoints_to_hub: bool = _opt(
        False, "Also upload every checkpoint (to checkpoints/<config hash>/<run id>/ in the repo, marker last), so a "
        "new machine with an empty output_dir resumes from the Hub. Needs push_to_hub."
    )
    hub_model_id: str | None = _opt(None, "Hub repo to push to, e.g. `you/sana-finetune`.")
    hub_private: bool = _opt(True, "Create the Hub repo private (an existing repo keeps its visibility).")
    hub_keep_checkpoints: int | None = _opt(
        None, "Checkpoints kept on the Hub (older ones are deleted there); default: checkpoints_total_limit.", minimum=1
    )
    hub_sync_interval_s: float = _opt(
        600.0, "Seconds between uploads of validation images, metrics.jsonl and run.json while training (also sent "
        "with each checkpoint when push_checkpoints_to_hub, and at the end). 0: only then.", minimum=0
    )
    hub_upload_wait_s: float = _opt(
        1800.0, "At the end, seconds to wait for queued uploads before exiting 6 with the list of what is unsent "
        "(the next start sends it).", minimum=0
    )
    hub_stop_upload_s: float = _opt(
        20.0, "On SIGTERM, seconds (after the checkpoint is saved) given to queued uploads before exiting 143; keep "
        "save time plus this under the stop grace (docker --stop-timeout).", minimum=0
    )
    hub_retry_window_s: float = _opt(
        300.0,
        "Seconds to keep retrying a Hub download or the push access check that fails transiently (connection refused, "
        "DNS, timeout, HTTP 429/5xx) before exiting 3. 0 tries once. Background uploads retry for as long as the run "
        "lives, with backoff up to min(60, this/4) s.",
        minimum=0,
    )


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def field_map() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional?) from the field's annotation."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    args = typing.get_args(tp)
    if type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return tp, False


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


# SimpleTuner keys that name one of ours: read as that key.
SIMPLETUNER_KEY_NAMES: dict[str, str] = {"model_card_private": "hub_private"}

# SimpleTuner keys that we accept but that have no effect here, with the reason.
# A SimpleTuner config.json that sets them still loads; each is reported once.
IGNORED_SIMPLETUNER_KEYS: dict[str, str] = {
    "aspect_bucket_rounding": "bucket sizes are always exact multiples the model needs",
    "disable_benchmark": "there is no startup benchmark to skip",
    "validation_torch_compile": "validation runs uncompiled",
    "compress_disk_cache": "caches are always stored compactly",
    "delete_problematic_images": "the appliance never deletes your files; bad images are skipped and listed in output/data_report.json",
    "disable_bucket_pruning": "buckets are never pruned",
    "validation_prompt_library": "use user_prompt_library with your own prompts",
    "validation_guidance_rescale": "SanaPipeline has no guidance rescale",
    "ema_validation": "validation uses the EMA weights when use_ema is true",
    "ema_update_interval": "EMA updates every optimizer step",
    "evaluation_type": "CLIP evaluation is not built in",
    "grad_clip_method": "gradients are clipped by norm (max_grad_norm)",
    "resolution": "set resolution per dataset in the dataloader config",
    "resolution_type": "set resolution_type per dataset in the dataloader config",
    "minimum_image_size": "set minimum_image_size per dataset in the dataloader config",
    "skip_file_discovery": "set skip_file_discovery per dataset in the dataloader config",
    "max_workers": "use dataloader_num_workers",
    "validation_preview": "validation previews are not streamed",
    "validation_preview_steps": "validation previews are not streamed",
    "webhook_config": "webhooks are not supported; use report_to",
    "model_card_note": "the model card is generated from the run",
    "push_to_hub_background": "uploads always run in the background",
    "snr_gamma": "flow-matching loss is unweighted",
    "train_text_encoder": "the text encoder stays frozen (embeddings are cached)",
    "vae_dtype": "the VAE always encodes in fp32",
    "attention_mechanism": "diffusers' default SDPA attention is used",
}

# Keys that belong in the dataloader config, never in config.json.
DATALOADER_ONLY_KEYS = {
    "instance_data_dir", "caption_strategy", "instance_prompt", "cache_dir_vae", "crop",
    "crop_aspect", "crop_style", "repeats", "target_downsample_size", "maximum_image_size",
}
