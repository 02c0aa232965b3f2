#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix and llama-quantize from exactly the llama.cpp that the installed
# llama-cpp-python vendors (its PyPI sdist carries it under vendor/llama.cpp), static, into
#   ${LAYERWISE_CACHE:-$HOME/.cache/layerwise}/llama-tools/<llama-cpp-python version>/bin/
# Idempotent: when both binaries are already there it prints their paths and exits at once.
# About 10-20 min on 2 cores, once per llama-cpp-python version. Needs cmake (>= 3.14) and a C++ compiler;
# without cmake, the PyPI package `cmake` is installed into a venv of its own under the cache folder.
#
# Environment:
#   VENV                   venv holding llama-cpp-python (default: <repo>/.venv)
#   LAYERWISE_CACHE        cache root (default: $HOME/.cache/layerwise)
#   LLAMA_TOOLS_WAIT_FOR   optional `pgrep -f` pattern: before compiling, wait (poll every 30 s) until no process
#                          matches it, e.g. another CPU-heavy job; LLAMA_TOOLS_WAIT_MAX_S caps the wait (default 2400)
#   LLAMA_TOOLS_JOBS       parallel compile jobs (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$PWD/.venv}

say() { echo "build_llama_tools: $*"; }
die() { echo "build_llama_tools: $*" >&2; exit 1; }

# run_step DESCRIPTION CMD...: output goes to a log; on failure its tail and one line saying what failed
run_step() {
    local what=$1; shift
    if ! "$@" >"$TMP/step.log" 2>&1; then
        tail -n 40 "$TMP/step.log" >&2
        die "$what failed"
    fi
}

[ -x "$VENV/bin/python" ] || die "no python in venv $VENV (set VENV, or run scripts/setup.sh)"
VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null) \
    || die "llama-cpp-python is not installed in $VENV (SETUP_EXTRAS=llama scripts/setup.sh installs it)"
CACHE=${LAYERWISE_CACHE:-$HOME/.cache/layerwise}/llama-tools
OUT=$CACHE/$VERSION
TOOLS=(llama-imatrix llama-quantize)

if [ -x "$OUT/bin/llama-imatrix" ] && [ -x "$OUT/bin/llama-quantize" ]; then
    echo "$OUT/bin/llama-imatrix"
    echo "$OUT/bin/llama-quantize"
    exit 0
fi

# Same portable x86-64 (AVX2) flags as scripts/setup.sh uses for the llama-cpp-python wheel: never -march=native
# (a native build on a CPU that reports AMX crashes inside VMs that do not grant the AMX tile state).
GGML_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
# Fewest extras: static, CPU only, no network code (curl is deprecated/ignored in this llama.cpp, OpenSSL off,
# no web UI download), only the tools tree (tests, examples, server, unified app off).
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_LLGUIDANCE=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DGGML_BACKEND_DL=OFF -DGGML_RPC=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF
    "${GGML_FLAGS[@]}"
)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/llama-tools.XXXXXX") || die "creating a temp dir failed"
trap 'rm -rf "$TMP"' EXIT

# --- tools: cmake and a C++ compiler ---
CXX_BIN=${CXX:-$(command -v c++ || command -v g++ || command -v clang++ || true)}
[ -n "$CXX_BIN" ] || die "no C++ compiler found (install g++ or set CXX)"
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
    say "cmake not found: installing the PyPI package cmake into $CACHE/cmake-venv"
    [ -x "$CACHE/cmake-venv/bin/python" ] || run_step "creating $CACHE/cmake-venv" "$VENV/bin/python" -m venv "$CACHE/cmake-venv"
    [ -x "$CACHE/cmake-venv/bin/cmake" ] || run_step "pip install cmake" "$CACHE/cmake-venv/bin/python" -m pip install -q cmake
    CMAKE=$CACHE/cmake-venv/bin/cmake
fi

# --- source: the llama-cpp-python sdist of the installed version ---
say "downloading the llama-cpp-python $VERSION sdist"
run_step "pip download llama-cpp-python==$VERSION (sdist)" \
    "$VENV/bin/python" -m pip download -q "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$TMP/dl"
SDIST=$(ls "$TMP"/dl/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n 1 || true)
[ -n "$SDIST" ] || die "pip download left no llama_cpp_python-$VERSION.tar.gz in $TMP/dl"
run_step "unpacking $(basename "$SDIST")" tar -xzf "$SDIST" -C "$TMP"
SRC=$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp
[ -f "$SRC/CMakeLists.txt" ] && [ -f "$SRC/tools/imatrix/imatrix.cpp" ] && [ -f "$SRC/tools/quantize/quantize.cpp" ] \
    || die "the sdist has no vendor/llama.cpp with tools/imatrix and tools/quantize"
# the sdist carries a shallow git record of the llama.cpp submodule; the CHANGELOG names it too
COMMIT=$(cat "$TMP/llama_cpp_python-$VERSION/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null || echo unknown)
say "vendored llama.cpp commit: $COMMIT"

# --- wait for other CPU-heavy work, if asked ---
if [ -n "${LLAMA_TOOLS_WAIT_FOR:-}" ]; then
    waited=0; max=${LLAMA_TOOLS_WAIT_MAX_S:-2400}
    while pgrep -f -- "$LLAMA_TOOLS_WAIT_FOR" >/dev/null; do
        [ "$waited" -lt "$max" ] || die "waiting for '$LLAMA_TOOLS_WAIT_FOR' to end failed: still running after ${max}s"
        [ "$waited" -gt 0 ] || say "waiting for processes matching '$LLAMA_TOOLS_WAIT_FOR' to end (poll 30 s, up to ${max}s)"
        sleep 30; waited=$((waited + 30))
    done
fi

# --- configure and build only the two targets ---
JOBS=${LLAMA_TOOLS_JOBS:-$(nproc)}
say "configuring llama.cpp (static, CPU, Release) with $("$CMAKE" --version | head -n 1)"
run_step "cmake configure" "$CMAKE" -S "$SRC" -B "$TMP/build" -DCMAKE_CXX_COMPILER="$CXX_BIN" "${CMAKE_FLAGS[@]}"
say "compiling ${TOOLS[*]} with -j$JOBS (10-20 min on 2 cores)"
start=$(date +%s)
run_step "cmake build of ${TOOLS[*]}" "$CMAKE" --build "$TMP/build" --config Release -j "$JOBS" --target "${TOOLS[@]}"
say "compiled in $(( $(date +%s) - start ))s"

# --- install into the cache: copy to a staging dir next to it, check, then move into place ---
mkdir -p "$CACHE" || die "creating $CACHE failed"
STAGE=$(mktemp -d "$CACHE/.stage.XXXXXX") || die "creating a staging dir in $CACHE failed"
trap 'rm -rf "$TMP" "$STAGE"' EXIT
mkdir -p "$STAGE/bin"
for t in "${TOOLS[@]}"; do
    [ -x "$TMP/build/bin/$t" ] || die "the build produced no bin/$t"
    cp "$TMP/build/bin/$t" "$STAGE/bin/$t" || die "copying $t failed"
    # static build: nothing from the build tree may be needed at run time
    if ldd "$STAGE/bin/$t" 2>/dev/null | grep -E 'not found|libllama|libggml|libmtmd|llama-common' >&2; then
        die "checking $t's shared libraries failed: it needs the libraries above"
    fi
    { "$STAGE/bin/$t" --help 2>&1 || true; } | grep -qi usage || die "running $t --help failed: it printed no usage"
done
# the two tools' sources, for reference (chunking and the imatrix file format are defined there)
mkdir -p "$STAGE/src" && cp "$SRC/tools/imatrix/imatrix.cpp" "$SRC/tools/quantize/quantize.cpp" "$STAGE/src/" \
    || die "copying the tools' sources failed"
{
    echo "llama-cpp-python $VERSION"
    echo "llama.cpp commit $COMMIT"
    echo "cmake flags ${CMAKE_FLAGS[*]}"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m) with $("$CXX_BIN" --version | head -n 1)"
} >"$STAGE/BUILD_INFO"
chmod 755 "$STAGE" && rm -rf "$OUT" && mv "$STAGE" "$OUT" || die "moving the build into $OUT failed"
say "done"
echo "$OUT/bin/llama-imatrix"
echo "$OUT/bin/llama-quantize"
