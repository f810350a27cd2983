#!/usr/bin/env bash
# The GPU checks in one run: versions, the GPU test tier (pytest -m gpu), the training-step benchmark and the
# whole-program benchmark on generated JPEGs. Each part has its own time limit and writes its log (and JSON) under
# $OUT (default output/gpu_check), so a part that fails or runs out of time leaves the others' results.
#
#   bash scripts/gpu_check.sh                       # on a CUDA machine with torch, timm, accelerate installed
#   PARTS="tier step" bash scripts/gpu_check.sh     # a subset: versions tier step e2e
#   TIER_K="reads_from_the_device or nd_centres" PARTS=tier bash scripts/gpu_check.sh   # some of the tier (pytest -k)
#
# The tier: every method's bf16 step, autocast, the compiled distiller, the teacher cache, exact resume,
# --eval-student, host reads only on logging steps (VkD, CRD, DIST, fp16, EMA, ND; CUDA sync-debug warnings counted
# too) and ND's class-centre pass. The step benchmark runs with --ablation (the cost of the step's extras).
#
# Wheels in .whl/ (e.g. a newer timm) are installed to /tmp/site first and put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_check}
PY=${PYTHON:-python3}
PARTS=${PARTS:-versions tier step e2e}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
part() { [[ " $PARTS " == *" $1 "* ]]; }
start=$(date +%s)
stamp() { echo "== $1: $(( $(date +%s) - start )) s"; }

if part versions; then
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
    "$PY" -c "import sys, torch, timm, accelerate; print(sys.version.split()[0], 'torch', torch.__version__,
'timm', timm.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"; } \
    2>&1 | tee "$OUT/versions.txt"
  stamp versions
fi
if part tier; then
  timeout "${TIER_S:-360}" "$PY" -m pytest -q -m gpu tests/test_gpu.py ${TIER_K:+-k "$TIER_K"} -p no:cacheprovider -rs \
    --durations=10 2>&1 | tee "$OUT/gpu_tier.txt"
  stamp tier
fi
if part step; then
  timeout "${STEP_S:-240}" "$PY" benchmarks/bench_gpu_step.py --compiled --ablation --budget-s "${STEP_BUDGET_S:-170}" \
    --out "$OUT/bench_gpu_step.json" 2>&1 | tee "$OUT/bench_gpu_step.txt"
  stamp step
fi
if part e2e; then
  timeout "${E2E_S:-170}" "$PY" benchmarks/bench_jpeg_e2e.py --steps "${E2E_STEPS:-60}" \
    --out "$OUT/bench_jpeg_e2e.json" 2>&1 | tee "$OUT/bench_jpeg_e2e.txt"
  stamp e2e
fi
