#!/usr/bin/env bash
# The Python packages the lent GPU machine's image lacks (or has in a version the appliance cannot use), as
# wheels in .whl/ for scripts/gpu-session.sh; the versions are requirements.lock's. Run here, in the checkout.
# transformers travels too: the image's 5.17 asks for huggingface_hub<2, and the appliance needs 2.x (with httpx2).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pin() { grep -i "^$1==" requirements.lock; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "$(pin diffusers)" "$(pin bitsandbytes)" "$(pin torch-optimi)" "$(pin tenacity)" "$(pin transformers)" \
  "$(pin huggingface_hub)" "$(pin httpx2)" "$(pin httpcore2)" "$(pin truststore)" "$(pin click)" "$(pin peft)" \
  "$(pin lycoris-lora)" "$(pin einops)" "$(pin toml)"
du -sh .whl
