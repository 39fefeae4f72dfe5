"""Named presets: YAML files in presets/ with a description, target hardware and values."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hardware: str
    memory: str
    values: dict[str, Any]
    path: Path
    choose: str = ""  # when to pick it over its neighbours (`sana-appliance presets` prints it)


def presets_dir() -> Path:
    """presets/ beside the package in a checkout, or the copy packaged inside the wheel."""
    packaged = Path(str(resources.files("sana_appliance"))) / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "presets"


def available(directory: Path | None = None) -> list[str]:
    directory = directory or presets_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load(name: str, directory: Path | None = None) -> Preset:
    directory = directory or presets_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        names = available(directory)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ConfigError(
            f"PRESET={name!r}: no such preset{hint} Available: {', '.join(names)}"
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    meta = data.get("meta", {})
    values = data.get("config", {}) or {}
    assert isinstance(values, dict), f"{path}: `config` must be a mapping"
    return Preset(
        name=name,
        description=str(meta.get("description", "")),
        hardware=str(meta.get("hardware", "")),
        memory=str(meta.get("memory", "")),
        values=values,
        path=path,
        choose=str(meta.get("choose", "")),
    )
