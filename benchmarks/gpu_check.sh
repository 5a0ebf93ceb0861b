#!/usr/bin/env bash
# The GPU check: correctness of the CUDA path and its figures, in at most 5 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU, tiny sizes
#   DEVICE=cpu bash benchmarks/gpu_check.sh   # the same as --dry-run
#
# Python: $PYTHON if set, else .venv/bin/python of the repository if present, else `python`.
# Writes runs/gpu_check/gpu_check.json (every figure, the card's name) and prints one verdict
# line; exits 0 on PASS, 1 on FAIL. Extra arguments go to benchmarks/gpu_check.py (--help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python
fi
# the repository's own edrop_ray, whether or not it is installed in that environment
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

args=("$@")
if [[ "${DEVICE:-}" == "cpu" ]]; then
    args=(--dry-run "${args[@]}")
fi
exec "$PY" benchmarks/gpu_check.py "${args[@]}"
