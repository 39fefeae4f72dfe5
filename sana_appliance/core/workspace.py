"""What every room may know about the run's surroundings: the workspace layout, the secrets and
the Hub settings read from the environment, and redaction of secrets.

The bottom of the package: it imports nothing from it. Config resolution (config.resolve) fills
these in; downloads, uploads, data and the run read them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET_NAME = re.compile(r"(token|key|secret|password)$", re.IGNORECASE)


@dataclass(frozen=True)
class Workspace:
    """The volume layout: everything the appliance reads and writes lives under root."""

    root: Path
    hf_home: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path


@dataclass(frozen=True)
class Credentials:
    """Secrets from the environment. Never printed, saved or uploaded."""

    hf_token: str | None = field(default=None, repr=False)
    wandb_api_key: str | None = field(default=None, repr=False)
    hf_token_source: str | None = None  # which variable held the token (HF_TOKEN or HUGGING_FACE_HUB_TOKEN), for messages

    def values(self) -> list[str]:
        return [v for v in (self.hf_token, self.wandb_api_key) if v]


@dataclass(frozen=True)
class HubSettings:
    endpoint: str | None = None
    offline: bool = False
    wandb_mode: str | None = None
    retry_window_s: float = 300.0  # hub_retry_window_s, filled in once the config is resolved


def redact(obj: Any, secret_values: Sequence[str]) -> Any:
    """Replace secret-named keys and any occurrence of a known secret value."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if SECRET_NAME.search(str(k)) and v else redact(v, secret_values))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v, secret_values) for v in obj]
    if isinstance(obj, str):
        for secret in secret_values:
            if secret and len(secret) >= 4 and secret in obj:
                obj = obj.replace(secret, "<redacted>")
    return obj
