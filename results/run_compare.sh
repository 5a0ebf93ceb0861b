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
extra=()
case $name in
  digits) config=configs/digits_resnet18.yaml ;;
  # the default digits run at 16 px (a quarter of the FLOPs): what fitted the shared 2-core box
  digits16*) config=configs/digits_resnet18.yaml; extra=(--set input_size=16) ;;
  mnist) config=configs/mnist_resnet18.yaml; extra=(--set data_root=/work/shared/data/mnist) ;;
  *) echo "unknown comparison $name" >&2; exit 2 ;;
esac
runs=${RUNS:-runs/science}/$name
py=${PYTHON:-python}
common=(--config "$config" "${extra[@]}" --set backend=local --set cpu_threads=1 --out "$runs")
common+=(--quiet)
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
  $py results/plot_dynamics.py "results/$name" > "results/$name/dynamics.txt"
else
  $py -m edrop_ray compare "${common[@]}" --seeds "$what" --reuse "$@"
fi
