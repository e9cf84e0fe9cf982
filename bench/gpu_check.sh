#!/usr/bin/env bash
# The GPU check of issue 10 for a session that is lent a CUDA device (a few minutes):
#   1. install the project into the image's python3 (torch, transformers, peft, lightning and
#      timm already there; no downloads),
#   2. pytest -m gpu (the CUDA path reproduces the CPU measurement),
#   3. bench/gpu_check.py: ResNet-50 64 examples (every estimator + traces), ViT-B/16 and
#      BERT-base 16 examples (auto on a few layers), GPU-vs-CPU agreement on 4 examples; it prints
#      a short table last.
# GPU_CHECK_DRY=1 bench/gpu_check.sh runs steps 2-3 on the CPU with tiny sizes (checks the script;
# step 1 is skipped unless GPU_CHECK_INSTALL=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/hessfine_gpu_check}
if [[ -z "${GPU_CHECK_DRY:-}" || -n "${GPU_CHECK_INSTALL:-}" ]]; then
    "$PY" -m pip install --no-deps --no-build-isolation -e . >/dev/null
fi
"$PY" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
missing = [m for m in ("safetensors", "transformers", "torchvision", "scipy", "tqdm", "pytest")
           if importlib.util.find_spec(m) is None]
print("missing modules:", missing or "none")
PY
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [[ -z "${GPU_CHECK_DRY:-}" ]]; then
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests || echo "pytest -m gpu FAILED (continuing)"
else
    echo "dry run: pytest -m gpu skipped (no device)"
fi
rm -rf "$WORK"
"$PY" bench/gpu_check.py --work "$WORK" ${GPU_CHECK_DRY:+--dry}
