#!/usr/bin/env bash
# Sets up vitkd on a bare machine: a virtual env in .venv with requirements.txt and vitkd itself installed editable
# (`pip install -e .`: the `vitkd` command, edits to the checkout take effect at once), and the Fashion-MNIST files
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
# The editable install builds with the venv's own setuptools (--no-build-isolation: no download once it is there,
# so a set-up machine can reinstall offline); 70.1 is the first that builds editable installs without `wheel`.
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('vitkd') is None)" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.vitkd-installed ]; then
  .venv/bin/python -m pip install -q 'setuptools>=70.1'
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  touch .venv/.vitkd-installed
fi
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install Debian's dataset-fashion-mnist; the embedded default needs it (or --data-path)" >&2
fi
