"""Reading config files as the user wrote them: config.yaml / config.json and config.env.

Three traps this module exists for:

- a key written twice (`--learning_rate` and `learning_rate`, or one spelling twice) would
  otherwise silently keep the last value, so every entry is returned with its spelling and
  line and the caller refuses the repeat;
- YAML 1.1 turns some plain words into other types (`mixed_precision: no` -> False,
  `revision: 0123` -> 83): a plain scalar YAML did not read as text is returned as
  :class:`Written`, keeping the characters of the file, so a text-typed key gets the word
  the user wrote;
- SimpleTuner keeps launcher settings in a shell-style ``config.env`` next to config.json;
  it is read as plain ``KEY=VALUE`` lines (never run as a shell script).

Pure: reads the named files only. Errors are ConfigError problems naming file and line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError

ENV_FILE_NAME = "config.env"


@dataclass(frozen=True)
class Written:
    """A plain YAML scalar that YAML 1.1 read as a non-string: its value and its text."""

    value: Any  # what YAML made of it (False for `no`, 83 for `0123`)
    text: str  # the characters in the file


@dataclass(frozen=True)
class Entry:
    """One `key: value` of a config file, in file order (repeats included)."""

    key: str  # as written, e.g. `--learning_rate`
    value: Any
    line: int | None = None  # 1-based; JSON gives none

    def where(self) -> str:
        return f"`{self.key}` (line {self.line})" if self.line else f"`{self.key}`"


class _Pairs(list):
    """A JSON object as its list of (key, value) pairs, so repeated keys stay visible."""


def _plain(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: fix CONFIG_PATH / --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None


def _json_entries(text: str) -> list[Entry] | None:
    data = json.loads(text, object_pairs_hook=_Pairs)
    if data is None:
        return None
    if not isinstance(data, _Pairs):
        raise TypeError(type(_plain(data)).__name__)
    return [Entry(str(k), _plain(v)) for k, v in data]


def _yaml_entries(text: str) -> list[Entry] | None:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if not isinstance(node, yaml.MappingNode):
            raise TypeError(type(loader.construct_document(node)).__name__)
        entries = []
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(loader.construct_object(key_node, deep=True))
            value = loader.construct_object(value_node, deep=True)
            # Only plain (unquoted) scalars are re-read by YAML 1.1's rules; "no" in quotes is already text.
            if isinstance(value_node, yaml.ScalarNode) and value_node.style is None and value is not None \
                    and not isinstance(value, str):
                value = Written(value, value_node.value)
            entries.append(Entry(key, value, key_node.start_mark.line + 1))
        return entries
    finally:
        loader.dispose()


def read_config_file(path: Path) -> list[Entry]:
    """The entries of a YAML or JSON config file, in order (raises ConfigError)."""
    text = _read_text(path)
    is_json = path.suffix.lower() == ".json"
    try:
        entries = _json_entries(text) if is_json else _yaml_entries(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if is_json else "YAML"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"config file {path} must hold a mapping of key: value, found a {exc}") from None
    return entries or []


# ---------------------------------------------------------------- config.env

_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclass(frozen=True)
class EnvLine:
    name: str
    value: str
    line: int
    expands: bool  # the shell would expand `$...` or backticks in this value


def _env_value(raw: str) -> tuple[str, bool]:
    """The value of one KEY=VALUE line as a shell would quote it (no expansion is done)."""
    raw = raw.strip()
    if raw[:1] == "'":
        end = raw.find("'", 1)
        if end < 0 or raw[end + 1:].strip()[:1] not in ("", "#"):
            raise ValueError("unterminated or trailing text after a single-quoted value")
        return raw[1:end], False
    if raw[:1] == '"':
        match = re.match(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?$', raw)
        if not match:
            raise ValueError("unterminated or trailing text after a double-quoted value")
        inner = match.group(1)
        return re.sub(r"\\(.)", r"\1", inner), bool(re.search(r"(?<!\\)[$`]", inner))
    value = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
    if re.search(r"\s", value):
        raise ValueError("unquoted value with spaces; quote it")
    return value, bool(re.search(r"[$`]", value))


def read_env_file(path: Path) -> tuple[list[EnvLine], list[str]]:
    """SimpleTuner's config.env as KEY=VALUE lines: (lines, problems). Nothing is executed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path} cannot be read: {exc}"]
    lines: list[EnvLine] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGNMENT.match(stripped)
        if not match:
            # The line itself is not echoed: it may hold a secret (`HF_TOKEN = hf_...`).
            problems.append(
                f"{path} line {number} is not a KEY=VALUE line (no spaces around `=`); config.env is read as "
                "plain assignments, not run as a shell script: write the value out or set it in the environment"
            )
            continue
        try:
            value, expands = _env_value(match.group(2))
        except ValueError as exc:
            problems.append(f"{path} line {number}: {match.group(1)}: {exc}")
            continue
        lines.append(EnvLine(match.group(1), value, number, expands))
    return lines, problems


# SimpleTuner's config.env names: those that mean a config key here, and launcher settings
# that mean nothing here (accepted, each reported once, so a SimpleTuner folder loads).
SIMPLETUNER_ENV_KEYS = {"TRAINING_NUM_PROCESSES": "num_processes", "MIXED_PRECISION": "mixed_precision"}
SIMPLETUNER_ENV_NO_EFFECT = {
    "TRAINING_DYNAMO_BACKEND": "torch.compile is not used",
    "ACCELERATE_EXTRA_ARGS": "the appliance launches its own workers (num_processes)",
    "CONFIG_BACKEND": "the config file's type comes from its extension",
    "ENV": "config environments are not used; point CONFIG_PATH at the config file",
    "SIMPLETUNER_ENV": "config environments are not used; point CONFIG_PATH at the config file",
    "SIMPLETUNER_LOG_LEVEL": "the log level is fixed", "ACCELERATE_LOG_LEVEL": "the log level is fixed",
    "DISABLE_UPDATES": "the appliance never updates itself", "TOKENIZERS_PARALLELISM": "set by the trainer",
    "TQDM_NCOLS": "progress bars are set by the trainer", "TQDM_LEAVE": "progress bars are set by the trainer",
    "TRAINING_NUM_MACHINES": "training runs on one machine",
}
# Names that change what the run reads or touches: honoured only from the real environment.
ENVIRONMENT_ONLY = ("WORKSPACE", "CONFIG_PATH", "HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE", "WANDB_MODE")
_SECRET = re.compile(r"(token|key|secret|password)$", re.IGNORECASE)


def settings_from_env_file(path: Path, applies: set[str] | frozenset[str], prefix: str) -> tuple[dict[str, str], list[str], list[str]]:
    """The config settings of a config.env: ({name: value}, problems, warnings).

    A name is applied when it is in ``applies`` or starts with ``prefix`` (SANA_); every other
    name is refused or reported, never silently dropped. Values are never echoed: a user may
    have put a secret in the file.
    """
    lines, problems = read_env_file(path)
    warnings: list[str] = []
    values: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for item in lines:
        name, where = item.name, f"{path} line {item.line}: {item.name}"
        if name in first_line:
            problems.append(f"{where} is given twice (first on line {first_line[name]}); keep one")
            continue
        first_line[name] = item.line
        if _SECRET.search(name):
            problems.append(f"{where}: secrets are never read from files; remove the line and pass {name} in "
                            f"the environment (docker run -e {name}=...)")
        elif name in ENVIRONMENT_ONLY:
            problems.append(f"{where}: set {name} in the container's environment (docker run -e {name}=...), "
                            "not in config.env")
        elif name == "TRAINING_NUM_MACHINES" and item.value.strip() not in ("", "1"):
            problems.append(f"{where}={item.value!r}: training runs on one machine; set it to 1 or remove it")
        elif name == "TRAINER_EXTRA_ARGS" and item.value.strip():
            problems.append(f"{where}: extra trainer arguments are not read from config.env; put those options in "
                            "config.json (or SANA_<KEY> lines)")
        elif name in applies or name.startswith(prefix):
            if item.expands:
                problems.append(f"{where}: the value uses shell expansion ($ or backticks), which is not done "
                                "here; write the value out")
            else:
                values[name] = item.value
        elif name in SIMPLETUNER_ENV_NO_EFFECT:
            # `TRAINING_NUM_MACHINES=1` and `TRAINING_DYNAMO_BACKEND=no` ask for what happens anyway.
            if (name, item.value.strip().lower()) not in {("TRAINING_NUM_MACHINES", "1"), ("TRAINING_DYNAMO_BACKEND", "no"),
                                                          ("TRAINING_NUM_MACHINES", ""), ("TRAINING_DYNAMO_BACKEND", "")}:
                warnings.append(f"{where} has no effect here: {SIMPLETUNER_ENV_NO_EFFECT[name]}")
        elif name != "TRAINER_EXTRA_ARGS":
            warnings.append(f"{where} is not applied: config.env sets config keys (SANA_<KEY>, PRESET, OUTPUT_DIR, "
                            f"DATALOADER_CONFIG, TRAINING_NUM_PROCESSES); pass {name} in the environment if you need it")
    return values, problems, warnings
