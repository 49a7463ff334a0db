"""Gradient fusion: wall time per stage, peak memory and objective, exact solver vs the
reference's L-BFGS on the same recorded features.

    python benchmarks/bench_fusion.py --model tiny --n 3 14 50 --reference-n 3 14
    python benchmarks/bench_fusion.py --model sd15 --n 3 14 50 --reference-n 3     # on a GPU
    python benchmarks/bench_fusion.py --model tiny-sdxl --n 3 --reference-n 3      # CPU
    python benchmarks/bench_fusion.py --model sdxl --n 3 --reference-n --resolution 1024  # GPU
    python benchmarks/bench_fusion.py --modes                                       # fidelity

Concepts are random rank-4 LoRAs of realistic size (``||B A|| = 2%`` of ``||W0||`` per
layer; timing does not depend on what they learned) with class-word embeddings. Each
(N, solver) runs in its own subprocess; the exact solver uses ridge 1e-6 toward the base
(the plain least-squares problem, as the reference's) unless told otherwise, and so peak memory (CUDA ``max_memory_allocated``, the
process's max RSS) is its own. ``--modes`` instead trains three tiny concepts and reports
the fidelity of gradient fusion in the sequential and independent modes and of weight fusion.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def random_packages(base, n: int, rank: int = 4, rel_norm: float = 0.02, seed: int = 0):
    from mos.common.concepts import Concept
    from mos.common.edlora import initial_embeddings
    from mos.common.lora import target_layer_names
    from mos.common.package import ConceptPackage, expected_lora_shapes

    gen = torch.Generator().manual_seed(seed)
    shapes = expected_lora_shapes(base, rank)
    weights = {
        f"{prefix}.{name}": model.get_submodule(name).weight
        for prefix, model, targets in base.lora_components()
        for name in target_layer_names(model, targets)
    }
    packages = []
    for i in range(n):
        concept = Concept(f"c{i}", "dog", "edlora", base.num_cross_attention_layers)
        lora = {}
        for key, w in weights.items():
            a = (
                torch.randn(shapes[f"{key}.lora_A.weight"], generator=gen)
                / shapes[f"{key}.lora_A.weight"][1] ** 0.5
            )
            b = torch.randn(shapes[f"{key}.lora_B.weight"], generator=gen)
            scale = rel_norm * float(w.float().norm()) / float((b @ a).norm())
            lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"] = a, b * scale
        emb = initial_embeddings(base, concept, gen)
        packages.append(ConceptPackage(concept, rank, emb, lora, base.fingerprint, base.source))
    return packages


def run_one(args) -> dict:
    from bench_edlora import _cpu_name, sd15_base
    from bench_sdxl import shaped_base

    from mos.common.base import build_tiny, build_tiny_sdxl
    from mos.server.fusion import FusionConfig, FusionEngine

    device = torch.device(args.device)
    if args.model == "sdxl":  # random weights made on the device (10 GB in fp32)
        base = shaped_base("sdxl", str(device))
    else:
        base = {"tiny": build_tiny, "tiny-sdxl": build_tiny_sdxl, "sd15": sd15_base}[args.model]()
    packages = random_packages(base, args.one_n)
    base.to(device)
    config = FusionConfig(
        solver=args.one_solver,
        steps=args.steps,
        resolution=args.resolution or 0,
        ridge=args.ridge,
        ridge_target=args.ridge_target,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = FusionEngine(base, packages, config)
    setup = time.perf_counter() - start
    result = engine.fuse(progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    return {
        "model": args.model,
        "n": args.one_n,
        "solver": args.one_solver,
        "setup_s": setup,
        "stage_s": result.timings,
        "total_s": total,
        "objective": {k: v for k, v in result.objective.items() if "weight" not in k},
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
        "resolution": args.resolution or base.default_resolution,
        "steps": args.steps,
    }


def modes(package_files: list[Path] | None = None) -> None:
    """Fidelity of the fusion variants and weight fusion, on trained tiny concepts.

    Without ``package_files``: three tiny concepts trained on visibly different synthetic
    photos (as in the tests).
    """
    import tempfile

    from mos.client.data import load_photo_folder
    from mos.client.trainer import train_concept
    from mos.common.base import build_tiny
    from mos.common.config import TrainConfig
    from mos.common.package import ConceptPackage
    from mos.server.fusion import FusionConfig, FusionEngine, FusionResult
    from mos.server.report import fidelity

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.test_fusion import _concept_photos

    if package_files:
        packages = [ConceptPackage.load(f) for f in package_files]
    else:
        packages = []
        with tempfile.TemporaryDirectory() as tmp:
            for kind, (name, cls) in enumerate([("dog1", "dog"), ("cat2", "cat"), ("toy3", "toy")]):
                photos = load_photo_folder(_concept_photos(kind, Path(tmp) / name))
                config = TrainConfig(steps=60, batch_size=4, lr_unet=3e-3, lr_text=1e-3)
                packages.append(
                    train_concept(build_tiny(), photos, name, cls, config, progress=False).package
                )
    variants = {
        "gradient fusion (defaults: sequential)": FusionConfig(),
        "gradient fusion, independent mode": FusionConfig(mode="independent"),
        "gradient fusion, k/v on concept tokens only": FusionConfig(kv_positions="concept"),
        "gradient fusion, ridge 1e-6 toward the base": FusionConfig(
            ridge=1e-6, ridge_target="base"
        ),
    }
    results = {}
    for label, config in variants.items():
        engine = FusionEngine(build_tiny(), packages, config)
        rows = [FusionResult(label, engine.fuse(progress=False).factors)]
        if not results:
            rows.append(engine.weight_fusion())
        report = fidelity(engine, rows)
        for r in rows:
            results[r.strategy] = {
                **report["mean"][r.strategy],
                "prior": report["prior_drift"][r.strategy],
            }
    print("| fusion | mean text drift | mean UNet drift | prior drift |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['text_drift']:.3g} | {r['unet_drift']:.3g} | {r['prior']:.3g} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "sd15", "tiny-sdxl", "sdxl"), default="tiny")
    p.add_argument("--n", type=int, nargs="+", default=[3, 14, 50])
    p.add_argument(
        "--reference-n", type=int, nargs="*", default=[3], help="N for the L-BFGS reference"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    # the plain least-squares problem the reference solves (mos-fuse's defaults add a ridge)
    p.add_argument("--ridge", type=float, default=1e-6)
    p.add_argument("--ridge-target", choices=("base", "average"), default="base")
    p.add_argument("--modes", action="store_true", help="fidelity of the fusion variants instead")
    p.add_argument(
        "--packages", type=Path, nargs="*", help="with --modes: concept packages to fuse"
    )
    p.add_argument("--one-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-solver", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.modes:
        modes(args.packages)
        return
    if args.one_n:
        print(json.dumps(run_one(args)))
        return
    runs = [(n, "exact") for n in args.n] + [(n, "lbfgs") for n in args.reference_n]
    rows = []
    for n, solver in runs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one-n", str(n), "--one-solver", solver]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"done: N={n} {solver} {rows[-1]['total_s']:.1f} s", file=sys.stderr)
    r0 = rows[0]
    print(
        f"\n{r0['model']}, sampling {r0['resolution']} px x {r0['steps']} steps, on {r0['device']}\n"
    )
    print(
        "| N | solver | text (s) | k/v (s) | spatial (s) | total (s) | peak GPU (GiB) | max RSS (GiB) | objective text / kv / spatial |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, o = r["stage_s"], r["objective"]
        gpu = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        print(
            f"| {r['n']} | {r['solver']} | {s['text']:.2f} | {s['kv']:.2f} | {s['spatial']:.2f} | "
            f"{r['total_s']:.2f} | {gpu} | {r['max_rss_gib']:.2f} | "
            f"{o['text']:.4g} / {o['kv']:.4g} / {o['spatial']:.4g} |"
        )
    by = {(r["n"], r["solver"]): r for r in rows}
    for n in args.reference_n:
        if (n, "exact") in by:
            e, ref = by[(n, "exact")], by[(n, "lbfgs")]
            print(
                f"\nN={n}: exact is {ref['total_s'] / e['total_s']:.1f}x faster than the L-BFGS reference; "
                f"objective exact/reference: "
                + ", ".join(
                    f"{k} {e['objective'][k] / max(ref['objective'][k], 1e-300):.4f}"
                    for k in e["objective"]
                )
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
