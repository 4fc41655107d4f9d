#!/usr/bin/env bash
# CUDA verification of the Monitor (overhead, MFU, NVML utilisation, memory).
# Usage: bash bench/cuda_check.sh [--rounds N] [--steps N] [--json FILE]
# Without CUDA it prints a message and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
exec "$PY" bench/cuda_check.py "$@"
