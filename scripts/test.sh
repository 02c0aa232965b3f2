#!/usr/bin/env bash
# Whole test suite, real default model included.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_EXTRAS=test bash scripts/setup.sh
# The project's habits first (pyproject.toml configures both): lint and format, then types.
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
