#!/usr/bin/env bash
# The prepared GPU check: one command, about 6-8 minutes on one H100 / H200 (Llama-3-8B shapes,
# random bf16 weights, no download). `--shape tiny` runs it anywhere in seconds (CI does).
# Figures go to $OUT/gpu_check.json when OUT is set. See benchmarks/gpu_check.py for the phases.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
