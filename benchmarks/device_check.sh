#!/usr/bin/env bash
# Issue 13, P5: every tier on the accelerator when the machine has one (img/s, GPU
# utilisation, 1 to 4 replicas at once), on the CPU otherwise, so that it is known to work.
# Writes benchmarks/results/device_check_<device>.json (benchmarks/compute.py's keys).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    device=cuda
fi
python=${PYTHON:-.venv/bin/python}
exec "$python" benchmarks/compute.py --device "$device" --replicas 1,2,3,4 \
    --out "benchmarks/results/device_check_${device}.json" "$@"
