#!/usr/bin/env bash
# One vitkd run over several machines: run this on every node, with the same flags, e.g.
#   MAIN_ADDR=10.0.0.1 NODE_RANK=0 scripts/launch_multinode.sh --data-path /data/imagenet --output-dir /nfs/runs/run1
#   MAIN_ADDR=10.0.0.1 NODE_RANK=1 scripts/launch_multinode.sh --data-path /data/imagenet --output-dir /nfs/runs/run1
# Environment:
#   MAIN_ADDR       node 0's address (reachable from every node)       NODE_RANK  this node, 0 .. NUM_NODES-1
#   NUM_NODES       number of machines (default 2)                      MAIN_PORT  rendezvous port (default 29500)
#   PROCS_PER_NODE  processes per machine (default 8: one per GPU)
#   CPU=1           CPU nodes (gloo; one process per node is the sensible choice)
#   DRY_RUN=1       print the accelerate command instead of running it
# --batch-size is per process: the global batch is NUM_NODES x PROCS_PER_NODE x --batch-size. --output-dir must be on
# a filesystem every node sees (checkpoints, --resume auto); see README "Several machines" for the caches.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MAIN_ADDR:?set MAIN_ADDR to node 0\'s address}" "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1)}"
NUM_NODES=${NUM_NODES:-2}; PROCS_PER_NODE=${PROCS_PER_NODE:-8}; MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
cmd=("$ACCELERATE" launch --config_file scripts/accelerate/multinode.yaml --multi_gpu
     --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * PROCS_PER_NODE)) --machine_rank "$NODE_RANK"
     --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
if [[ "${CPU:-0}" == 1 ]]; then
  # accelerate's --cpu runs one plain process per launch (an MPI job); torchrun's rendezvous (--multi_gpu) with
  # ACCELERATE_USE_CPU=1 forms the gloo group across the nodes instead.
  export ACCELERATE_USE_CPU=1
  cmd+=(--mixed_precision no --dynamo_backend no)
fi
cmd+=(main.py "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  [[ "${CPU:-0}" == 1 ]] && printf 'ACCELERATE_USE_CPU=1 '
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
