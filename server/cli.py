"""``mos-fuse``: merge concept packages into one model, offline (no Flower needed).

    mos-fuse --concepts dog1.safetensors cat2.safetensors --out fused/
    mos-fuse --base-model ./sd15 --concepts *.safetensors --strategy weight-fusion --out wf/

Every package is read and checked against the base (fingerprint, shapes, finite values,
clashing names) before any model work; a bad one is named and nothing is written. The
output folder is a diffusers model with every concept token, ``concepts.json``,
``fused.safetensors`` (the compact form) and ``fusion_report.{json,md,png}`` (with
``--compare``, the other strategy's fusion beside the chosen one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from ..common.base import BaseModelError, load_base_model
from ..common.cli import UsageError, config_from, resolve_device, run_command
from ..common.concepts import ConceptError
from ..common.config import FusionConfig
from ..common.export import export_single_file
from ..common.federation import ServerSettings
from ..common.fused import FusedModel, save_fused_folder
from ..common.package import ConceptPackage, PackageError
from ..common.presets import load_preset
from ..common.settings import SettingsError, add_options, given
from .fusion import FusionEngine
from .report import fidelity, sample_grid, write_report

log = logging.getLogger("mos.fuse")
# the settings mos-fuse shares with the server
SERVER_OPTIONS = ("base_model", "base_config", "strategy", "device", "compare")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-fuse", description=__doc__.splitlines()[0])
    p.add_argument("--concepts", nargs="+", required=True, type=Path, help="concept package files")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_options(p, ServerSettings, only=SERVER_OPTIONS)
    p.add_argument(
        "--weights", type=float, nargs="+", help="weight-fusion weights (default 1/n each)"
    )
    for option, part in (("--unet-alpha", "UNet"), ("--text-encoder-alpha", "text-encoder")):
        p.add_argument(
            option,
            nargs="+",
            default=[],
            metavar="TOKEN=ALPHA",
            help=f"scale a concept's {part} LoRA before fusion, e.g. '<dog1>=0.8' (default 1)",
        )
    fusion = p.add_argument_group("fusion")
    fusion.add_argument("--preset", help="a named set of fusion settings beneath the options given")
    add_options(fusion, FusionConfig)
    p.add_argument(
        "--single-file",
        type=Path,
        metavar="FILE.safetensors",
        help="also write the fused model as one LDM-layout checkpoint (A1111, ComfyUI, "
        "diffusers' from_single_file), its concept tokens as textual-inversion files beside it",
    )
    p.add_argument("--no-grid", action="store_true", help="skip the sample grid of the report")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    return p


def parse_alphas(
    text: list[str], unet: list[str], engine: FusionEngine
) -> dict[str, tuple[float, float]]:
    """``{concept name: (text alpha, UNet alpha)}`` from ``TOKEN=ALPHA`` options."""
    by_token = {engine.packages[n].concept.token: n for n in engine.names}
    alphas: dict[str, list[float]] = {}
    for option, values, slot in (("--text-encoder-alpha", text, 0), ("--unet-alpha", unet, 1)):
        for item in values:
            token, sep, value = item.rpartition("=")
            if not sep or not token:
                raise UsageError(f"{option} {item!r}: write TOKEN=ALPHA, e.g. '<dog1>=0.8'")
            if token not in by_token:
                known = ", ".join(by_token)
                raise UsageError(f"{option} {item!r}: no concept {token} (fusing: {known})")
            try:
                alpha = float(value)
            except ValueError as err:
                raise UsageError(f"{option} {item!r}: {value!r} is not a number") from err
            if not 0 <= alpha <= 10:
                raise UsageError(f"{option} {item!r}: alpha must be between 0 and 10")
            alphas.setdefault(by_token[token], [1.0, 1.0])[slot] = alpha
    return {n: (a[0], a[1]) for n, a in alphas.items()}


def read_packages(paths: list[Path]) -> list[ConceptPackage]:
    """Load every package, naming the file of any problem; refuse one package given twice
    (two packages with the same concept name are fused, the later renamed: ``free_name``)."""
    packages: list[ConceptPackage] = []
    seen: dict[str, Path] = {}
    problems: list[str] = []
    for path in paths:
        try:
            pkg = ConceptPackage.load(path)
        except PackageError as err:
            problems.append(str(err))
            continue
        if pkg.sha256 in seen:
            problems.append(f"{path}: the same package as {seen[pkg.sha256]}")
            continue
        seen[pkg.sha256] = path
        packages.append(pkg)
    if problems:
        raise PackageError("\n  ".join(["refused:", *problems]))
    return packages


def run(args: argparse.Namespace) -> Path:
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise UsageError(f"{args.out} is not empty; pass --force to write into it")
    if args.single_file and args.single_file.suffix != ".safetensors":
        raise UsageError(f"--single-file {args.single_file}: the checkpoint is a .safetensors file")
    if args.weights and len(args.weights) != len(args.concepts):
        raise UsageError(
            f"--weights: {len(args.weights)} weights for {len(args.concepts)} packages"
        )
    try:
        config = load_preset(args.preset).fusion_config(**given(args, FusionConfig))
    except SettingsError as err:
        raise UsageError(str(err)) from err
    server = config_from(ServerSettings, **given(args, ServerSettings))
    device = resolve_device(server.device)
    packages = read_packages(args.concepts)
    base = load_base_model(server.base_model, config=server.base_config or None)
    for pkg, path in zip(packages, args.concepts, strict=True):
        try:
            pkg.check_against(base)
        except PackageError as err:
            raise PackageError(f"{path}: {err}") from err
    base.to(device)
    sources = [str(p) for p in args.concepts]
    engine = FusionEngine(base, [], config)
    for i, (pkg, source) in enumerate(zip(packages, sources, strict=True)):
        # checked above, each named by its file; a name given twice is renamed (free_name)
        packages[i] = engine.packages[engine.add(pkg, source, checked=True, rename=True)]
    alphas = parse_alphas(args.text_encoder_alpha, args.unet_alpha, engine)
    for name, (text, unet) in alphas.items():
        engine.set_alpha(name, text, unet)
    log.info(
        "fusing %d concepts on %s (%s, %s solver)",
        len(packages),
        device,
        config.mode,
        config.solver,
    )
    start = time.perf_counter()
    gradient = weight = None
    if server.strategy == "gradient-fusion" or server.compare:
        gradient = engine.fuse()
    if server.strategy == "weight-fusion" or server.compare:
        weight = engine.weight_fusion(args.weights)
    fuse_seconds = time.perf_counter() - start
    ordered = [gradient, weight] if server.strategy == "gradient-fusion" else [weight, gradient]
    results = [r for r in ordered if r is not None]
    log.info("measuring fidelity")
    report = fidelity(engine, results)
    report.update(
        strategy=server.strategy,
        config=config.model_dump(),
        alphas={engine.packages[n].concept.token: a for n, a in alphas.items()},
        timings={
            **({"gradient-fusion": gradient.timings} if gradient else {}),
            "total_fusion_s": fuse_seconds,
        },
        **({"objective": gradient.objective} if gradient else {}),
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
    if args.single_file:
        exported = export_single_file(base, fused.concepts, fused.embeddings, args.single_file)
        for line in exported.lost:
            log.warning("not in the single file: %s", line)
        log.info("wrote %s", args.single_file)
    mean = report["mean"]
    drifts = ", ".join(f"{r.strategy} {mean[r.strategy]['unet_drift']:.4g}" for r in results)
    log.info("wrote %s: mean UNet drift %s (fusion %.1f s)", args.out, drifts, fuse_seconds)
    print(json.dumps({"out": str(args.out), "mean": mean}, indent=2))
    return args.out


def main(argv: list[str] | None = None) -> int:
    errors = (PackageError, BaseModelError, ConceptError)
    return run_command("mos-fuse", build_parser(), run, errors, argv)


if __name__ == "__main__":
    sys.exit(main())
