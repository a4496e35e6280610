#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, types, then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k engine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check src tests bench examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
