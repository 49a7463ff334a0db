#!/usr/bin/env bash
# The GPU benchmarks (ED-LoRA training, then fusion of N = 3, 14, 50 concepts with the L-BFGS
# reference at N = 3) as ONE command, for a lent GPU machine (or any CUDA box):
#   bash benchmarks/device_bench.sh            # results (Markdown + JSON) in $OUT or benchmarks/results
# On this workplace's device machines nothing can be downloaded: first run
#   bash benchmarks/fetch_wheels.sh            # here, once: pure-Python wheels into .whl/
# and pass .whl in the run's carry list. Set STEPS (default 60) and FULL=1 to also time a
# whole 1000-step ED-LoRA run (the "1000 steps in under 4 minutes" target); QUICK=1 is a
# dry run of the script itself on the tiny model (any machine, about a minute). TOY=1 trains
# the toy world's base model instead (toyworld/weights/ takes the result).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# the project as the `mos` namespace without building it (no setuptools needed there)
mkdir -p /tmp/mospath/mos
for part in common client server proto toyworld; do ln -sfn "$PWD/$part" "/tmp/mospath/mos/$part"; done
export PYTHONPATH=/tmp/mospath${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1 || true
python3 -c 'import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)' | tee "$OUT/versions.txt"
STEPS=${STEPS:-60}
if [ "${TOY:-0}" = 1 ]; then  # issue 6: train the toy base on the GPU (weights to commit)
    python3 -m mos.toyworld.train --device cuda --steps "${TOY_STEPS:-1600}" --batch 256 \
        --out "$OUT/toy-base.safetensors" 2>&1 | grep -v 'it/s' | tee "$OUT/toy-train.log"
    exit 0
fi
if [ "${QUICK:-0}" = 1 ]; then  # a dry run of this script on any machine: tiny model only
    python3 benchmarks/bench_edlora.py --model tiny --steps 20 --out "$OUT/edlora-tiny.json" | tee "$OUT/edlora-tiny.md"
    python3 benchmarks/bench_fusion.py --model tiny --n 3 --reference-n 3 --out "$OUT/fusion-tiny.json" | tee "$OUT/fusion-tiny.md"
    python3 benchmarks/bench_regions.py --model tiny --steps 5 --repeats 1 --out "$OUT/regions-tiny.json" | tee "$OUT/regions-tiny.md"
    exit 0
fi
python3 benchmarks/bench_edlora.py --model sd15 --resolution 512 --batch-size 2 --steps "$STEPS" \
    --warmup 10 --out "$OUT/edlora-sd15-512-b2.json" | tee "$OUT/edlora-sd15-512-b2.md"
python3 benchmarks/bench_edlora.py --model tiny --steps 200 --out "$OUT/edlora-tiny.json" | tee "$OUT/edlora-tiny.md"
python3 benchmarks/bench_fusion.py --model sd15 --n 3 14 50 --reference-n 3 \
    --out "$OUT/fusion-sd15-512.json" | tee "$OUT/fusion-sd15-512.md"
python3 benchmarks/bench_regions.py --model sd15 --sizes 512x512 512x1024 --steps 20 \
    --out "$OUT/regions-sd15.json" | tee "$OUT/regions-sd15.md"
if [ "${FULL:-0}" = 1 ]; then
    python3 benchmarks/bench_edlora.py --model sd15 --resolution 512 --batch-size 2 --steps 1000 \
        --warmup 10 --out "$OUT/edlora-sd15-1000.json" | tee "$OUT/edlora-sd15-1000.md"
fi
