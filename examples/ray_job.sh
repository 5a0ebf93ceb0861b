#!/usr/bin/env bash
# Prune your own network on a Ray cluster: the model and the data set are functions of your own,
# named by import path (package.module:callable), in the folder that `--working-dir .` uploads.
# Run it from the repository root (examples/user_model.py is the example).
#
#   RAY_ADDRESS=http://HEAD:8265 bash examples/ray_job.sh
#   RAY_ADDRESS=http://HEAD:8265 bash examples/ray_job.sh --set epochs=1 --out runs/quick
#   (arguments are passed on to `edrop-ray prune`, after the ones below: they win)
#
# make(num_classes=..., in_channels=...) returns the nn.Module; digits() returns (train, test).
# Their inputs are 8x8, hence input_size=8. Add --set init_weights=weights.pt (a state_dict file
# inside the working dir, path relative to it) to start from trained weights.
set -euo pipefail

ray job submit --working-dir . -- \
    python -m edrop_ray prune \
        --set model=examples.user_model:make \
        --set dataset=examples.user_model:digits \
        --set input_size=8 \
        --set epochs=5 \
        --set backend=ray \
        --out runs/user-model \
        "$@"
