#!/usr/bin/env bash
# The one-call GPU check (issue 24 part 4): writes $OUT/gpu_check.json and $OUT/gpu_check.md (benchmarks/gpu/smoke.py).
#   benchmarks/gpu/smoke.sh              on a GPU machine: installs .whl/ (benchmarks/gpu/prepare.sh made it, here)
#                                        into /tmp/site, then runs the five parts in <= 8 minutes
#   benchmarks/gpu/smoke.sh --dry-run    here, on the CPU at tiny sizes (tests/test_gpu_check.py)
# Extra arguments go to smoke.py (--parts a,b, --budget-s N, --work DIR). OUT defaults to /tmp/gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-${TMPDIR:-/tmp}/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--dry-run" ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  exec "$PY" benchmarks/gpu/smoke.py --out "$OUT" "$@"
fi
PY=${PYTHON:-python3}
SETUP=()
if [ -d .whl ]; then  # the image's Python lacks hydra-core, omegaconf, ... : pip's resolver against the image, then
  # the resolved wheels into /tmp/site (--no-deps); the report goes into gpu_check.json as "setup"
  "$PY" benchmarks/gpu/wheels.py install --target /tmp/site --report /tmp/gpu-check-setup.json || true
  SETUP=(--setup /tmp/gpu-check-setup.json)
else
  echo "smoke.sh: no .whl/ here (run benchmarks/gpu/prepare.sh where pip works and carry .whl); going on" >&2
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" benchmarks/gpu/smoke.py --out "$OUT" ${SETUP[@]+"${SETUP[@]}"} "$@" 2>&1 | tee "$OUT/smoke.log"
