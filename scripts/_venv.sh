# Sourced by scripts/*.sh: make .venv with Python >= 3.11 and torch, then define pip_install.
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $PYTHON is $("$PYTHON" --version 2>&1); Python >= 3.11 is needed (set PYTHON=...)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
# The CPU wheel of torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -c 'import torch' 2>/dev/null || pip_install "${TORCH_SPEC:-torch==2.13.0}"
