#!/usr/bin/env bash
# The GPU checks and benchmarks, as one script for a lent GPU machine (the device tool's `run`):
#   bash scripts/gpu_checks.sh                # logs under $OUT (or /tmp/gpu-checks), a summary last
# 1. the Pallas kernels' tests compiled for the GPU (no interpreter): masked merge, fused TIES route,
#    disjoint merge, MoE grouped matmul; 2. `bench_kernels.py --fused` (bandwidth, fraction of peak);
# 3. `bench_sweep.py --platform default` (batched sweep vs loop); 4. `bench_kernels.py` (MoE tokens/s);
# 5. `bench_methods.py` (every method vs task arithmetic); 6. `bench_pallas.py`; `sweepwarm` (not in the
# default list): the sweep with a warm compile cache.
# Each step has its own time limit so one slow step cannot eat the lease; the demo's trained models are
# read from .gpu/demo when carried there (else the sweep step trains them first). To carry them:
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/demo; cp ~/.cache/jmerge/demo/*.npz .gpu/demo/
# and name .gpu in the device call's carry list (about 20 MB).
# GPU_CHECKS_SMALL=1 runs every step at toy sizes (a dry run of the script on CPU). Figures: README.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JMERGE_COMPILE_CACHE=/tmp/jmerge-gpu-xla
PY=${PY:-python3}
SMALL=${GPU_CHECKS_SMALL:-}
if [ -d .gpu/demo ]; then  # the demo's trained models, carried (never overwrite a cache that is there)
  mkdir -p ~/.cache/jmerge/demo
  for f in .gpu/demo/*.npz; do [ -e ~/.cache/jmerge/demo/"${f##*/}" ] || cp "$f" ~/.cache/jmerge/demo/; done
fi
declare -a SUMMARY

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ds' "$name" "$rc" $((SECONDS - t0)))")
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  $PY -c 'import sys, jax, jaxlib, flax, optax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/env.log"

# Steps (default: all, in this order); name some to run only those: bash scripts/gpu_checks.sh moe methods
STEPS=${*:-tests fused sweep moe methods pallas}
NON_SVD="task_arithmetic arcee_fusion breadcrumbs breadcrumbs_ties consensus_ta consensus_ties dare_linear dare_ties \
della della_linear emr karcher lines magmax model_stock multislerp nuslerp pcb ram sce slerp ties ties_global"
for s in $STEPS; do
  if [ -n "$SMALL" ]; then case $s in
    tests) step tests 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_pallas.py tests/test_masked_merge_kernel.py -k "not slow" ;;
    fused) step fused 120 $PY scripts/bench_kernels.py --fused --models 2 --repeat 1 ;;
    sweep) step sweep 300 $PY scripts/bench_sweep.py --platform cpu --no-scaling --settings 4 --eval-images 16 ;;
    moe) step moe 120 $PY scripts/bench_kernels.py --sizes small --repeat 1 ;;
    methods) step methods 200 $PY scripts/bench_methods.py --params 2e6 --methods task_arithmetic ties --repeat 1 ;;
    pallas) step pallas 60 $PY scripts/bench_pallas.py --n 4096 --interpret ;;
  esac; else case $s in
    # compiled kernels' tests, 8 processes on the one GPU (no preallocation); failures printed short
    tests) step tests 150 $PY -m pytest -q -n 8 -p no:cacheprovider -o addopts="" --tb=short tests/test_masked_merge_kernel.py \
      tests/test_ties_fused.py tests/test_pallas.py tests/test_moe_kernel.py ;;
    # chosen tests only: RETEST="tests/a.py::t[x] tests/b.py" bash scripts/gpu_checks.sh retest
    retest) step retest 110 $PY -m pytest -q -n 8 -p no:cacheprovider -o addopts="" --tb=short ${RETEST:-} ;;
    fused) step fused 100 $PY scripts/bench_kernels.py --fused ;;
    sweep) step sweep 110 $PY scripts/bench_sweep.py --platform default --no-scaling ;;
    sweepwarm) step sweepwarm 150 $PY scripts/bench_sweep.py --platform default --warm-only ;;
    moe) step moe 75 $PY scripts/bench_kernels.py --sizes all ;;
    methods) step methods 90 $PY scripts/bench_methods.py --params 100e6 --repeat 3 --methods $NON_SVD ;;
    pallas) step pallas 25 $PY scripts/bench_pallas.py ;;
  esac; fi
done
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.log"
