"""The paper preset against the project's defaults on the trained toy model, one command.

    python benchmarks/bench_paper.py                          # 3 toy concepts, ~15 min, 2 cores
    python benchmarks/bench_paper.py --concepts checker house --samples 4   # smoke
    python benchmarks/bench_paper.py --conv-rank 16 --steps 1000 --fuse-n 2 5 8 \
        --concepts checker ring halfmoon flag house swiss diamond mushroom
    python benchmarks/bench_paper.py --tuning-ablations        # toy-paper, one setting off
    python benchmarks/bench_paper.py --project-ablations       # toy, one paper setting on
    python benchmarks/bench_paper.py --solvers-only --lbfgs-unet-iterations 50 500 2000
    python benchmarks/bench_paper.py --presets toy --conv-rank 16 --steps 1000 \
        --concepts checker halfmoon --placement-seeds 20     # placement under each fusion

For the concepts (toy world, photos made by ``toyworld``):

1. tuning: each concept is tuned with ``--preset toy`` (the project's recipe on the toy
   base) and ``--preset toy-paper`` (the authors' recipe, same learning rates and length);
   identity (detector score and detection rate of "a photo of a <TOK>" samples) of each
   single-concept model;
2. fusion variants on the same packages, for the first N concepts for each ``--fuse-n``:
   the project's defaults, ``paper`` (the authors' fusion), weight fusion, and (at the
   largest N) ``paper`` with one of its settings at the project's value at a time; for
   each, the least-squares objective per stage, the mean UNet drift (``mos-fuse``'s report)
   and the identity of each concept in the fused model; and for the project, paper and
   weight fusions, placement: the first two concepts sampled side by side with regional
   prompts (``--placement-seeds`` seeds; ``--placement-layout``: in tiles of the base's
   size, as the README composes toy concepts, or on one canvas), how often both are found
   in their own box and in no other;
3. the solvers, on the first three concepts: ``paper`` fused with the exact solve and with
   the authors' L-BFGS (``solver lbfgs``, their tolerances and best iterate; their 50 UNet
   iterations, and as many more as ``--lbfgs-unet-iterations`` asks, to see where it
   converges) in one run: objective and wall time per stage;
4. fusion against plain sampling: the gradient fusion's wall time over the time to sample
   the same N concept models for the same steps at the same size (the least any method
   that samples the concepts costs).

Writes ``--out``/paper.json and paper.md (the tables for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from mos.common.config import FusionConfig
from mos.common.fused import FusedModel
from mos.common.package import ConceptPackage
from mos.common.pipeline import MixOfShowPipeline
from mos.common.presets import NO_PRESET, load_preset
from mos.server.fusion import FusionEngine
from mos.server.report import fidelity
from mos.toyworld.evaluate import (
    concept_identity,
    fused_pipeline,
    placement,
    single_concept_pipeline,
    toy_base,
    tune,
)

log = logging.getLogger("bench_paper")

# each of the paper fusion's settings, set back to the project's value one at a time
ABLATIONS = ("text_positions", "kv_positions", "ridge_target")
# the paper tuning (toy-paper) with one of its settings at the toy preset's value; the
# attention regularisation's form is inert here (the toy photos have no masks)
TUNING_ABLATIONS = {
    "augment none": {"augment": "none"},
    "caption_templates none": {"caption_templates": "none"},
    "batch_size 2": {"batch_size": 2},
    "flip_p 0.5": {"flip_p": 0.5},
    "kv_dropout 0.2 lora (paper-object)": {"kv_dropout": 0.2, "kv_dropout_mode": "lora"},
    "kv_dropout 0.2 features": {"kv_dropout": 0.2, "kv_dropout_mode": "features"},
}
HALF = "half"  # an ablation's steps: half of the run's (the same number of images seen)
# the other direction: the project's tuning (toy) with one of the paper's settings at a time
PROJECT_ABLATIONS = {
    "augment canvas": {"augment": "canvas"},
    "caption_templates human": {"caption_templates": "human"},
    "batch_size 4": {"batch_size": 4},
    "batch_size 4, half the steps (as many images)": {"batch_size": 4, "steps": HALF},
    "flip_p 0.5": {"flip_p": 0.5},
    "kv_dropout 0.2 lora (paper-object)": {"kv_dropout": 0.2, "kv_dropout_mode": "lora"},
    "kv_dropout 0.2 features": {"kv_dropout": 0.2, "kv_dropout_mode": "features"},
}


ATTENTION_FORMS = ("linear", "full-identity", "squared")  # the authors' two, the project's


def fusion_variants() -> dict[str, FusionConfig]:
    paper = load_preset("paper").fusion
    project = NO_PRESET.fusion_config().model_dump()
    variants = {"project": FusionConfig(), "paper": FusionConfig(**paper)}
    for field in ABLATIONS:
        values = {**paper, field: project[field]}
        if field == "ridge_target":
            values["ridge"] = project["ridge"]
        variants[f"paper, {field} {project[field]}"] = FusionConfig(**values)
    return variants


def tuned(
    name: str,
    preset: str,
    out: Path,
    run_steps: int | None,
    conv: int,
    label: str = "",
    masks: bool = False,
    **given,
) -> ConceptPackage:
    path = out / f"{preset}{label.replace(' ', '_')}-{name}.safetensors"
    if path.exists():
        return ConceptPackage.load(path)
    run_steps = run_steps or load_preset(preset).train_config().steps
    given["steps"] = run_steps // 2 if given.get("steps") == HALF else run_steps
    if conv:
        given["conv_rank"] = conv
    package = tune(name, load_preset(preset).train_config(**given), masks=masks)
    package.save(path)
    return package


def fuse(
    packages: list[ConceptPackage], config: FusionConfig, weight: bool = False
) -> tuple[FusionEngine, dict]:
    engine = FusionEngine(toy_base(), packages, config)
    start = time.perf_counter()
    result = engine.weight_fusion() if weight else engine.fuse(progress=False)
    seconds = time.perf_counter() - start
    report = fidelity(engine, [result])
    return engine, {
        "seconds": seconds,
        "timings": result.timings,
        "objective": result.objective or {},
        "unet_drift": report["mean"][result.strategy]["unet_drift"],
        "result": result,
    }


def identities(pipe: MixOfShowPipeline, names: list[str], n: int) -> dict[str, dict]:
    out = {}
    for name in names:
        ident = concept_identity(pipe, name, n)
        out[name] = {"score": ident.mean_score, "detected": ident.detected}
    return out


@torch.no_grad()
def plain_sampling_seconds(
    packages: list[ConceptPackage], config: FusionConfig, images: int
) -> float:
    """Sampling ``images`` images of each concept's own model for the fusion's stage-4
    steps and size (the least any fusion that samples the concept models costs)."""
    total = 0.0
    for package in packages:
        pipe = single_concept_pipeline(package)
        size = config.resolution or toy_base().default_resolution
        prompt = config.sample_prompt.format(package.concept.token)
        start = time.perf_counter()
        pipe([prompt], num_inference_steps=config.steps, guidance_scale=1.0, height=size,
             width=size, num_images_per_prompt=images, output_type="latent")  # fmt: skip
        total += time.perf_counter() - start
    return total


def _identity(pipe: MixOfShowPipeline, name: str, n: int) -> dict[str, float]:
    ident = concept_identity(pipe, name, n)
    return {"score": ident.mean_score, "detected": ident.detected}


def _mean(rows: dict[str, dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", nargs="+", default=["checker", "halfmoon", "house"])
    p.add_argument("--samples", type=int, default=16, help="samples per concept for identity")
    p.add_argument("--steps", type=int, help="tuning steps (default: each preset's)")
    p.add_argument("--conv-rank", type=int, default=0, help="tune with LoCon at this rank")
    p.add_argument(
        "--tuning-ablations", action="store_true", help="only: the paper tuning, one setting off"
    )
    p.add_argument(
        "--project-ablations",
        action="store_true",
        help="only: the project's tuning (toy), one of the paper's settings at a time",
    )
    p.add_argument(
        "--only", nargs="+", help="with --tuning/--project-ablations: only these ablations"
    )
    p.add_argument(
        "--attention-ablations",
        action="store_true",
        help="only: the paper tuning on photos with subject masks, each attention-regularisation "
        "form (the authors' linear and full-identity, the project's squared)",
    )
    p.add_argument(
        "--fuse-n",
        type=int,
        nargs="+",
        help="fuse the first N concepts, for each N (default: all of them)",
    )
    p.add_argument(
        "--lbfgs-unet-iterations",
        type=int,
        nargs="+",
        default=[50],
        help="L-BFGS iterations on the UNet spatial layers to compare (the authors': 50)",
    )
    p.add_argument(
        "--placement-seeds",
        type=int,
        default=10,
        help="seeds of the two-concept regional placement per fused model (0: skip)",
    )
    p.add_argument(
        "--placement-layout",
        choices=["tiles", "canvas"],
        default="tiles",
        help="placement sampled in side-by-side tiles of the base's size with the concepts' "
        "photo captions as prompts (as the README composes toy concepts, --native-views "
        "--view-overlap 0) or on one wide canvas with prompts naming a background",
    )
    p.add_argument(
        "--solvers-only", action="store_true", help="only: tune toy-paper, compare the solvers"
    )
    p.add_argument(
        "--tables-only", action="store_true", help="only: rewrite paper.md from --out/paper.json"
    )
    p.add_argument(
        "--presets",
        nargs="+",
        choices=["toy", "toy-paper"],
        default=["toy", "toy-paper"],
        help="tune the packages with these presets (the solvers need toy-paper)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/paper"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.tables_only:
        tables = markdown(json.loads((args.out / "paper.json").read_text()))
        (args.out / "paper.md").write_text(tables)
        print(tables)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.concepts
    results: dict = {
        "concepts": names,
        "samples": args.samples,
        "conv_rank": args.conv_rank,
        "steps": args.steps,
        "placement_layout": args.placement_layout,
        "tuning": {},
        "fusion": {},
    }
    fuse_n = sorted({min(n, len(names)) for n in (args.fuse_n or [len(names)]) if n >= 1})
    results["fuse_n"] = fuse_n

    if args.tuning_ablations or args.attention_ablations or args.project_ablations:
        ablations: dict[str, dict] = {}
        start = "toy" if args.project_ablations else "toy-paper"
        if args.attention_ablations:
            variants = {
                f"masks, attention_reg_form {f}": {"attention_reg_form": f} for f in ATTENTION_FORMS
            }
        else:
            more = PROJECT_ABLATIONS if args.project_ablations else TUNING_ABLATIONS
            if args.only:
                unknown = sorted(set(args.only) - set(more))
                if unknown:
                    p.error(f"--only: no ablation {unknown}; these are: {sorted(more)}")
                more = {k: v for k, v in more.items() if k in args.only}
            variants = {start: {}, **more}
        stem = (
            "attention"
            if args.attention_ablations
            else "project-tuning"
            if args.project_ablations
            else "tuning"
        )
        for label, given in variants.items():
            pkgs = [
                tuned(
                    n,
                    start,
                    args.out,
                    args.steps,
                    args.conv_rank,
                    f"+{label}" if given else "",
                    masks=args.attention_ablations,
                    **given,
                )  # fmt: skip
                for n in names
            ]
            ablations[label] = {
                p.concept.name: _identity(single_concept_pipeline(p), p.concept.name, args.samples)
                for p in pkgs
            }
            log.info("%s with %s: %s", start, label, ablations[label])
            (args.out / f"{stem}.json").write_text(json.dumps(ablations, indent=2))
        lines = [f"| {start} tuning | single-concept identity (score / detected) |", "|---|---|"]
        for label, rows in ablations.items():
            lines.append(
                f"| {label} | {_mean(rows, 'score'):.3f} / {_mean(rows, 'detected'):.0%} |"
            )
        (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return

    packages: dict[str, list[ConceptPackage]] = {}
    presets = ("toy-paper",) if args.solvers_only else tuple(args.presets)
    for preset in presets:
        packages[preset] = [tuned(n, preset, args.out, args.steps, args.conv_rank) for n in names]
        if args.solvers_only:
            continue
        single = {
            pkg.concept.name: concept_identity(
                single_concept_pipeline(pkg), pkg.concept.name, args.samples
            )  # fmt: skip
            for pkg in packages[preset]
        }
        results["tuning"][preset] = {
            n: {"score": i.mean_score, "detected": i.detected} for n, i in single.items()
        }
        log.info("%s single: %s", preset, results["tuning"][preset])

    for n in [] if args.solvers_only else fuse_n:
        for preset in presets:
            variants = [(v, c, False) for v, c in fusion_variants().items()]
            if n != fuse_n[-1]:  # the one-setting-off variants at the largest N only
                variants = [(v, c, w) for v, c, w in variants if v in ("project", "paper")]
            for variant, config, weight in [*variants, ("weight", FusionConfig(), True)]:
                group = packages[preset][:n]
                engine, row = fuse(group, config, weight)
                result = row.pop("result")
                fused = FusedModel.from_packages(result.strategy, result.factors, group)
                pipe = fused_pipeline(fused)
                row["identity"] = identities(pipe, names[:n], args.samples)
                if args.placement_seeds and n >= 2 and variant in ("project", "paper", "weight"):
                    tiles = args.placement_layout == "tiles"
                    pl = placement(  # tiles: as the README composes ("a photo of a <TOK>")
                        pipe, names[:2], args.placement_seeds, seed=3, tiles=tiles,
                        photo_prompts=tiles,
                    )  # fmt: skip
                    row["placement"] = {
                        "names": pl.names,
                        "all_placed": pl.all_placed,
                        "own_beats_other": pl.own_beats_other,
                        "in_own_box": pl.in_own_box,
                    }
                row["n"] = n
                key = f"{preset} packages, {variant} fusion"
                results["fusion"][key if len(fuse_n) == 1 else f"N = {n}, {key}"] = row
                log.info("N = %d, %s / %s: drift %.3f", n, preset, variant, row["unet_drift"])
                (args.out / "paper.json").write_text(json.dumps(results, indent=2, default=float))

    if "toy-paper" not in packages:  # the solvers compare on the authors' packages
        (args.out / "paper.md").write_text(markdown(results))
        print(markdown(results))
        return
    # solvers, on the paper fusion of the first three paper packages
    paper = FusionConfig(**load_preset("paper").fusion)
    group = packages["toy-paper"][:3]
    results["solver_concepts"] = [p.concept.name for p in group]
    solvers = {}
    runs = [("exact", {"solver": "exact"})] + [
        (
            "lbfgs" if k == 50 else f"lbfgs, {k} UNet iterations",
            {"solver": "lbfgs", "lbfgs_iterations_unet": k},
        )
        for k in args.lbfgs_unet_iterations
    ]
    for label, update in runs:
        engine, row = fuse(group, paper.model_copy(update=update))
        row.pop("result")
        solvers[label] = row
        log.info("solver %s: %s", label, row["objective"])
        results["solvers"] = solvers
        (args.out / "paper.json").write_text(json.dumps(results, indent=2, default=float))
    results["plain_sampling_images"] = engine.stage4_samples
    results["plain_sampling_s"] = plain_sampling_seconds(
        group, paper, results["plain_sampling_images"]
    )
    (args.out / "paper.json").write_text(json.dumps(results, indent=2, default=float))
    (args.out / "paper.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [
        f"Concepts: {', '.join(r['concepts'])}; identity over {r['samples']} samples each.",
        "",
    ]
    if r["tuning"]:
        lines += ["| tuning | single-concept identity (score / detected) |", "|---|---|"]
        for preset, rows in r["tuning"].items():
            lines.append(
                f"| {preset} | {_mean(rows, 'score'):.3f} / {_mean(rows, 'detected'):.0%} |"
            )
    if r["fusion"]:
        placed = any("placement" in row for row in r["fusion"].values())
        layout = {"tiles": "tiles", "canvas": "one canvas"}[r.get("placement_layout", "canvas")]
        head = (
            "| packages, fusion | mean UNet drift | the same concepts' own models | "
            "fused identity (score / detected) |"
        )
        lines += [
            "",
            head
            + (
                f" placement, 2 concepts, {layout} (both placed / own box first) |"
                if placed
                else ""
            ),
        ]
        lines += ["|---|---|---|---|" + ("---|" if placed else "")]
        for key, row in r["fusion"].items():
            ident = row["identity"]
            preset = "toy-paper" if "toy-paper packages" in key else "toy"
            own = {n: r["tuning"][preset][n] for n in ident if n in r["tuning"].get(preset, {})}
            own_cell = f"{_mean(own, 'score'):.3f} / {_mean(own, 'detected'):.0%}" if own else ""
            line = (
                f"| {key} | {row['unet_drift']:.3f} | {own_cell} | "
                f"{_mean(ident, 'score'):.3f} / {_mean(ident, 'detected'):.0%} |"
            )
            if placed:
                pl = row.get("placement")
                line += f" {pl['all_placed']:.0%} / {pl['own_beats_other']:.0%} |" if pl else " |"
            lines.append(line)
    if "solvers" not in r:
        return "\n".join(lines) + "\n"
    ex = r["solvers"]["exact"]
    lines += ["", "| stage | exact objective | L-BFGS | objective | gap | exact s | L-BFGS s |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for label, lb in r["solvers"].items():
        if label == "exact":
            continue
        for stage in ("text", "kv", "spatial"):
            e, b = ex["objective"][stage], lb["objective"][stage]
            start = ex["objective"][f"{stage} (weight fusion)"]
            lines.append(
                f"| {stage} | {e:.6g} | {label} | {b:.6g} | {(b - e) / max(e, 1e-300):+.2%} of "
                f"exact, {(b - e) / start:+.2e} of weight fusion's | {ex['timings'][stage]:.3f} | "
                f"{lb['timings'][stage]:.3f} |"
            )
    lb = r["solvers"].get("lbfgs")
    if lb is not None and "plain_sampling_s" in r:
        k = len(r.get("solver_concepts", r["concepts"]))
        n_images = r.get("plain_sampling_images")  # older runs sampled one image each
        images = f"{n_images} image(s) each as stage 4 does" if n_images else "1 image each"
        lines += [
            "",
            f"Gradient fusion (exact) {ex['seconds']:.2f} s, L-BFGS {lb['seconds']:.2f} s "
            f"({lb['seconds'] / ex['seconds']:.1f}x); sampling the {k} concept "
            f"models alone for the same steps, {images}, {r['plain_sampling_s']:.2f} s: fusion is "
            f"{ex['seconds'] / r['plain_sampling_s']:.2f}x plain sampling.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
