#!/usr/bin/env bash
# One node, 8 GPUs. --batch-size is per process; the lr is scaled by the global batch unless --unscale-lr.
# Usage: scripts/launch_8gpu.sh -c scripts/configs/deit_small_hard.yaml --data-path /data/imagenet
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/accelerate launch --config_file scripts/accelerate/8gpu.yaml main.py "$@"
