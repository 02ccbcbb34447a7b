#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): every CUDA training path on one GPU, one JSON line a row.
#   bash bench/gpu_check.sh            on a CUDA machine
#   bash bench/gpu_check.sh --dry-run  on a CPU: every row's code on a tiny model (the tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m bench.gpu_check "$@"
