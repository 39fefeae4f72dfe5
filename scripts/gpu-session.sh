#!/usr/bin/env bash
# The issue-14 GPU run, on a lent device machine, in one call (sana_appliance/benchmarks/README.md):
#   here:   bash scripts/fetch-gpu-wheels.sh
#   device: run(command="bash scripts/gpu-session.sh", carry=[".whl"], timeout_s=590)
# The appliance benchmark first (every preset at real size, ~8 min); the step microbenchmark after it only
# if time is left. Results land in $OUT (appliance.json, gpu.json, the logs).
set -uo pipefail
out="${OUT:-/tmp/gpu-session}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import diffusers, bitsandbytes, optimi, sana_appliance; print('imports ok')" 2>&1 | tee "$out/imports.log"
timeout 500 python3 -m sana_appliance.benchmarks.appliance --out "$out/appliance.json" --root /tmp/bench 2>&1 \
  | tee "$out/appliance.log"
left=$((570 - SECONDS))
if [ "$left" -gt 60 ]; then
  timeout "$left" python3 -m sana_appliance.benchmarks.gpu --out "$out/gpu.json" --peak-tflops 989 2>&1 | tee "$out/gpu.log"
fi
