#!/usr/bin/env bash
# Sets up vitkd on a bare machine: a virtual env in .venv with requirements.txt, and the Fashion-MNIST files
# (Debian's dataset-fashion-mnist) that the embedded default trains on. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, timm, accelerate, huggingface_hub, safetensors, einops, yaml, matplotlib" 2>/dev/null \
   || [ requirements.txt -nt .venv/.requirements-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -r requirements.txt
  touch .venv/.requirements-installed
fi
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install Debian's dataset-fashion-mnist; the embedded default needs it (or --data-path)" >&2
fi
