"""Regional sampling overhead: time per image with 0, 2 and 4 regions vs the plain pipeline.

    python benchmarks/bench_regions.py --model tiny                       # CPU
    python benchmarks/bench_regions.py --model sd15 --sizes 512x512 512x1024   # on a GPU

Same model, seed, steps and guidance in one run; the plain pipeline is sampled first and
again last (warm-up and drift check). Regions split the image into vertical strips that
overlap by a tenth, so every region's cost is counted at realistic areas.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mos.common.base import build_tiny
from mos.common.pipeline import MixOfShowPipeline
from mos.common.regions import Region


def strips(n: int) -> list[Region]:
    width = 1.0 / n
    return [
        Region(
            f"a red cube number {i}",
            (max(0.0, i * width - 0.05), 0.1, min(1.0, (i + 1) * width + 0.05), 0.9),
        )
        for i in range(n)
    ]


def time_one(pipe, regions, size, steps, repeats, device) -> float:
    h, w = size
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(
            "two toys on a table",
            num_inference_steps=steps,
            height=h,
            width=w,
            generator=torch.Generator().manual_seed(0),
            regions=regions,
            output_type="latent",
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--sizes", nargs="+", default=None, help="HxW, e.g. 512x512")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "tiny":
        base = build_tiny()
        sizes = args.sizes or ["32x32", "32x64"]
    else:
        from bench_edlora import sd15_base

        base = sd15_base()
        sizes = args.sizes or ["512x512", "512x1024"]
    base.to(device, torch.float16 if device.type == "cuda" else None)
    pipe = MixOfShowPipeline.from_base(base)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "model": args.model, "steps": args.steps, "sizes": {}}  # fmt: skip
    for spec in sizes:
        size = tuple(int(v) for v in spec.split("x"))
        time_one(pipe, [], size, 2, 1, device)  # warm-up
        row = {f"{n} regions": time_one(pipe, strips(n) if n else [], size, args.steps,
                                        args.repeats, device) for n in (0, 2, 4)}  # fmt: skip
        row["plain again"] = time_one(pipe, [], size, args.steps, args.repeats, device)
        plain = min(row["0 regions"], row["plain again"])
        row["ratio 2"] = row["2 regions"] / plain
        row["ratio 4"] = row["4 regions"] / plain
        results["sizes"][spec] = row
        print(f"{spec}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    out = args.out or Path(f"benchmarks/results/regions-{args.model}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
