#!/usr/bin/env bash
# Short RL and IL runs on CUDA with and without CDP (fp32 and bf16): steps/s and the CDP/base ratio (~3-6 min).
# Usage: benchmarks/gpu_check.sh [extra args of benchmarks/gpu_check.py]; the table goes into docs/speed.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"
PYTHONPATH=src timeout 480 "$PY" benchmarks/gpu_check.py --device cuda "$@"
