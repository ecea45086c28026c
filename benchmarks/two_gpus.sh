#!/usr/bin/env bash
# Issue #16 parts 5-6 on a two-GPU machine: results as JSON + logs in $OUT (summary.json).
# On the GPU machine, from the repository root, with .whl/site-cp312.tar.xz carried
# (made here by `bash benchmarks/pack_site.sh`: Ray Serve, FastAPI, pydantic, transformers 5.24):
#   OUT=$OUT bash benchmarks/two_gpus.sh                      # checkpoint, serve 2 vs 1, eval
#   OUT=$OUT bash benchmarks/two_gpus.sh --stages checkpoint,split
# On a CPU (the same steps, tiny model, replicas of 0 GPUs, short load):
#   OUT=/tmp/two_gpus bash benchmarks/two_gpus.sh --tiny
# Options after the first are benchmarks/two_gpus.py's.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
start=$SECONDS
tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
archive=${SITE_ARCHIVE:-.whl/site-$tag.tar.xz}
if [ -f "$archive" ]; then
  mkdir -p /tmp/site && tar -xJf "$archive" -C /tmp/site
  echo "unpacked $archive into /tmp/site in $((SECONDS - start)) s"
  export PYTHONPATH=/tmp/site
else
  echo "no $archive: using the installed packages"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false
# The machine's rule: no NVLink multicast (kept for every process started from here).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 benchmarks/two_gpus.py --out "$OUT" "$@" 2>&1 | tee "$OUT/two_gpus.log"
code=${PIPESTATUS[0]}
echo "two_gpus.sh: exit $code after $((SECONDS - start)) s"
exit "$code"
