"""Test-only probes for training workers: a `sitecustomize.py` put on PYTHONPATH that wraps methods of
`sana_appliance.run.train.Run` when that module is imported, so a test can see what each rank holds (only
rank 0 writes outputs). No hook lives in the package; the probe is active only while its variable is set."""

from __future__ import annotations

import textwrap

_HEADER = """import importlib.abc, importlib.util, json, os, sys
from pathlib import Path

"""

_FINDER = """

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sana_appliance.run.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("{variable}"):
    sys.meta_path.insert(0, _Finder())
"""


def sitecustomize(patch: str, variable: str) -> str:
    """The probe's source: `patch` defines `_patch(module)` (it receives sana_appliance.run.train), applied
    in every process where the environment variable `variable` is set."""
    return _HEADER + textwrap.dedent(patch).strip() + "\n" + _FINDER.replace("{variable}", variable)
