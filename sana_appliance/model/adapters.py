"""Adapters on a frozen Sana transformer: PEFT LoRA (`lora_type: standard`) and LyCORIS (`lora_type: lycoris`,
LoKr by default), with the base optionally quantized by bitsandbytes (`base_model_precision: nf4-bnb | int8-bnb`).

The adapter lives inside the transformer module: PEFT wraps the target layers in place, and the LyCORIS network is
registered as the transformer's child ``lycoris`` (its modules patch the target layers' forward in bypass mode, so
the base weights, quantized or not, are never rewritten). So ``named_parameters()`` with ``requires_grad`` are
exactly the adapter's, and everything built over trainable parameters (optimizer, EMA, gradient clipping, DDP,
checkpoints) covers the adapter and nothing else. Adapter weights train in fp32 under the run's autocast.

Exports: a standard LoRA as diffusers' ``pytorch_lora_weights.safetensors`` (with its LoraConfig as metadata, so
``SanaPipeline.load_lora_weights`` restores rank and alpha); a LyCORIS adapter as LyCORIS' own safetensors
(``lycoris_<module>.lokr_w1`` ... keys, what SimpleTuner writes and ComfyUI loads) beside its ``lycoris_config.json``.
Optionally a merged pipeline: the adapter merged onto the unquantized base weights.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError

log = logging.getLogger(__name__)

STANDARD, LYCORIS = "standard", "lycoris"
DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0"  # the attention projections of every block (self and cross)
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers and SimpleTuner use for both kinds
LYCORIS_CONFIG_FILE = "lycoris_config.json"
LYCORIS_CHILD = "lycoris"  # the LyCORIS network's name under the transformer
QUANTIZED = ("nf4-bnb", "int8-bnb")
# The built-in LyCORIS config: LoKr with factor 16 on every attention projection (the guide's recipe).
DEFAULT_LYCORIS: dict[str, Any] = {
    "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
    "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 16}}},
}
# LyCORIS' class-wide preset before any config: every network here is built from these plus the config's preset.
_PRESET_DEFAULTS: dict[str, Any] = {
    "enable_conv": True, "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
    "target_name": [], "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": "lycoris", "use_fnmatch": False,
    "exclude_name": [],
}
# The keys LyCORIS' create_lycoris reads (lycoris-lora 4.x; any other key it would drop silently), with
# SimpleTuner's apply_preset (applied before the network is built).
_NETWORK_KEYS = {"algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "dropout", "rank_dropout",
                 "module_dropout", "disable_conv_cp", "use_conv_cp", "use_cp", "use_tucker", "use_scalar", "block_size",
                 "train_norm", "constraint", "constrain", "rescaled", "dora_wd", "wd_on_output", "full_matrix",
                 "bypass_mode", "unbalanced_factorization", "train_llm_adapter", "preset", "decompose_both", "factor",
                 "apply_preset"}
# Per-module options a module_algo_map entry may set: these, and the chosen algo module's own arguments.
_MODULE_KEYS = {"algo", "dim", "alpha", "use_tucker"}
_MODULE_POSITIONAL = ("self", "lora_name", "org_module", "multiplier", "lora_dim", "alpha", "dropout", "rank_dropout",
                      "module_dropout", "use_tucker", "args", "kwargs")
# Settings that change what the trained adapter is: a resume under other values is refused (dropouts may change).
LYCORIS_RESUME_FREE = ("dropout", "rank_dropout", "module_dropout")


def enabled(cfg) -> bool:
    return cfg.model_type == "lora"


def kind(cfg) -> str | None:
    return cfg.lora_type if enabled(cfg) else None


# ---------------------------------------------------------------- LyCORIS config


def _lycoris_modules() -> dict[str, type]:
    from lycoris.wrapper import network_module_dict

    return dict(network_module_dict)


def read_lycoris_config(cfg) -> dict[str, Any]:
    """The LyCORIS config to build: SimpleTuner's ``lycoris_config`` JSON file, or the built-in LoKr one.
    Every key is checked against what LyCORIS reads (a misspelt key would be ignored by it silently)."""
    path = cfg.lycoris_config
    if path is None:
        config = copy.deepcopy(DEFAULT_LYCORIS)
        where = "the built-in LoKr config"
    else:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"lycoris_config={path!r}: the file does not exist; put SimpleTuner's lycoris_config.json "
                              "there, or unset lycoris_config for the built-in LoKr config") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"lycoris_config={path!r}: not readable JSON ({exc}); fix the file, or unset "
                              "lycoris_config for the built-in LoKr config") from None
        where = f"lycoris_config={path!r}"
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: must hold a JSON object, e.g. {json.dumps(DEFAULT_LYCORIS)}")
    modules = _lycoris_modules()
    algo = config.get("algo", "lokr")
    if algo not in modules:
        raise ConfigError(f"{where}: unknown LyCORIS algo {algo!r}; LyCORIS has {', '.join(sorted(modules))} "
                          "(lokr is the guide's)")
    unknown = sorted(set(config) - _NETWORK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not option(s) "
                          f"LyCORIS reads (it would ignore them); it reads {', '.join(sorted(_NETWORK_KEYS))}")
    if float(config.get("multiplier", 1.0)) != 1.0:
        raise ConfigError(f"{where}: multiplier={config['multiplier']!r}: the exported adapter is loaded at strength "
                          "1.0 (ComfyUI, create_lycoris_from_weights(1.0, ...), the merged pipeline), so training "
                          "at another strength would export a different model; set multiplier: 1.0")
    preset = config.get("apply_preset") or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{where}: apply_preset must be an object, e.g. {json.dumps(DEFAULT_LYCORIS['apply_preset'])}")
    bad = sorted(set(preset) - set(_PRESET_DEFAULTS))
    if bad:
        raise ConfigError(f"{where}: apply_preset has unknown key(s) {', '.join(bad)}; known: "
                          f"{', '.join(sorted(_PRESET_DEFAULTS))}")
    for name, options in (preset.get("module_algo_map") or {}).items():
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: module_algo_map[{name!r}] must be an object, e.g. {{\"factor\": 16}}")
        other = options.get("algo", algo)
        if other not in modules:
            raise ConfigError(f"{where}: module_algo_map[{name!r}] names unknown LyCORIS algo {other!r}; LyCORIS has "
                              f"{', '.join(sorted(modules))}")
        accepted = _MODULE_KEYS | {arg for arg in inspect.signature(modules[other].__init__).parameters
                                   if arg not in _MODULE_POSITIONAL}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(f"{where}: module_algo_map[{name!r}] has {', '.join(unknown)}, not option(s) of "
                              f"{other} (LyCORIS would ignore them); it reads {', '.join(sorted(accepted))}")
    if "preset" in config and config["preset"] not in (None, "full"):
        raise ConfigError(f"{where}: preset={config['preset']!r} names a preset for UNets; use apply_preset "
                          "(target_module / module_algo_map) for Sana")
    if cfg.base_model_precision in QUANTIZED and config.get("bypass_mode") is False:
        raise ConfigError(f"{where}: bypass_mode=false cannot train over a quantized base "
                          f"(base_model_precision={cfg.base_model_precision!r}): remove bypass_mode, or set "
                          "base_model_precision: no_change")
    return config


def identity_settings(cfg) -> dict[str, Any]:
    """What a run's identity (its config hash) adds for an adapter: the LyCORIS file's settings (its content, not
    only its path), without the dropouts, which a resume may change."""
    if not enabled(cfg) or cfg.lora_type != LYCORIS:
        return {}
    try:
        config = read_lycoris_config(cfg)
    except ConfigError:  # reported where the run reads it; the identity then names the path alone
        return {}
    return {"lycoris_settings": {k: v for k, v in config.items() if k not in LYCORIS_RESUME_FREE}}


def resume_problem(saved: dict | None, attached: Attached) -> str | None:
    """A LyCORIS checkpoint's adapter settings against this run's (a changed factor, dim, alpha, algo or preset
    trains another adapter, or fails to load it): what differs, or None."""
    if saved is None or attached.kind != LYCORIS:
        return None
    now = attached.config
    changed = sorted(k for k in set(saved) | set(now) if k not in LYCORIS_RESUME_FREE and saved.get(k) != now.get(k))
    if not changed:
        return None
    return ("the LyCORIS settings changed since the checkpoint (" + "; ".join(
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed) + "): put lycoris_config back as it was (only "
        "dropout, rank_dropout and module_dropout may change)")


def check(cfg) -> None:
    """Preflight: what an adapter run needs, checked before any download (the LyCORIS config, the packages)."""
    if not enabled(cfg):
        return
    if cfg.lora_type == LYCORIS:
        _import("lycoris", "lycoris-lora", cfg)
        read_lycoris_config(cfg)
    else:
        _import("peft", "peft", cfg)
    if cfg.base_model_precision in QUANTIZED:
        import_bitsandbytes(cfg)


def _import(module: str, package: str, cfg):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"lora_type={cfg.lora_type!r} needs the {package} package ({exc}): pip install {package} "
                          "(the image has it)") from None


def import_bitsandbytes(cfg):
    # Its CPU backend warns on AVX512-BF16 hosts that an optional kernel package is missing; the fallback it uses
    # is the one tested here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError) as exc:
        raise ConfigError(f"base_model_precision={cfg.base_model_precision!r} needs bitsandbytes, which does not load "
                          f"here ({type(exc).__name__}: {exc}); set base_model_precision: no_change") from None
    return bitsandbytes


# ---------------------------------------------------------------- quantized base


def quantize_base(transformer: torch.nn.Module, cfg, device: torch.device) -> dict[str, Any]:
    """Replace every nn.Linear of the transformer blocks by its bitsandbytes 4-bit (nf4) or 8-bit form. The rest
    (embeddings, the blocks' convolutions, norms, the output projection) stays in its dtype. Each layer leaves the
    host copy alone and is quantized where it lands: nf4 on the host with quantize_via: cpu (then moved), else on
    ``device``; int8 always on ``device`` (bitsandbytes keeps an int8 layer's scales beside the parameter, where a
    later move would not follow them). So the accelerator never holds the whole unquantized base. One quantized
    layer runs once here, so a kernel this machine lacks fails now with the key to change."""
    bnb = import_bitsandbytes(cfg)
    precision = cfg.base_model_precision
    compute = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    where = torch.device("cpu") if cfg.quantize_via == "cpu" and precision == "nf4-bnb" else device
    layers = quantized_params = 0
    probe = None
    total = sum(p.numel() for p in transformer.parameters())
    for block in transformer.transformer_blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            weight = module.weight.data.to("cpu")
            has_bias = module.bias is not None
            if precision == "nf4-bnb":
                new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=has_bias, compute_dtype=compute,
                                        quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(where)
                # On AVX512-BF16 hosts bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first
                # no-grad forward (validation), and that kernel then fails in backward: keep the one layout that trains.
                new.support_avx512bf16_for_cpu = False
            else:
                new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(where)
            if has_bias:
                new.bias = torch.nn.Parameter(module.bias.data.to(where), requires_grad=False)
            new.requires_grad_(False)
            setattr(parent, name.rpartition(".")[2], new)
            layers += 1
            quantized_params += module.weight.numel()
            probe = probe or new
    if probe is None:
        raise ConfigError(f"base_model_precision={precision!r}: the transformer has no linear layers to quantize")
    try:
        with torch.no_grad(), torch.autocast(where.type, dtype=compute, enabled=compute != torch.float32):
            probe(torch.zeros(1, probe.in_features, device=where, dtype=compute))
    except RuntimeError as exc:
        raise ConfigError(f"base_model_precision={precision!r}: bitsandbytes' kernel refused to run on this "
                          f"{where.type} machine ({str(exc).splitlines()[0][:200]}); set base_model_precision: "
                          "no_change (or quantize_via: accelerator on a GPU)") from None
    return {"layers": layers, "quantized_params": quantized_params, "params": total, "where": where.type}


# ---------------------------------------------------------------- attaching


@dataclass(frozen=True)
class Attached:
    kind: str
    modules: int  # layers the adapter wraps
    params: int  # trainable parameters
    config: dict  # the PEFT LoraConfig or the LyCORIS config, as recorded in exports


def module_dropout(attached: Attached) -> bool:
    """Whether a LyCORIS adapter skips whole modules at random (module_dropout, at the top or per module)."""
    if attached.kind != LYCORIS:
        return False
    maps = (attached.config.get("apply_preset") or {}).get("module_algo_map") or {}
    return any(float(c.get("module_dropout", 0) or 0) > 0 for c in [attached.config, *maps.values()])


def target_modules(cfg) -> list[str]:
    return [t.strip() for t in str(cfg.lora_target_modules).split(",") if t.strip()]


def attach(transformer: torch.nn.Module, cfg) -> Attached:
    """Freeze the transformer and add the configured adapter; its parameters (the only trainable ones) in fp32.
    Adapter initialisation draws from torch's global generator (seeded by the run): same seed, same adapter."""
    transformer.requires_grad_(False)
    if cfg.lora_type == LYCORIS:
        attached = _attach_lycoris(transformer, cfg)
    else:
        attached = _attach_peft(transformer, cfg)
    for p in transformer.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
    return attached


def _attach_peft(transformer, cfg) -> Attached:
    from peft import LoraConfig

    targets = target_modules(cfg)
    names = [n for n, _ in transformer.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] if not n.endswith(".0") else n.rsplit(".", 2)[-2] + ".0"
                         for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)} |
                        {n.split("transformer_blocks.0.", 1)[1] for n, m in transformer.named_modules()
                         if n.startswith("transformer_blocks.0.") and isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules!r}: {', '.join(missing)} match(es) no module "
                          f"of the Sana transformer; linear layers are named e.g. {', '.join(leaves[:16])} "
                          f"(default {DEFAULT_TARGETS})")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
                        lora_dropout=cfg.lora_dropout, target_modules=targets, init_lora_weights=True)
    transformer.add_adapter(config)
    from peft.tuners.lora import LoraLayer

    wrapped = sum(isinstance(m, LoraLayer) for m in transformer.modules())
    params = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return Attached(STANDARD, wrapped, params, _jsonable(config.to_dict()))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _lycoris_network(transformer, config: dict):
    from lycoris import create_lycoris
    from lycoris.wrapper import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # its own log lines (every module it wraps); ours says what was built
    LycorisNetwork.apply_preset({**_PRESET_DEFAULTS, **(config.get("apply_preset") or {})})
    options = {k: v for k, v in config.items() if k not in ("apply_preset", "preset", "multiplier", "linear_dim",
                                                             "linear_alpha", "algo")}
    options.setdefault("bypass_mode", True)  # the base weights are never rewritten (needed when they are quantized)
    return create_lycoris(transformer, float(config.get("multiplier", 1.0)), linear_dim=int(config.get("linear_dim", 4)),
                          linear_alpha=float(config.get("linear_alpha", 1)), algo=config.get("algo", "lokr"), **options)


def _attach_lycoris(transformer, cfg) -> Attached:
    config = read_lycoris_config(cfg)
    preset = config.get("apply_preset") or {}
    classes = {type(m).__name__ for m in transformer.modules()}
    unmatched = [c for c in preset.get("target_module", []) if c not in classes]
    net = _lycoris_network(transformer, config)
    if not net.loras:
        raise ConfigError(f"lycoris_config: its apply_preset wraps no module of the Sana transformer (module classes "
                          f"here include Attention, GLUMBConv, SanaTransformerBlock); e.g. "
                          f"{json.dumps(DEFAULT_LYCORIS['apply_preset'])}")
    if unmatched:
        log.warning("lycoris_config: target_module %s match(es) no module class of the Sana transformer (its classes "
                    "include Attention, GLUMBConv, SanaTransformerBlock); %d other modules are wrapped",
                    ", ".join(unmatched), len(net.loras))
    net.apply_to()
    transformer.add_module(LYCORIS_CHILD, net)
    net.requires_grad_(True)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return Attached(LYCORIS, len(net.loras), params, config)


# ---------------------------------------------------------------- state


def trainable_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters by name (what a checkpoint holds of the model)."""
    return {n: p.detach() for n, p in transformer.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's adapter back exactly; another adapter (names or shapes) raises ValueError."""
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing = sorted(params.keys() - tensors.keys())[:3]
        unexpected = sorted(tensors.keys() - params.keys())[:3]
        raise ValueError(f"the checkpoint holds another adapter (missing {missing}, unexpected {unexpected})")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"adapter tensor {name} has shape {tuple(tensors[name].shape)} in the checkpoint, "
                             f"{tuple(p.shape)} here")
    for name, p in params.items():
        p.copy_(tensors[name].to(p.device, p.dtype))


# ---------------------------------------------------------------- export


def save_adapter(transformer: torch.nn.Module, attached: Attached, folder: Path, dtype: torch.dtype,
                 name: str = ADAPTER_FILE) -> Path:
    """Write the adapter's loadable file into ``folder`` (and, for LyCORIS, its config beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if attached.kind == STANDARD:
        from diffusers import SanaPipeline
        from peft import get_peft_model_state_dict

        layers = {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
        SanaPipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=name,
                                       safe_serialization=True, transformer_lora_adapter_metadata=attached.config)
    else:
        net = getattr(transformer, LYCORIS_CHILD)
        metadata = {"lycoris_config": json.dumps(attached.config, sort_keys=True), "format": "pt"}
        net.save_weights(str(folder / name), dtype, metadata)
        (folder / LYCORIS_CONFIG_FILE).write_text(json.dumps(attached.config, indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")
    return folder / name


def merged_transformer(base_path: Path, adapter_file: Path, attached: Attached, dtype: torch.dtype):
    """A plain SanaTransformer2DModel: the unquantized base weights with the exported adapter merged in."""
    from diffusers import SanaTransformer2DModel

    base = SanaTransformer2DModel.from_pretrained(base_path, subfolder="transformer", torch_dtype=torch.float32)
    if attached.kind == STANDARD:
        from diffusers import SanaPipeline

        state = SanaPipeline.lora_state_dict(adapter_file.parent, weight_name=adapter_file.name, return_lora_metadata=True)
        weights, metadata = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        SanaPipeline.load_lora_into_transformer(weights, transformer=base, metadata=metadata)
        base.fuse_lora(lora_scale=1.0)
        base.unload_lora()
    else:
        from lycoris import create_lycoris_from_weights

        logging.getLogger("LyCORIS").setLevel(logging.ERROR)
        net, _ = create_lycoris_from_weights(1.0, str(adapter_file), base)
        net.merge_to(1.0)
    with torch.no_grad():  # (ModelMixin.to(dtype) warns about fp32-kept modules; Sana has none)
        for tensor in [*base.parameters(), *base.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    return base
