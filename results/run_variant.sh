#!/usr/bin/env bash
# One EDropout variant, one `edrop-ray prune` per seed, beside a finished comparison:
#   results/run_variant.sh digits16 energy_bn=batch 0 1 2
#   results/run_variant.sh digits16 evolve_every=1,population_size=16 0 1 2   (several keys)
#   EXTRA="--set device=cuda" results/run_variant.sh mnist lr_schedule=cosine 0 1 2
# Comparisons: digits16 (16 px), digits (the default 32 px), mnist (MNIST_ROOT, default
# ../shared/data/mnist). EXTRA holds more --set arguments for every run (after the defaults).
# writes $RUNS/<name>-<key>-<value>/seed<N>/; results/variant_table.py compares it with the
# comparison's EDropout and random-mask rows (the dense baseline comes from the same cache).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; setting=$2; shift 2
case $name in
  digits16) args=(--config configs/digits_resnet18.yaml --set input_size=16) ;;
  digits) args=(--config configs/digits_resnet18.yaml) ;;
  mnist) args=(--config configs/mnist_resnet18.yaml
               --set "data_root=${MNIST_ROOT:-../shared/data/mnist}") ;;
  *) echo "unknown comparison $name" >&2; exit 2 ;;
esac
runs=${RUNS:-runs/science}/$name-${setting//[=,]/-}
sets=()
IFS=, read -ra pairs <<< "$setting"
for pair in "${pairs[@]}"; do sets+=(--set "$pair"); done
read -ra extra <<<"${EXTRA:-}"
py=${PYTHON:-python}
for seed in "$@"; do
  $py -m edrop_ray prune "${args[@]}" --set backend=local --set cpu_threads=1 --set seed="$seed" \
    "${extra[@]}" "${sets[@]}" --out "$runs/seed$seed" --quiet
done
