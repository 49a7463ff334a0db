#!/usr/bin/env bash
# Start mos-studio on the demo's fused model and its federation view (http://127.0.0.1:7860/).
# Runs ./scripts/demo.sh first when ./demo-out has no fused model yet. Extra arguments go to
# mos-studio (e.g. --port 7870). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
if [ ! -f demo-out/server/models/v1/fused.safetensors ]; then
    ./scripts/demo.sh
fi
pip_install -e ".[sim]"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
exec "$VENV/bin/mos-studio" --model demo-out/server/models/v1 --state-dir demo-out/server "$@"
