#!/usr/bin/env bash
# Every GPU benchmark of BENCHMARKS.md in one go (one machine lease): results as JSON + logs in $OUT.
# Usage on the GPU machine, from the repository root:
#   OUT=results bash benchmarks/gpu_suite.sh [pruning pruning8 attention attention_host decoding step opera serving]
#   (default: pruning attention decoding opera)
# serving compares the engine with the pre-engine code: it needs a checkout of that commit in
# $SERVING_BASE (default .bench_base, e.g. `git worktree add .bench_base 5e3c667`).
# Wheels the GPU image lacks (pydantic, transformers 5.23) may be carried in .whl/.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The KV cache grows by one column per step (transformers' DynamicCache concatenates). Without
# expandable segments, the first run at each new length pays fresh cudaMalloc calls: measured
# 58-68 ms/token on a first run vs 24-28 ms on a repeat of the same run. Same setting for every
# implementation compared (ours, transformers' generate, naive loops).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "Warning|warn\(" | tail -40
}
for name in ${@:-pruning attention decoding opera}; do
  case $name in
    pruning) run pruning "${PRUNING_S:-120}" python3 benchmarks/pruning.py --out "$OUT/pruning.json" ;;
    pruning8) run pruning8 "${PRUNING_S:-120}" python3 benchmarks/pruning.py --batch 8 --out "$OUT/pruning8.json" ;;
    attention) run attention "${ATTENTION_S:-420}" python3 benchmarks/attention.py --out "$OUT/attention.json" ;;
    attention_host) run attention_host "${ATTENTION_S:-180}" python3 benchmarks/attention_host.py ;;
    decoding) run decoding "${DECODING_S:-330}" python3 benchmarks/decoding.py --out "$OUT/decoding.json" ;;
    step) run step "${STEP_S:-590}" python3 benchmarks/step.py --out "$OUT/step.json" ;;
    opera) run opera "${OPERA_S:-300}" python3 benchmarks/opera.py --out "$OUT/opera.json" ;;
    serving) run serving "${SERVING_S:-590}" python3 benchmarks/serving.py --engine both --baseline-path "${SERVING_BASE:-.bench_base}" --out "$OUT/serving.json" ;;
    *) echo "unknown benchmark $name"; exit 2 ;;
  esac
done
