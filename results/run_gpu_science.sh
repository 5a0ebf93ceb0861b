#!/usr/bin/env bash
# The comparisons and the population sweep on one GPU, all at once, within a deadline:
#   - the equal-compute comparison on the MNIST split (configs/mnist_resnet18.yaml), seeds 0-2;
#   - the same on digits at the default 32 px (configs/digits_resnet18.yaml), seeds 0-2;
#   - benchmarks/bench_population.py: S in 4..64, seeds 0-2, on the default config.
# Every arm of the comparisons runs, the paper's schedule included. Each seed is one process; they
# share the GPU (small models leave most of it idle). What has not finished DEADLINE_S seconds
# after the start is stopped; the summaries then cover the seeds that finished and say so.
#
#   MNIST_ROOT=/path/holding/MNIST/raw results/run_gpu_science.sh [OUT]
#
# OUT (default runs/gpu_science) gets the runs and one log per process; the summaries go to
# results/<name>_gpu/. To check the plumbing on a CPU with tiny sizes:
#   DEVICE=cpu SEEDS="0" SIZES=4 EXTRA="--set epochs=1 --set input_size=8" \
#     results/run_gpu_science.sh runs/gpu_science_dry
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_science}
deadline=${DEADLINE_S:-480}
export PYTHON=${PYTHON:-python3} RUNS=$out/runs EDROP_RAY_CACHE=$out/cache
mkdir -p "$out"
arms=dense,edropout,magnitude,random,random-mask,edropout-s4,frozen-first-gen,paper-schedule
seeds=${SEEDS:-0 1 2}
read -ra extra <<<"${EXTRA:-}"
gpu=(--set "device=${DEVICE:-cuda}" --set cpu_threads=2 "${extra[@]}" --arms "$arms")
sets=(--set "device=${DEVICE:-cuda}" --set cpu_threads=2 "${extra[@]}")
# timeout signals its whole process group: the compare processes go with their script
stop=(timeout -s KILL "$deadline")
for s in $seeds; do
  "${stop[@]}" results/run_compare.sh mnist "$s" "${gpu[@]}" >"$out/mnist_seed$s.log" 2>&1 &
  "${stop[@]}" results/run_compare.sh digits "$s" "${gpu[@]}" >"$out/digits_seed$s.log" 2>&1 &
done
pop=(--sizes "${SIZES:-4,8,16,32,64}" --seeds "${seeds// /,}" "${sets[@]}" --out "$out/population")
"${stop[@]}" "$PYTHON" benchmarks/bench_population.py "${pop[@]}" --jobs 4 \
  --timeout-s $((deadline - 30)) >"$out/population.log" 2>&1 &
wait
# bench_population writes its summary even when runs are missing; make sure it exists
[[ -f $out/population/population.md ]] ||
  "$PYTHON" benchmarks/bench_population.py "${pop[@]}" --summary-only >>"$out/population.log" 2>&1
for name in mnist digits; do
  RESULTS_NAME=${name}_gpu results/run_compare.sh "$name" summary "${gpu[@]}" \
    >"$out/${name}_summary.log" 2>&1 || echo "summary of $name failed: see $out/${name}_summary.log"
done
for log in "$out"/*.log; do echo "== $log"; tail -n 3 "$log"; done
