#!/usr/bin/env bash
# A thin wrapper around streaming.py, as in NuPIC's quick start. Start the server first
# (scripts/serve.sh, which serves gRPC on port 8001 beside HTTP on 8080), then:
#   examples/streaming/run.sh "Tell me a story about a lighthouse."
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
exec "$python" "$here/streaming.py" "$@"
