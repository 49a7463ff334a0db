#!/usr/bin/env bash
# Regenerate proto/hub_pb2.py, hub_pb2.pyi and hub_pb2_grpc.py from proto/hub.proto.
# grpcio-tools 1.81 (the last that accepts protobuf 6, which flwr requires); a test checks
# that the checked-in files equal what this script writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. proto/hub.proto
# generated imports say `from proto import hub_pb2`; the package is installed as mos.proto
sed -i 's/^from proto import hub_pb2/from mos.proto import hub_pb2/' proto/hub_pb2_grpc.py
