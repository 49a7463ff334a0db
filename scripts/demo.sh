#!/usr/bin/env bash
# Install into .venv (created if missing) and run the end-to-end demo on the built-in tiny model.
# A federated simulation: 3 virtual clients tune their concepts, the server fuses them.
# Output lands in ./demo-out (server/: registry, fused model, report; clients/: their copies).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
pip_install -e ".[sim]"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
"$VENV/bin/mos-demo" "$@"
