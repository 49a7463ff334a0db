"""``mos-fuse``: merge concept packages into one model, offline (no Flower needed).

    mos-fuse --concepts dog1.safetensors cat2.safetensors --out fused/
    mos-fuse --base-model ./sd15 --concepts *.safetensors --strategy weight-fusion --out wf/

Every package is read and checked against the base (fingerprint, shapes, finite values,
clashing names) before any model work; a bad one is named and nothing is written. The
output folder is a diffusers model with every concept token, ``concepts.json``,
``fused.safetensors`` (the compact form) and ``fusion_report.{json,md,png}``, in which the
chosen strategy is compared with the other one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from ..common.base import TINY, BaseModelError, load_base_model
from ..common.cli import UsageError, config_from, resolve_device, run_command
from ..common.concepts import ConceptError
from ..common.fused import FusedModel, save_fused_folder
from ..common.package import ConceptPackage, PackageError
from .fusion import FusionConfig, FusionEngine
from .report import fidelity, sample_grid, write_report

log = logging.getLogger("mos.fuse")
STRATEGIES = ("gradient-fusion", "weight-fusion")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-fuse", description=__doc__.splitlines()[0])
    p.add_argument("--concepts", nargs="+", required=True, type=Path, help="concept package files")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--base-model", default=TINY, help="tiny | diffusers folder | .safetensors | hub id"
    )
    p.add_argument("--base-config", help="configs for a single-file checkpoint (offline)")
    p.add_argument("--strategy", choices=STRATEGIES, default="gradient-fusion")
    p.add_argument(
        "--weights", type=float, nargs="+", help="weight-fusion weights (default 1/n each)"
    )
    p.add_argument(
        "--mode",
        choices=("sequential", "independent"),
        default="sequential",
        help="sequential: the paper's stage order; independent: per-concept statistics",
    )
    p.add_argument(
        "--solver",
        choices=("exact", "lbfgs"),
        default="exact",
        help="exact normal equations, or the reference's L-BFGS (slow; for comparison)",
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps recorded per concept")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="images sampled per concept in stage 4 (default 1; 8 when convolution adapters "
        "are fused)",
    )
    p.add_argument(
        "--concept-batch",
        type=int,
        default=8,
        help="concept models sampled together in one batch (memory vs speed)",
    )
    p.add_argument("--resolution", type=int, help="sampling resolution (default: native)")
    p.add_argument(
        "--kv-positions",
        choices=("all", "concept", "concept+eos"),
        default="all",
        help="stage-3 features: every position of the concept prompts (default), "
        "the concept tokens (METHOD.md), or those and the end token (reference code)",
    )
    p.add_argument("--ridge", type=float, default=1e-2, help="relative ridge of the exact solve")
    p.add_argument(
        "--ridge-target",
        choices=("average", "base"),
        default="average",
        help="the ridge pulls toward the weight-fusion average or the base weights",
    )
    p.add_argument(
        "--gram-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the accumulated Gram matrices",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--no-grid", action="store_true", help="skip the sample grid of the report")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    return p


def read_packages(paths: list[Path]) -> list[ConceptPackage]:
    """Load every package, naming the file of any problem; refuse duplicate concepts."""
    packages, seen, problems = [], {}, []
    for path in paths:
        try:
            pkg = ConceptPackage.load(path)
        except PackageError as err:
            problems.append(str(err))
            continue
        name = pkg.concept.name
        if name in seen:
            problems.append(f"{path}: concept {pkg.concept.token} is also in {seen[name]}")
            continue
        seen[name] = path
        packages.append(pkg)
    if problems:
        raise PackageError("\n  ".join(["refused:", *problems]))
    return packages


def run(args: argparse.Namespace) -> Path:
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise UsageError(f"{args.out} is not empty; pass --force to write into it")
    if args.weights and len(args.weights) != len(args.concepts):
        raise UsageError(
            f"--weights: {len(args.weights)} weights for {len(args.concepts)} packages"
        )
    config = config_from(
        FusionConfig,
        mode=args.mode,
        solver=args.solver,
        steps=args.steps,
        samples=args.samples,
        concept_batch=args.concept_batch,
        resolution=args.resolution,
        kv_positions=args.kv_positions,
        ridge=args.ridge,
        ridge_target=args.ridge_target,
        gram_dtype=args.gram_dtype,
    )
    device = resolve_device(args.device)
    packages = read_packages(args.concepts)
    base = load_base_model(args.base_model, config=args.base_config)
    for pkg, path in zip(packages, args.concepts, strict=True):
        try:
            pkg.check_against(base)
        except PackageError as err:
            raise PackageError(f"{path}: {err}") from err
    base.to(device)
    sources = [str(p) for p in args.concepts]
    engine = FusionEngine(base, packages, config, sources)
    log.info(
        "fusing %d concepts on %s (%s, %s solver)",
        len(packages),
        device,
        config.mode,
        config.solver,
    )
    start = time.perf_counter()
    gradient = engine.fuse()
    weight = engine.weight_fusion(args.weights)
    fuse_seconds = time.perf_counter() - start
    results = [gradient, weight] if args.strategy == "gradient-fusion" else [weight, gradient]
    log.info("measuring fidelity")
    report = fidelity(engine, results)
    report.update(
        strategy=args.strategy,
        config=config.model_dump(),
        timings={"gradient-fusion": gradient.timings, "total_fusion_s": fuse_seconds},
        objective=gradient.objective,
        base={"source": base.source, "fingerprint": base.fingerprint},
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
    )
    grid = None if args.no_grid else sample_grid(engine, results)
    chosen = results[0]
    fused = FusedModel.from_packages(
        chosen.strategy, chosen.factors, packages, dict(zip(engine.names, sources, strict=True))
    )
    engine.apply(chosen.factors)
    save_fused_folder(base, fused, args.out)
    write_report(report, args.out, grid)
    mean = report["mean"]
    log.info(
        "wrote %s: mean UNet drift %s %.4g vs %s %.4g (fusion %.1f s)",
        args.out,
        results[0].strategy,
        mean[results[0].strategy]["unet_drift"],
        results[1].strategy,
        mean[results[1].strategy]["unet_drift"],
        fuse_seconds,
    )
    print(json.dumps({"out": str(args.out), "mean": mean}, indent=2))
    return args.out


def main(argv: list[str] | None = None) -> int:
    errors = (PackageError, BaseModelError, ConceptError)
    return run_command("mos-fuse", build_parser(), run, errors, argv)


if __name__ == "__main__":
    sys.exit(main())
