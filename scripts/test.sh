#!/usr/bin/env bash
# Whole test suite, real default model included.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_EXTRAS=test bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
