#!/usr/bin/env bash
# The equal-compute comparisons of results/: one seed per process (two run at once on 2 cores),
# then one --reuse call that only summarises the finished seeds.
#   results/run_compare.sh digits 0        # one seed of the digits comparison
#   results/run_compare.sh digits summary  # results/digits/compare.{json,md}, plot
#   results/run_compare.sh mnist 1
# Extra arguments after the seed are passed on (e.g. --set energy_bn=batch --arms random-mask).
# RUNS (default runs/science) holds the runs; RESULTS_NAME (default the comparison's name) names
# the folder of results/ that the summary writes.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; what=$2; shift 2
extra=()
case $name in
  digits) config=configs/digits_resnet18.yaml ;;
  # the default digits run at 16 px (a quarter of the FLOPs): what fitted the shared 2-core box
  digits16*) config=configs/digits_resnet18.yaml; extra=(--set input_size=16) ;;
  mnist) config=configs/mnist_resnet18.yaml; extra=(--set data_root=${MNIST_ROOT:-../shared/data/mnist}) ;;
  *) echo "unknown comparison $name" >&2; exit 2 ;;
esac
runs=${RUNS:-runs/science}/$name
py=${PYTHON:-python}
common=(--config "$config" "${extra[@]}" --set backend=local --set cpu_threads=1 --out "$runs")
common+=(--quiet)
if [[ $what == summary ]]; then
  # the seeds whose comparison finished (a run stopped midway leaves only its staging folder)
  seeds=$(for d in "$runs"/seed*; do
    [[ $d =~ /seed([0-9]+)$ && -f $d/compare.json ]] && echo "${BASH_REMATCH[1]}"
  done | sort -n | paste -sd,)
  [[ -n $seeds ]] || { echo "no finished seed in $runs" >&2; exit 1; }
  $py -m edrop_ray compare "${common[@]}" --seeds "$seeds" --reuse "$@"
  dest=results/${RESULTS_NAME:-$name}
  mkdir -p "$dest"
  cp "$runs/compare.json" "$runs/compare.md" "$runs/accuracy_vs_params.png" "$dest/"
  for s in ${seeds//,/ }; do  # each seed's table and the EDropout run's dynamics
    mkdir -p "$dest/seed$s"
    cp "$runs/seed$s/compare.md" "$runs/seed$s/compare.json" "$dest/seed$s/"
    cp "$runs/seed$s/edropout/history.parquet" "$runs/seed$s/edropout/report.json" "$dest/seed$s/"
  done
  $py results/plot_dynamics.py "$dest" > "$dest/dynamics.txt"
else
  $py -m edrop_ray compare "${common[@]}" --seeds "$what" --reuse "$@"
fi
