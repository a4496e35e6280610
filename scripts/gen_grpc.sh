#!/usr/bin/env bash
# Regenerate rillet's KServe v2 message classes from src/rillet/kserve/grpc_service.proto.
#
# Needs grpcio-tools (in the test extra). The classes are built in a descriptor pool of their
# own, not protobuf's default one: the proto's package, service and message names are
# Triton's, and tritonclient registers the same names in the default pool, so both could not
# be imported in one process otherwise. tests/kserve/test_proto.py checks the committed files
# are what this script makes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${1:-src}
"$python" -m grpc_tools.protoc -Isrc --python_out="$out" --pyi_out="$out" \
    src/rillet/kserve/grpc_service.proto
generated="$out/rillet/kserve/grpc_service_pb2.py"
# One pool for rillet's KServe messages (see above).
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(/' "$generated"
grep -q '^_POOL = _descriptor_pool.DescriptorPool()$' "$generated"
