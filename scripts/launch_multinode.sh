#!/usr/bin/env bash
# Several nodes. Run on every node: MAIN_ADDR=<node 0 address> NODE_RANK=<0..N-1> scripts/launch_multinode.sh [flags]
# NUM_NODES (default 2) and GPUS_PER_NODE (default 8) set the world size.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MAIN_ADDR:?set MAIN_ADDR to node 0's address}" "${NODE_RANK:?set NODE_RANK}"
NUM_NODES=${NUM_NODES:-2}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec .venv/bin/accelerate launch --config_file scripts/accelerate/multinode.yaml \
  --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * GPUS_PER_NODE)) --machine_rank "$NODE_RANK" \
  --main_process_ip "$MAIN_ADDR" main.py "$@"
