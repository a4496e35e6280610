#!/usr/bin/env bash
# Set up (first run only) and start rillet on the bundled SmolLM2-135M-Instruct.
# Extra arguments go to `rillet serve`, e.g. scripts/serve.sh --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/rillet serve "$@"
