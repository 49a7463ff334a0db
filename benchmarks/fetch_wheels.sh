#!/usr/bin/env bash
# Download the wheels a lent GPU machine lacks (it has torch, tokenizers, safetensors, pillow,
# tqdm, numpy, huggingface-hub) into .whl/ for Python 3.12 x86-64. Run here, in the repo root.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 'transformers==5.23.0' 'pydantic==2.14.4' 'pydantic-core==2.50.5' \
    annotated-types typing-inspection 'huggingface-hub==2.4.0' 'tokenizers==0.23.3'
ls -la .whl
