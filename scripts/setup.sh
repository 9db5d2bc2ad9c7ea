#!/usr/bin/env bash
# Create .venv and install graft with its test tools. Idempotent.
# torch is pinned to a release that exists on PyPI; on a GPU host install the CUDA build of
# torch before running this; for onnxruntime on CUDA, afterwards replace the CPU wheel:
#   pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,ray]"
