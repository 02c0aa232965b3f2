#!/usr/bin/env bash
# Main job: profile the built-in default model on the built-in corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/layerwise profile --out "${1:-runs/profile}"
