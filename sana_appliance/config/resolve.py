"""Config resolution: (preset, config file, environment, CLI) -> validated config + provenance.

A pipeline in four stages: parse every layer into raw key/value pairs, convert
each value to its key's type, validate single keys and cross-field rules
(collecting every problem), then complete derived values (workspace paths).
This module is the only place that reads the environment; everything after it
receives a :class:`Resolved`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.parsing import ParseError, is_none_word, is_true_word, to_bool, to_int, to_number
from ..core.topology import Topology, detect
from ..core.workspace import SECRET_NAME, Credentials, HubSettings, Workspace, redact
from ..model import BUILTIN_MODEL
from . import presets as presets_mod
from .files import ENV_FILE_NAME, SIMPLETUNER_ENV_KEYS, Entry, Written, read_config_file, settings_from_env_file
from .rules import EXAMPLES, check_rules, cross_field
from .schema import (
    BUILTIN_DATASET,
    DATALOADER_ONLY_KEYS,
    IGNORED_SIMPLETUNER_KEYS,
    OPTIMIZER_ALIASES,
    SIMPLETUNER_KEY_NAMES,
    TrainConfig,
    defaults,
    field_map,
    field_type,
)

ENV_PREFIX = "SANA_"
# Environment variables with a meaning of their own (besides SANA_<KEY>).
ENV_ALIASES = {"OUTPUT_DIR": "output_dir", "DATALOADER_CONFIG": "data_backend_config"}
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
PATH_KEYS = ("output_dir", "data_backend_config", "user_prompt_library", "lycoris_config")
CONFIG_FILE_NAMES = ("config.yaml", "config.yml", "config.json")


@dataclass(frozen=True)
class CliArgs:
    """What the command line contributed: a preset, a config file and key overrides."""

    preset: str | None = None
    config_path: str | None = None
    overrides: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class Resolved:
    config: TrainConfig
    provenance: dict[str, str]
    preset: str | None
    demo_fallback: bool
    config_path: Path | None
    workspace: Workspace
    credentials: Credentials
    hub: HubSettings
    warnings: tuple[str, ...] = ()
    env_file: Path | None = None  # SimpleTuner's config.env when one was read
    build: dict = field(default_factory=dict)  # git sha / image digest when the image knows them
    topology: Topology = field(default_factory=lambda: Topology(role="single", source="default"))

    @property
    def worker_rank(self) -> int | None:
        """This process's rank when a launcher started it as one worker of several; None otherwise."""
        return self.topology.rank if self.topology.role == "worker" else None

    @property
    def under_appliance_launcher(self) -> bool:
        """The worker's launcher is the appliance's (its agent holds the output lock)."""
        return self.topology.role == "worker" and self.topology.launcher is not None and "appliance" in self.topology.launcher

    def __repr__(self) -> str:
        return f"Resolved(preset={self.preset!r}, config={self.redacted()!r}, provenance={self.provenance!r})"

    def redacted(self) -> dict[str, Any]:
        """The config as a dict safe to print or save: no secret ever appears."""
        return redact(dataclasses.asdict(self.config), self.credentials.values())


# ---------------------------------------------------------------- parse


def normalize_key(raw: str) -> str:
    """SimpleTuner keys may carry a leading `--` and use dashes."""
    return raw.strip().lstrip("-").replace("-", "_").lower()


def _entries_to_layer(entries: Sequence[Entry], where: str, problems: list[str]) -> dict[str, Any]:
    """{key: raw value} of one layer; a key given twice (in any spelling) is an error naming both."""
    first: dict[str, Entry] = {}
    layer: dict[str, Any] = {}
    for entry in entries:
        key = normalize_key(entry.key)
        if key in first:
            earlier = first[key]
            spelled = "" if (earlier.key, earlier.line) == (entry.key, entry.line) else \
                f": as {earlier.where()} and {entry.where()}"
            problems.append(f"`{key}` is given twice {where}{spelled}; keep one")
            continue
        first[key] = entry
        layer[key] = entry.value
    return layer


def _env_layer(variables: Mapping[str, str], origin: str, aliases: Mapping[str, str],
               problems: list[str]) -> dict[str, tuple[str, Any]]:
    """{key: (source, raw)} from environment-style variables: aliases (OUTPUT_DIR...) and SANA_<KEY>."""
    layer: dict[str, tuple[str, Any]] = {}
    names = [n for n in aliases if variables.get(n)] + sorted(n for n in variables if n.startswith(ENV_PREFIX))
    for name in names:
        key = aliases.get(name) or name[len(ENV_PREFIX):].lower()
        source = f"{origin}:{name}"
        if key in layer and layer[key][1] != variables[name]:
            label = "the environment" if origin == "env" else origin
            problems.append(f"`{key}` is given twice in {label}, as {layer[key][0].split(':', 1)[1]} and {name}, "
                            "with different values; keep one")
        layer[key] = (source, variables[name])
    return layer


# ---------------------------------------------------------------- convert

# sana_complex_human_instruction spelled as a switch: off means none, on means diffusers' default.
_INSTRUCTION_WORDS = {**{w: "disabled" for w in ("false", "no", "off", "none", "null")},
                      **{w: "default" for w in ("true", "yes", "on")}}


class _Invalid(Exception):
    pass


def convert(key: str, value: Any) -> Any:
    """Convert a raw value (string from env/CLI, or native from a file) to the key's type."""
    f = field_map()[key]
    base, optional = field_type(f)
    if isinstance(value, Written):
        # YAML 1.1 read a plain word as another type: a text key gets the word as written (`no`, not
        # False), a number key a decimal as written (`0500` is 500, not YAML 1.1's octal 320).
        decimal = base in (int, float) and re.fullmatch(r"[-+]?\d[\d_]*(\.\d*)?", value.text)
        value = value.text if base is str or decimal else value.value
    if value is None or (optional and is_none_word(value)):
        if optional:
            return None
        raise _Invalid(f"must be set (a {base.__name__})")
    converter = {bool: to_bool, int: to_int, float: to_number}.get(base)
    if converter is not None:
        try:
            return converter(value)
        except ParseError as exc:
            raise _Invalid(str(exc)) from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise _Invalid("must be a single text value")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    raise AssertionError(f"unhandled type {base} for {key}")


def _suggest(key: str) -> str:
    known = list(field_map()) + list(IGNORED_SIMPLETUNER_KEYS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else "; run `sana-appliance config` to list valid keys"


# ---------------------------------------------------------------- resolve


def find_config_file(workspace_root: Path) -> Path | None:
    for name in CONFIG_FILE_NAMES:
        candidate = workspace_root / "config" / name
        if candidate.is_file():
            return candidate
    return None


def resolve(env: Mapping[str, str], cli: CliArgs = CliArgs(), presets_dir: Path | None = None) -> Resolved:
    """Resolve the run's configuration. Pure: reads only `env`, `cli` and config files.

    Precedence, lowest first: built-in defaults < preset < config file < config.env <
    environment < CLI. Raises ConfigError listing every problem at once.
    """
    resolved, problems = resolve_collecting(env, cli, presets_dir)
    if problems:
        raise ConfigError(problems)
    return resolved


def _topology(env: Mapping[str, str], values: dict[str, Any], where: dict[str, str], problems: list[str]) -> Topology:
    """The job's shape from the launcher's and platform's variables; the launcher's settings honoured or refused."""
    try:
        topology = detect(env, values["num_processes"] if isinstance(values["num_processes"], int) else 1)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return Topology(role="single", source="invalid")
    forced = (env.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower()
    if topology.launcher == "accelerate launch" and forced and forced != values["mixed_precision"]:
        problems.append(
            f"accelerate launch set mixed precision {forced!r} (its --mixed_precision, 'no' when the flag is not given) "
            f"but this run's mixed_precision is {values['mixed_precision']!r} (from {where['mixed_precision']}): pass "
            f"--mixed_precision {values['mixed_precision']} to accelerate launch, or set mixed_precision={forced}")
    if topology.role == "worker" and topology.local_size_known and not where["num_processes"].startswith("default") \
            and values["num_processes"] not in (
            0, topology.local_world_size):
        problems.append(
            f"num_processes={values['num_processes']} (from {where['num_processes']}) but {topology.launcher} started "
            f"{topology.local_world_size} process(es) on this machine: the launcher decides under a launcher; unset "
            "num_processes or launch that many")
    if topology.restart and str(values["resume_from_checkpoint"]).strip().lower() in ("none", "false", ""):
        # A group the launcher restarts after a crash continues the job it is part of.
        values["resume_from_checkpoint"] = "latest"
        where["resume_from_checkpoint"] = (f"restart {topology.restart} of the process group (resume_from_checkpoint="
                                           "none applies to the job's first start only)")
    return topology


def resolve_collecting(env: Mapping[str, str], cli: CliArgs = CliArgs(),
                       presets_dir: Path | None = None) -> tuple[Resolved, list[str]]:
    """Like :func:`resolve`, but returns (resolved, problems) instead of raising.

    Lets the CLI's preflight checks add their problems to the same single report; with
    problems, the Resolved holds the last valid value of each key and must not be run.
    """
    problems: list[str] = []
    warnings: list[str] = []

    workspace_root = Path(env.get("WORKSPACE") or "workspace").expanduser().absolute()
    hf_home = Path(env["HF_HOME"]) if env.get("HF_HOME") else workspace_root / "cache" / "huggingface"
    workspace = Workspace(root=workspace_root, hf_home=hf_home)
    credentials = Credentials(
        hf_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None,
        wandb_api_key=env.get("WANDB_API_KEY") or None,
        hf_token_source="HF_TOKEN" if env.get("HF_TOKEN") else "HUGGING_FACE_HUB_TOKEN" if env.get("HUGGING_FACE_HUB_TOKEN") else None,
    )
    hub = HubSettings(
        endpoint=env.get("HF_ENDPOINT") or None,
        offline=is_true_word(env.get("HF_HUB_OFFLINE", "")),
        wandb_mode=env.get("WANDB_MODE") or None,
    )

    # Which config file.
    if cli.config_path:
        config_path: Path | None = workspace.resolve(cli.config_path)
    elif env.get("CONFIG_PATH"):
        config_path = workspace.resolve(env["CONFIG_PATH"])
    else:
        config_path = find_config_file(workspace_root)
    file_entries: list[Entry] = []
    if config_path is not None:
        try:
            file_entries = read_config_file(config_path)
        except ConfigError as exc:
            problems.extend(exc.problems)

    # SimpleTuner's config.env beside the config file (or in WORKSPACE/config): KEY=VALUE lines.
    env_file: Path | None = (config_path.parent if config_path else workspace.config_dir) / ENV_FILE_NAME
    env_file_values: dict[str, str] = {}
    if env_file.is_file():
        applies = {*ENV_ALIASES, *SIMPLETUNER_ENV_KEYS, "PRESET"}
        env_file_values, file_problems, file_warnings = settings_from_env_file(env_file, applies, ENV_PREFIX)
        problems.extend(file_problems)
        warnings.extend(file_warnings)
    else:
        env_file = None

    # Which preset.
    preset_name = cli.preset or env.get("PRESET") or env_file_values.get("PRESET") or None
    # A workspace multidatabackend.json means the user brought data: schema defaults apply
    # (the demo preset would silently replace that data with the generated shapes).
    brought_data = (workspace.config_dir / "multidatabackend.json").is_file()
    demo_fallback = preset_name is None and config_path is None and not brought_data
    if demo_fallback:
        preset_name = "demo"
    preset_values: dict[str, Any] = {}
    if preset_name:
        try:
            preset_values = presets_mod.load(preset_name, presets_dir).values
        except ConfigError as exc:
            problems.extend(exc.problems)

    # Raw layers, lowest precedence first: (source, {key: raw value}).
    layers: list[tuple[str, dict[str, Any]]] = []
    layers.append((f"preset:{preset_name}", dict(preset_values)))
    layers.append((f"file:{config_path}", _entries_to_layer(file_entries, f"in {config_path}", problems)))
    env_file_layer = _env_layer(env_file_values, "config.env", {**ENV_ALIASES, **SIMPLETUNER_ENV_KEYS}, problems)
    env_layer = _env_layer(env, "env", ENV_ALIASES, problems)
    cli_layer = _entries_to_layer([Entry(k, v) for k, v in cli.overrides], "on the command line", problems)

    known = field_map()
    values: dict[str, Any] = defaults()
    where: dict[str, str] = {k: "default" for k in values}

    def apply(key: str, raw: Any, source: str) -> None:
        if key in SIMPLETUNER_KEY_NAMES:
            warnings.append(f"`{key}` (from {source}) is SimpleTuner's name for `{SIMPLETUNER_KEY_NAMES[key]}`")
            key = SIMPLETUNER_KEY_NAMES[key]
        if key not in known:
            if key in IGNORED_SIMPLETUNER_KEYS:
                warnings.append(
                    f"`{key}` (from {source}) is a SimpleTuner option with no effect here: "
                    f"{IGNORED_SIMPLETUNER_KEYS[key]}"
                )
            elif key in DATALOADER_ONLY_KEYS:
                problems.append(
                    f"`{key}` (from {source}) belongs in the dataloader config "
                    "(multidatabackend.json), one value per dataset"
                )
            elif SECRET_NAME.search(key):
                problems.append(
                    f"`{key}` (from {source}): secrets are never read from config; set HF_TOKEN "
                    "or WANDB_API_KEY in the environment instead"
                )
            else:
                problems.append(f"unknown key `{key}` (from {source}){_suggest(key)}")
            return
        try:
            value = convert(key, raw)
        except _Invalid as exc:
            written = raw.text if isinstance(raw, Written) else raw
            shown = "<redacted>" if SECRET_NAME.search(source) else repr(written)
            example = EXAMPLES.get(key)
            hint = f", e.g. {example}" if example and "e.g." not in str(exc) else ""
            problems.append(f"{key}={shown} (from {source}): {exc}{hint}")
            return
        if key == "optimizer" and isinstance(value, str) and value in OPTIMIZER_ALIASES:
            alias = OPTIMIZER_ALIASES[value]
            if alias is None:
                problems.append(
                    f"optimizer={value!r} (from {source}) is a SimpleTuner optimizer we do not "
                    "support; use optimi-adamw or bnb-lion8bit"
                )
                return
            warnings.append(f"optimizer={value!r} (from {source}) is SimpleTuner's name for {alias!r}")
            value = alias
        if key == "sana_complex_human_instruction" and value.strip().lower() in _INSTRUCTION_WORDS:
            value = _INSTRUCTION_WORDS[value.strip().lower()]  # `false` / `no` mean no instruction, not the text "no"
        values[key] = value
        where[key] = source

    for source, layer in layers:
        if source.startswith("file:") and layer.get("preset") is not None:
            layer = {k: v for k, v in layer.items() if k != "preset"}
            problems.append(
                f"`preset` (from {source}): choose the preset with PRESET=NAME or --preset NAME"
            )
        for key, raw in layer.items():
            apply(key, raw, source)
    for key, (source, raw) in (*env_file_layer.items(), *env_layer.items()):
        apply(key, raw, source)
    for key, raw in cli_layer.items():
        apply(key, raw, "cli")

    # Single-key rules.
    for key, value in values.items():
        rule = check_rules(key, value)
        if rule:
            example = f", e.g. {EXAMPLES[key]}" if key in EXAMPLES else ""
            problems.append(f"{key}={value!r} (from {where[key]}): {rule}{example}")
    # Cross-field rules run even after single-key errors, so one report lists everything.
    problems.extend(cross_field(values, where, credentials, hub))

    # Complete: defaults found in the workspace, then absolute paths.
    for key, name in (("data_backend_config", "multidatabackend.json"), ("user_prompt_library", "user_prompt_library.json")):
        found = workspace.config_dir / name
        if values[key] is None and found.is_file():
            values[key] = str(found)
            where[key] = "default (found in workspace)"
    steps, warmup = values["max_train_steps"], values["lr_warmup_steps"]
    if isinstance(steps, int) and isinstance(warmup, int) and 0 < steps <= warmup:
        warnings.append(
            f"lr_warmup_steps={values['lr_warmup_steps']} >= max_train_steps={values['max_train_steps']}: the "
            "learning rate never reaches learning_rate; lower lr_warmup_steps (e.g. 10% of the steps)")
    if values["mixed_precision"] == "fp16":
        warnings.append(
            "mixed_precision=fp16: Sana is known to give NaN losses in fp16 at low learning "
            "rates; bf16 is recommended"
        )
    for key in PATH_KEYS:
        value = values[key]
        if value is not None and not str(value).startswith("builtin:"):
            values[key] = str(workspace.resolve(value))
    if values["pretrained_model_name_or_path"] != BUILTIN_MODEL and values["data_backend_config"] == BUILTIN_DATASET:
        warnings.append(
            "data_backend_config is the demo's generated dataset while training a real model: "
            "set DATALOADER_CONFIG to your multidatabackend.json"
        )
    workspace_data = workspace.config_dir / "multidatabackend.json"
    if values["data_backend_config"] == BUILTIN_DATASET and workspace_data.is_file():
        # PRESET=demo wins over the workspace's file by precedence; say so rather than ignore it silently.
        warnings.append(
            f"data_backend_config={BUILTIN_DATASET} (from {where['data_backend_config']}): this run trains on the "
            f"demo's generated shapes, not on {workspace_data}; to train on that file set "
            f"DATALOADER_CONFIG={workspace_data}"
        )

    topology = _topology(env, values, where, problems)
    resolved = Resolved(
        config=TrainConfig(**values),
        provenance=where,
        preset=preset_name,
        demo_fallback=demo_fallback,
        config_path=config_path,
        workspace=workspace,
        credentials=credentials,
        hub=dataclasses.replace(hub, retry_window_s=float(values["hub_retry_window_s"])),
        warnings=tuple(warnings),
        topology=topology,
        build={"git_sha": env.get("APPLIANCE_GIT_SHA") or None, "image": env.get("APPLIANCE_IMAGE") or None,
               "image_digest": env.get("APPLIANCE_IMAGE_DIGEST") or None},
        env_file=env_file,
    )
    return resolved, problems
