#!/usr/bin/env bash
# The issue-14 GPU run, on a lent device machine, in one call (sana_appliance/benchmarks/README.md):
#   here:   bash scripts/fetch-gpu-wheels.sh
#   device: run(command="bash scripts/gpu-session.sh", carry=[".whl"], timeout_s=590)
# The optimizer rounding benchmark (~1 min), the appliance benchmark (every preset at real size; estimated 5-8 min on
# an H200, not yet measured); the step microbenchmark after them only if time is left. Results land in $OUT
# (rounding.json, appliance.json, gpu.json, the logs).
set -uo pipefail
out="${OUT:-/tmp/gpu-session}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# Real imports (diffusers loads lazily): a missing or mismatched wheel ends the call here, not minutes in.
python3 -c "from diffusers import SanaPipeline, AutoencoderDC; from transformers import Gemma2Model
import bitsandbytes, optimi, tenacity, huggingface_hub, peft, lycoris, sana_appliance.run.train
print('imports ok: huggingface_hub', huggingface_hub.__version__)" > "$out/imports.log" 2>&1 || { cat "$out/imports.log"; exit 4; }
df -h /tmp > "$out/disk.txt" 2>&1
# The faithful 8-bit Lion against the bare one on all of Sana 1.6B's shapes (about a minute), then the presets.
timeout 100 python3 -m sana_appliance.benchmarks.rounding --out "$out/rounding.json" 2>&1 | tee "$out/rounding.log"
timeout $((520 - SECONDS)) python3 -m sana_appliance.benchmarks.appliance --out "$out/appliance.json" --root /tmp/bench \
  --log "$out/runs.log" --preset-timeout 100 2>&1 | tee "$out/appliance.log"
left=$((570 - SECONDS))
if [ "$left" -gt 60 ]; then
  timeout "$left" python3 -m sana_appliance.benchmarks.gpu --out "$out/gpu.json" --peak-tflops 989 2>&1 | tee "$out/gpu.log"
fi
