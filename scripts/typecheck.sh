#!/usr/bin/env bash
# mypy on the package as it is installed: client/ common/ proto/ server/ toyworld/ are the
# packages mos.client, mos.common, ... (pyproject's package-dir), so mypy reads them through
# a folder of links named that way. Configuration: [tool.mypy] in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$(cd "${VENV:-.venv}" && pwd)
LAYOUT=$(mktemp -d)
trap 'rm -rf "$LAYOUT"' EXIT
mkdir "$LAYOUT/mos"
for d in common client server proto toyworld; do ln -s "$ROOT/$d" "$LAYOUT/mos/$d"; done
cd "$LAYOUT"
"$VENV/bin/mypy" --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" -p mos
