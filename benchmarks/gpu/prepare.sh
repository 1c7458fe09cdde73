#!/usr/bin/env bash
# Download, here, the CPython 3.12 manylinux x86_64 wheels the GPU image lacks into .whl/ (ignored, <= 60 MiB),
# then check with pip's own resolver (--dry-run --no-index, Python 3.12) that lnull's dependencies install from
# them plus the image's packages. Idempotent: wheels already there are kept; prints the total size.
# What is downloaded, what is built from source and how the image is modelled: benchmarks/gpu/wheels.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu/wheels.py prepare
