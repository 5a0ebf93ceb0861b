#!/usr/bin/env bash
# EDropout variants on one GPU, all at once, within a deadline: every variant x comparison x seed
# is one `edrop-ray prune` (results/run_variant.sh), JOBS at a time. Compare each with the
# comparison of results/run_gpu_science.sh afterwards:
#   python results/variant_table.py RUNS/mnist RUNS/mnist-lr_schedule-cosine lr_schedule=cosine
#
#   MNIST_ROOT=/path/holding/MNIST/raw results/run_gpu_variants.sh [OUT] [variant ...]
#
# OUT (default runs/gpu_variants) gets the runs (OUT/runs/<comparison>-<variant>/seed<N>) and
# one log per run; the variants default to the list below.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_variants}
shift || true
variants=("$@")
[[ ${#variants[@]} -gt 0 ]] || variants=(
  energy_source=heldout warmup_steps=30 lr_schedule=cosine bn_recalibrate=20
)
deadline=${DEADLINE_S:-150}
export PYTHON=${PYTHON:-python3} RUNS=$out/runs EDROP_RAY_CACHE=$out/cache
export EXTRA="--set device=${DEVICE:-cuda} --set cpu_threads=2 ${EXTRA:-}"
mkdir -p "$out/logs"
jobs_list=()
for name in ${COMPARISONS:-mnist digits}; do  # the first comparison's runs start first
  for v in "${variants[@]}"; do
    for s in ${SEEDS:-0 1 2}; do jobs_list+=("$name $v $s"); done
  done
done
printf '%s\n' "${jobs_list[@]}" |
  timeout -s KILL "$deadline" xargs -P "${JOBS:-8}" -L 1 bash -c \
    'results/run_variant.sh "$0" "$1" "$2" >"'"$out"'/logs/$0-${1//[=,]/-}-$2.log" 2>&1 || echo "failed: $0 $1 $2"'
ls "$RUNS"/*/seed*/report.json 2>/dev/null | wc -l | xargs echo "finished runs:"
