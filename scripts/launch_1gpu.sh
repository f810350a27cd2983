#!/usr/bin/env bash
# One GPU. Usage: scripts/launch_1gpu.sh -c scripts/configs/vkd_deit_s.yaml --data-path /data/imagenet [more flags]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/accelerate launch --config_file scripts/accelerate/1gpu.yaml main.py "$@"
