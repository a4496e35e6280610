#!/usr/bin/env bash
# Set up (first run only) and start rillet on the bundled SmolLM2-135M-Instruct.
# Extra arguments go to `rillet serve`, e.g. scripts/serve.sh --port 9000.
# Every step says what it is doing: setup (the first run installs rillet into .venv and
# compiles its CPU kernels, a few minutes), then `rillet serve` names the model it loads and
# its size, and prints the URL once it is ready.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "serve: checking the setup (scripts/setup.sh)..." >&2
scripts/setup.sh
echo "serve: starting rillet serve $*" >&2
exec .venv/bin/rillet serve "$@"
