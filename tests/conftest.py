"""Shared fixtures: a workspace whose tiny model, demo dataset and caches are reused across
end-to-end tests (each test writes its own OUTPUT_DIR), and a helper that runs the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANTED_TOKEN = "hf_plantedSECRETtoken1234567890"

# A short demo: 16 steps, checkpoints and validation every 8.
SHORT_DEMO = {
    "SANA_MAX_TRAIN_STEPS": "16",
    "SANA_CHECKPOINTING_STEPS": "8",
    "SANA_VALIDATION_STEPS": "8",
    "SANA_DATALOADER_NUM_WORKERS": "0",
}


def cli_env(workspace: Path, output: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANA_") and k not in ("PRESET", "CONFIG_PATH")}
    env.update(WORKSPACE=str(workspace), OUTPUT_DIR=str(output), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_TOKEN=PLANTED_TOKEN, PYTHONUNBUFFERED="1", **SHORT_DEMO)
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def shared_workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")

# The data-parallel runs (test_multinode, test_fsdp): 16 steps, a checkpoint every 4, no validation.
STEPS = {"SANA_MAX_TRAIN_STEPS": "16", "SANA_CHECKPOINTING_STEPS": "4", "SANA_VALIDATION_STEPS": "0"}
# Stated tolerance: 2 processes x batch 4 against 1 process x batch 8, final weights after 16 steps
# (float32 on CPU; the all-reduce sums in another order). Measured: max |diff| about 1e-5.
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def reference(shared_workspace, tmp_path_factory) -> Path:
    """One process, batch 8 (the global batch of 2 x 4), 16 steps: what data parallel must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    done = run_cli(cli_env(shared_workspace, out, **STEPS, SANA_TRAIN_BATCH_SIZE="8"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def demo_run(shared_workspace):
    """The short demo, run once through the real CLI; several tests inspect its outputs."""
    output = shared_workspace / "out-reference"
    result = run_cli(cli_env(shared_workspace, output))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result
