"""Benchmark scripts: each prints numbers (they are measurements, not timed tests).

Run one with ``python -m sana_appliance.benchmarks.NAME --help``; README.md in this
folder lists them and the numbers measured so far.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj) -> None:
    """Results files are read by scripts and CI: written whole or not at all (temp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
