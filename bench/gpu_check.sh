#!/usr/bin/env bash
# The GPU check for a session that is lent a CUDA device (issue 16 item 5), in priority order;
# each step writes its result under $OUT as soon as it finishes and has a time limit of its own,
# so a run cut short keeps what it measured:
#   0. install the project into the image's python3 (torch, transformers, peft already there;
#      no downloads);
#   1. pytest -m gpu (1_pytest_gpu.txt), then GPU-vs-CPU agreement on 4 examples for ResNet-50,
#      ViT-B/16 and BERT-base (1_agreement.json);
#   2. GPT-2-small LoRA, 16 × 128 tokens: ggn, block, auto (2_gpt2_lora.json);
#   3. BERT-base, 16 × 128: ggn, auto (3_bert.json);
#   4. GPT-2-medium LoRA, 256 sequences: ggn, block (4_gpt2_medium_lora.json);
#   5. LLaMA-shaped LoRA (q/v), 16 sequences, ggn: 1b, then 3b, then 7b while each fits
#      (5_llama_SIZE.json).
# bench/transformers_cost.py does the timing (forward units per layer, the unit a synchronised
# forward on the device) and records peak host memory; measurement.json records the GPU peak.
# GPU_CHECK_DRY=1 bench/gpu_check.sh runs every step on the CPU with tiny configurations (checks
# the script; the install is skipped unless GPU_CHECK_INSTALL=1).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/hessfine_gpu_out}
WORK=${GPU_CHECK_WORK:-/tmp/hessfine_gpu_check}
mkdir -p "$OUT"
if [[ -z "${GPU_CHECK_DRY:-}" || -n "${GPU_CHECK_INSTALL:-}" ]]; then
    "$PY" -m pip install --no-deps --no-build-isolation -e . >/dev/null
fi
"$PY" - <<'PY' | tee "$OUT/0_environment.txt"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
missing = [m for m in ("safetensors", "transformers", "peft", "torchvision", "scipy", "pytest")
           if importlib.util.find_spec(m) is None]
print("missing modules:", missing or "none")
PY
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [[ -n "${GPU_CHECK_DRY:-}" ]]; then
    DEVICE=cpu SIZES="--tiny --samples 2 --examples 4"
    echo "dry run: pytest -m gpu skipped (no device)" >"$OUT/1_pytest_gpu.txt"
else
    DEVICE=cuda SIZES=""
    timeout 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/1_pytest_gpu.txt" 2>&1
    echo "pytest -m gpu: exit $?" >>"$OUT/1_pytest_gpu.txt"
fi
rm -rf "$WORK"
timeout 90 "$PY" bench/gpu_check.py --work "$WORK" --agreement-only --rows "$OUT/1_agreement.json" \
    ${GPU_CHECK_DRY:+--dry} || echo "agreement: exit $?"
cost() {  # cost SECONDS NAME ARGS...: one transformers_cost.py run, its result in $OUT/NAME.json
    local limit=$1 name=$2
    shift 2
    timeout "$limit" "$PY" bench/transformers_cost.py --device "$DEVICE" --threads 8 \
        --root "$WORK/models" --out "$OUT/$name.json" "$@" $SIZES >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status"
    return $status
}
cost 150 2_gpt2_lora --model gpt2-lora --estimators ggn block auto --samples 16
cost 90 3_bert --model bert --estimators ggn auto --samples 16
cost 120 4_gpt2_medium_lora --model gpt2-medium-lora --estimators ggn block --samples 256 \
    --examples 256
for size in 1b 3b 7b; do
    cost 150 "5_llama_$size" --model llama-lora --llama-size "$size" --estimators ggn \
        --samples 16 || break
done
ls -l "$OUT"
