#!/usr/bin/env bash
# Two CPU processes on this machine (DDP over gloo), e.g. the embedded default: scripts/launch_cpu2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATE_USE_CPU=1 exec .venv/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no --main_process_port 0 main.py "$@"
