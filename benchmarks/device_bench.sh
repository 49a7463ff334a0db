#!/usr/bin/env bash
# The GPU benchmarks (ED-LoRA training, then fusion of N = 3, 14, 50 concepts with the L-BFGS
# reference at N = 3) as ONE command, for a lent GPU machine (or any CUDA box):
#   bash benchmarks/device_bench.sh            # results (Markdown + JSON) in $OUT or benchmarks/results
# On this workplace's device machines nothing can be downloaded: first run
#   bash benchmarks/fetch_wheels.sh            # here, once: pure-Python wheels into .whl/
# and pass .whl in the run's carry list. Set STEPS (default 60) and FULL=1 to also time a
# whole 1000-step ED-LoRA run (the "1000 steps in under 4 minutes" target); QUICK=1 is a
# dry run of the script itself on the tiny model (any machine, about a minute). TOY=1 trains
# a wider toy base instead and runs the toy world's benchmark on it (TOY_* variables below;
# at small scale on a CPU: TOY=1 TOY_DEVICE=cpu TOY_CHANNELS=16,32,32 TOY_STEPS=2
# TOY_VAE_STEPS=2 TOY_IMAGES=256 TOY_BATCH=8 TOY_CONCEPTS="ring swiss" TOY_FUSE_N=2
# TOY_BENCH_ARGS="--steps 3 --samples 2").
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
if [ "${TOY:-0}" = 1 ]; then  # issue 6: a wider toy base trained on the GPU, then its claims
    # the GPU recipe of the toy base: UNet (64, 128, 128), ~410 000 samples
    python3 -m mos.toyworld.train --device "${TOY_DEVICE:-cuda}" \
        --unet-channels "${TOY_CHANNELS:-64,128,128}" --steps "${TOY_STEPS:-1600}" \
        --batch "${TOY_BATCH:-256}" --images "${TOY_IMAGES:-60000}" \
        --vae-steps "${TOY_VAE_STEPS:-1500}" --vae-batch "${TOY_BATCH:-256}" \
        --out "$OUT/toy-base.safetensors" 2>&1 | grep -v 'it/s' | tee "$OUT/toy-train.log"
    # the paper's claims on that base (ED-LoRA and sampling on this machine's CPU cores);
    # compare with RESULTS.md's run 5 before committing it over toyworld/weights/
    # shellcheck disable=SC2086 # word splitting of the lists is wanted
    MOS_TOY_WEIGHTS="$OUT/toy-base.safetensors" python3 benchmarks/bench_toyworld.py \
        --concepts ${TOY_CONCEPTS:-checker ring swiss house} --fuse-n ${TOY_FUSE_N:-2 4} \
        --no-annotated ${TOY_BENCH_ARGS:-} --out "$OUT/toyworld" 2>&1 | tee "$OUT/toyworld.log"
    exit 0
fi
if [ "${QUICK:-0}" = 1 ]; then  # a dry run of this script on any machine: tiny model only
    python3 benchmarks/bench_edlora.py --model tiny --steps 20 --out "$OUT/edlora-tiny.json" | tee "$OUT/edlora-tiny.md"
    python3 benchmarks/bench_fusion.py --model tiny --n 3 --reference-n 3 --out "$OUT/fusion-tiny.json" | tee "$OUT/fusion-tiny.md"
    python3 benchmarks/bench_fusion.py --model tiny-sdxl --n 3 --reference-n 3 --out "$OUT/fusion-tiny-sdxl.json" | tee "$OUT/fusion-tiny-sdxl.md"
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
# SDXL-shaped random weights at 1024 px: fusion time and peak memory (issue: SDXL)
python3 benchmarks/bench_fusion.py --model sdxl --n 3 --reference-n --resolution 1024 \
    --out "$OUT/fusion-sdxl-1024.json" | tee "$OUT/fusion-sdxl-1024.md"
if [ "${FULL:-0}" = 1 ]; then
    python3 benchmarks/bench_edlora.py --model sd15 --resolution 512 --batch-size 2 --steps 1000 \
        --warmup 10 --out "$OUT/edlora-sd15-1000.json" | tee "$OUT/edlora-sd15-1000.md"
fi
