"""The final export: a diffusers pipeline folder, single-file transformer weights, a model card."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.fsutil import atomic_folder, atomic_path, atomic_save_safetensors, canonical_safetensors_header

log = logging.getLogger(__name__)
COPIED_PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer", "scheduler")


def export_final(
    *,
    output_dir: Path,
    transformer,
    ema_state: dict[str, torch.Tensor] | None,
    parts,
    card: str,
    sample_images: list[Path],
    check: Callable[[], None] = lambda: None,
) -> Path:
    """Write output/final/ (pipeline; EMA weights in the transformer when EMA is on) atomically,
    plus output/transformer.safetensors and output/transformer_ema.safetensors.

    `check` runs between files (the text encoder alone is GBs); when it raises, the temp folder
    is removed and final/ stays as it was (absent, or the previous export)."""
    # Without `_name_or_path` (the workspace's folder): the same weights give the same bytes in any workspace.
    config = {k: v for k, v in dict(transformer.config).items() if k != "_name_or_path"}
    meta = {"format": "pt", "model": "SanaTransformer2DModel", "config": json.dumps(config, default=str)}
    trained = transformer.state_dict()
    check()
    atomic_save_safetensors(trained, output_dir / "transformer.safetensors", meta)
    if ema_state is not None:
        check()
        atomic_save_safetensors(ema_state, output_dir / "transformer_ema.safetensors", meta)

    backup = None
    if ema_state is not None:
        backup = {k: v.detach().clone() for k, v in trained.items()}
        missing, unexpected = transformer.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema_state.items()}, strict=False)
        assert not unexpected, unexpected
    final = output_dir / "final"

    def copy_file(source, dest):
        check()
        return shutil.copy2(source, dest)

    try:
        with atomic_folder(final, existing="replace") as tmp:  # an earlier final/ is replaced with a rename
            _write_pipeline(tmp, parts, transformer, copy_file, check)
            samples = tmp / "samples"
            samples.mkdir()
            for image in sample_images:
                copy_file(image, samples / image.name)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            check()  # the last point to abandon: from here final/ is fsynced and put in place
    finally:
        if backup is not None:
            transformer.load_state_dict(backup)
    log.info("exported the fine-tuned pipeline to %s", final)
    return final


ADAPTER_SINGLES = ("adapter.safetensors", "adapter_ema.safetensors")  # beside final/, like transformer.safetensors


def export_adapter(
    *,
    output_dir: Path,
    transformer,
    ema,
    attached,
    parts,
    card: str,
    sample_images: list[Path],
    dtype: torch.dtype,
    merged: bool,
    check: Callable[[], None] = lambda: None,
) -> Path:
    """model_type lora: output/final/ holds the adapter in its loadable format (the EMA weights when EMA is on), its
    model card and samples, and with ``merged`` a full pipeline in final/merged/ (the adapter merged onto the
    unquantized base). Beside it output/adapter.safetensors (the trained weights) and adapter_ema.safetensors, in
    the same format. Written atomically; `check` as in export_final."""
    from ..model import adapters

    def write_single(name: str) -> None:
        check()
        with atomic_path(output_dir / name) as tmp:
            staging = tmp.with_name(tmp.name + ".d")
            try:
                written = adapters.save_adapter(transformer, attached, staging, dtype, name=name)
                canonical_safetensors_header(written)
                written.replace(tmp)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    write_single(ADAPTER_SINGLES[0])
    swapped = ema.swapped_into(transformer) if ema is not None else None
    if swapped is not None:
        with swapped:
            write_single(ADAPTER_SINGLES[1])
    final = output_dir / "final"

    def copy_file(source, dest):
        check()
        return shutil.copy2(source, dest)

    with atomic_folder(final, existing="replace") as tmp:
        with (ema.swapped_into(transformer) if ema is not None else contextlib.nullcontext()):
            weights = adapters.save_adapter(transformer, attached, tmp, dtype)
        canonical_safetensors_header(weights)
        if merged:
            check()
            folder = tmp / MERGED
            folder.mkdir()
            _write_pipeline(folder, parts, adapters.merged_transformer(parts.path, weights, attached, dtype),
                            copy_file, check)
            (folder / "README.md").write_text(card, encoding="utf-8")
        samples = tmp / "samples"
        samples.mkdir()
        for image in sample_images:
            copy_file(image, samples / image.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        check()
    log.info("exported the %s adapter to %s%s", "LyCORIS" if attached.kind == adapters.LYCORIS else "LoRA", final,
             f" (and the merged pipeline to {final / MERGED})" if merged else "")
    return final


MERGED = "merged"


def _write_pipeline(folder: Path, parts, transformer, copy_file: Callable, check: Callable[[], None]) -> None:
    """A diffusers pipeline folder: the frozen parts copied byte for byte from the base model folder (exact, and no
    need to bring the text encoder back into memory), then `transformer` saved in it."""
    for name in COPIED_PARTS:
        source = parts.path / name
        if source.is_dir():
            shutil.copytree(source, folder / name, copy_function=copy_file)
        elif source.is_file():
            copy_file(source, folder / name)
    check()
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    _drop_local_path(folder / "transformer" / "config.json")


def _drop_local_path(config_file: Path) -> None:
    """diffusers records the folder the model was loaded from (`_name_or_path`: the workspace's cache); without
    it the export names no local path and its bytes are the same in any workspace."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _dtype_name(config: dict) -> str:
    return {"bf16": "bfloat16", "fp16": "float16"}.get(str(config.get("mixed_precision")), "float32")


def _call_options(config: dict) -> str:
    """The pipeline call that draws what validation drew: its size exactly (no resolution binning, which would
    draw at the nearest bin of the base model's size and resize), and the text length the embeddings were
    trained with when it is not SanaPipeline's default of 300; validation's steps, guidance and seed."""
    from ..config.rules import parse_resolutions

    options = (f", num_inference_steps={config.get('validation_num_inference_steps')}, "
               f"guidance_scale={config.get('validation_guidance')}")
    try:
        width, height = parse_resolutions(str(config.get("validation_resolution")))[0]
        options += f", height={height}, width={width}, use_resolution_binning=False"
    except (ValueError, IndexError, TypeError):
        pass
    length = config.get("tokenizer_max_length")
    if isinstance(length, int) and length != 300:
        options += f", max_sequence_length={length}"
    return options + f", generator=torch.Generator().manual_seed({config.get('validation_seed')})"


def model_card(*, config: dict, model_info: dict, datasets: list[dict], steps: int, samples: list[str], eval_loss: dict,
               resume_history: list[dict] | None = None, colour_score: dict | None = None,
               report_link: dict[str, str] | None = None, adapter: dict | None = None) -> str:
    """A Hub model card. `config` must already be redacted. With model_type lora it describes the adapter
    (``adapter``: its PEFT or LyCORIS config) and how to load it (diffusers for a LoRA, LyCORIS or ComfyUI for a
    LyCORIS file, and the merged pipeline when exported)."""
    base = model_info.get("repo_id") or model_info.get("name")
    revision = model_info.get("commit_sha") or model_info.get("version") or "local"
    keys = ["learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "mixed_precision", "train_batch_size",
            "gradient_accumulation_steps", "max_grad_norm", "caption_dropout_probability", "flow_schedule_shift",
            "flow_schedule_auto_shift", "use_ema", "ema_decay", "seed", "sana_complex_human_instruction"]
    lora = config.get("model_type") == "lora"
    lycoris = lora and config.get("lora_type") == "lycoris"
    if lora:
        keys = ["model_type", "lora_type", "base_model_precision", "quantize_via"] + (
            ["lycoris_config"] if lycoris else ["lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"]) + keys
    algo = str((adapter or {}).get("algo", "lokr"))
    shown = {"lokr": "LoKr", "loha": "LoHa", "lora": "LoRA", "locon": "LoCon"}.get(algo, algo)
    kind = f"LyCORIS ({shown}) adapter" if lycoris else "LoRA adapter" if lora else "Full-rank fine-tune"
    tag = "lycoris" if lycoris else "lora" if lora else "full-rank-fine-tune"
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        f"base_model: {base}",
        f"tags: [sana, text-to-image, {tag}, sana-appliance]",
        "---",
        "",
        f"# Sana {'adapter for' if lora else 'fine-tune of'} `{base}`",
        "",
        f"{kind} trained with sana-appliance for {steps} optimizer steps"
        + (f" on the base transformer in {config.get('base_model_precision')}."
           if lora and config.get("base_model_precision") != "no_change" else "."),
        f"Base model: `{base}` at revision `{revision}`.",
        "",
        "## Datasets",
        "",
    ]
    lines += [f"- `{d['id']}`: {d['samples']} images, fingerprint `{d.get('fingerprint', '')[:16]}`" for d in datasets]
    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | `{config.get(k)}` |" for k in keys if k in config]
    if resume_history:  # the table above is the final config; these held before each resume
        lines += ["", "## Changes during training", "",
                  "The hyperparameters above apply from the last change on; before it:", ""]
        for entry in resume_history:
            lines += [f"- resumed at step {entry['step']}: " + ", ".join(
                f"`{k}` {old!r} -> {new!r}" for k, (old, new) in entry["changed"].items())]
    if eval_loss:
        lines += ["", "## Held-out eval loss", ""]
        if "start_step" in eval_loss:
            lines += [f"- start (step {eval_loss['start_step']}): {eval_loss['start']:.5f}",
                      f"- end (step {eval_loss['end_step']}): {eval_loss['end']:.5f}"]
        else:
            lines += [f"- {k}: {v:.5f}" for k, v in eval_loss.items()]
    if colour_score:
        lines += ["", "## Held-out colour score", "",
                  f"Pictures of the demo's {colour_score['prompts']} held-out prompts (combinations never trained on), "
                  f"{colour_score['seeds']} seeds each, at step {colour_score['step']}: the prompted background colour in "
                  f"{colour_score['background']:.0%}, the prompted shape colour in {colour_score['shape']:.0%} of "
                  f"{colour_score['pictures']} (chance: {colour_score['chance']:.0%}). Rendered with the tiny text "
                  "encoder's max_sequence_length of 48 at 64x64: call this pipeline with `max_sequence_length=48` (SanaPipeline's "
                  "default of 300 gives the captions other embeddings) and `use_resolution_binning=False` (see Use).",]
    if report_link:
        lines += ["", "## Run report", "",
                  "report.html (" + "; ".join(f"[{href}]({href}) {where}" for where, href in report_link.items())
                  + "): loss, eval loss, learning rate, throughput, memory and skipped-step curves, the validation "
                  "grids over time, and the dataset summary and data report."]
    lines += ["", "## Samples", ""]
    lines += [f"![{name}](samples/{name})" for name in samples]
    dtype = _dtype_name(config)
    # A Hub base is named by its repo id; a local or built-in one by a placeholder for its folder.
    source = repr(model_info["repo_id"]) if model_info.get("repo_id") else "'PATH_TO_THE_BASE_MODEL_FOLDER'"
    call = f"image = pipe({config.get('validation_prompt')!r}{_call_options(config)}).images[0]"
    if not lora:
        lines += [
            "", "## Use", "", "```python", "import torch", "from diffusers import SanaPipeline",
            f"pipe = SanaPipeline.from_pretrained('PATH_OR_REPO', dtype=torch.{dtype})",
            "pipe.to('cuda' if torch.cuda.is_available() else 'cpu')", call, "```", "",
        ]
        return "\n".join(lines)
    held = "its EMA weights (use_ema was on)" if config.get("use_ema") else "the trained weights"
    lines += ["", "## Use", "", f"The adapter is `pytorch_lora_weights.safetensors`, {held}. "
              f"It applies to the unquantized base `{base}` at revision `{revision}`."]
    if lycoris:
        lines += ["", f"It is a LyCORIS file ({shown}: `lycoris_<module>.<weight>` keys, its config in `lycoris_config.json`): "
                  "ComfyUI and SimpleTuner load it as a LoRA; in Python, with the `lycoris-lora` package:", "",
                  "```python", "import torch", "from diffusers import SanaPipeline",
                  "from lycoris import create_lycoris_from_weights",
                  f"pipe = SanaPipeline.from_pretrained({source}, dtype=torch.{dtype})",
                  "wrapper, _ = create_lycoris_from_weights(1.0, 'PATH/pytorch_lora_weights.safetensors', pipe.transformer)",
                  "wrapper.merge_to()", "pipe.to('cuda' if torch.cuda.is_available() else 'cpu')", call, "```"]
    else:
        lines += ["", "It is a diffusers/PEFT LoRA (its LoraConfig, rank and alpha, are in the file's metadata):", "",
                  "```python", "import torch", "from diffusers import SanaPipeline",
                  f"pipe = SanaPipeline.from_pretrained({source}, dtype=torch.{dtype})",
                  "pipe.load_lora_weights('PATH_OR_REPO')", "pipe.to('cuda' if torch.cuda.is_available() else 'cpu')",
                  call, "```"]
    if config.get("lora_export_merged"):
        lines += ["", "`merged/` is a complete pipeline with the adapter merged onto the unquantized base weights "
                  "(no adapter library needed):", "", "```python", "import torch", "from diffusers import SanaPipeline",
                  f"pipe = SanaPipeline.from_pretrained('PATH/merged', dtype=torch.{dtype})", call, "```"]
    lines.append("")
    return "\n".join(lines)
