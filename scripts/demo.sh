#!/usr/bin/env bash
# Install into .venv (created if missing) and run the end-to-end demo on the built-in tiny model.
# Output lands in ./demo-out (the concept package, its sample grid and loss curve).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
pip_install -e .
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
"$VENV/bin/mos-demo" "$@"
