#!/usr/bin/env bash
# The equal-compute comparisons of results/: one seed per process (two run at once on 2 cores),
# then one --reuse call that only summarises the finished seeds.
#   results/run_compare.sh digits 0        # one seed of the digits comparison
#   results/run_compare.sh digits summary  # results/digits/compare.{json,md}, plot
#   results/run_compare.sh mnist 1
# Extra arguments after the seed are passed on (e.g. --set energy_bn=batch --arms random-mask).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; what=$2; shift 2
case $name in
  digits) config=configs/digits_resnet18.yaml ;;
  mnist) config=configs/mnist_resnet18.yaml ;;
  *) config=configs/${name%%-*}_resnet18.yaml ;;
esac
runs=${RUNS:-runs/science}/$name
py=${PYTHON:-python}
common=(--config "$config" --set backend=local --set cpu_threads=1 --out "$runs" --quiet)
if [[ $what == summary ]]; then
  seeds=$(ls -d "$runs"/seed*/compare.json | sed 's|.*/seed\([0-9]*\)/.*|\1|' | sort -n | paste -sd,)
  $py -m edrop_ray compare "${common[@]}" --seeds "$seeds" --reuse "$@"
  mkdir -p "results/$name"
  cp "$runs/compare.json" "$runs/compare.md" "$runs/accuracy_vs_params.png" "results/$name/"
  for s in ${seeds//,/ }; do  # each seed's table and the EDropout run's dynamics
    mkdir -p "results/$name/seed$s"
    cp "$runs/seed$s/compare.md" "$runs/seed$s/compare.json" "results/$name/seed$s/"
    cp "$runs/seed$s/edropout/history.parquet" "$runs/seed$s/edropout/report.json" \
      "results/$name/seed$s/"
  done
else
  $py -m edrop_ray compare "${common[@]}" --seeds "$what" --reuse "$@"
fi
