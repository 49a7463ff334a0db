#!/usr/bin/env bash
# Install everything into .venv (created if missing) and run the linters and the test suite.
#   ./scripts/test.sh            # all tests
#   ./scripts/test.sh -k package # extra arguments go to pytest
#   ./scripts/test.sh -m "not slow"  # the quick part (about a minute of tests)
# TORCH_SPEC picks the torch build (default: the 2.13.0 CPU wheel; e.g. TORCH_SPEC=torch for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
pip_install -e ".[test,sim]"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy"
VENV="$VENV" ./scripts/typecheck.sh
echo "== pytest"
"$VENV/bin/python" -m pytest -q "$@"
