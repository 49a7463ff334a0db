"""The paper's claims on the toy world (issue 6), from one command, on CPU.

    python benchmarks/bench_toyworld.py                       # all 8 concepts, ~30 min on 2 cores
    python benchmarks/bench_toyworld.py --concepts checker ring --samples 4 --steps 50   # smoke

On the committed toy base (``--base-model toy``):

1. the detector's accuracy: held-out photos of each concept vs everything else (other
   concepts' photos, base-world scenes, base samples of the class word);
2. identity (detector score and detection rate of "a photo of a <TOK>" samples) of the base
   (class-word samples), ED-LoRA and vanilla LoRA, each with the LoRA on and at scale 0
   (embedding only);
3. single -> fused for N = 2, 5, 8: identity of each concept in the gradient-fused and the
   weight-fused model, and the mean drop from its single-concept model;
4. regional sampling of 2 and 3 concepts side by side (from each group's own gradient
   fusion, or with ``--placement-from all`` from the N = 8 one):
   how often each concept is found in its own box and in no other, against one plain prompt
   naming them all; and the same regional samples from concepts tuned on annotated photos
   (captions naming the background, subject masks: ``world.concept_photos_annotated``),
   whose tokens are trained on the concept alone rather than on the whole photo; and both
   regional and plain again with the canvas denoised in native-size windows
   (``native_views``, half overlapping, and as side-by-side tiles) and the concepts'
   training caption as prompts ("a photo of a <TOK>").

Writes ``--out``/toyworld.json, toyworld.md (the table for RESULTS.md) and PNG grids.
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

from mos.common.fused import FusedModel
from mos.common.images import image_grid
from mos.server.fusion import FusionConfig, FusionEngine
from mos.toyworld import evaluate as ev
from mos.toyworld import world
from mos.toyworld.analyse import ConceptDetector
from mos.toyworld.model import WEIGHTS, toy_weights_path

log = logging.getLogger("bench_toyworld")
COMMITTED = "toyworld/weights/toy-base.safetensors (committed)"


def detector_accuracy(names: list[str], base_pipe, n: int = 20) -> dict:
    """Per concept: true-positive rate on held-out photos, false-positive rate elsewhere."""
    import random

    rng = random.Random(99)
    scenes = [
        world.render_scene(world.random_scene(rng, n_objects=1 + i % 2)) for i in range(n * 4)
    ]
    base_samples = {
        cls: ev.samples(base_pipe, f"a photo of a {cls}", n, seed=5)
        for cls in sorted({world.CONCEPTS[k].class_word for k in names})
    }
    out = {}
    for name in world.CONCEPTS:
        det = ConceptDetector(name)
        own = [det.score(p) for p in world.concept_photos(name, n, seed=1000, size=32)]
        others = [
            det.score(p)
            for o in world.CONCEPTS
            if o != name
            for p in world.concept_photos(o, 5, seed=1000, size=32)
        ]
        others += [det.score(s) for s in scenes]
        others += [det.score(s) for imgs in base_samples.values() for s in imgs]
        out[name] = {
            "tpr": sum(s >= ev.DETECTED for s in own) / len(own),
            "fpr": sum(s >= ev.DETECTED for s in others) / len(others),
            "own_mean": statistics.mean(own),
            "others_mean": statistics.mean(others),
            "n_own": len(own),
            "n_others": len(others),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", nargs="+", default=list(world.CONCEPTS))
    p.add_argument(
        "--steps", type=int, default=ev.TOY_TRAINING["steps"], help="tuning steps per concept"
    )
    p.add_argument(
        "--conv-rank",
        type=int,
        default=0,
        help="also tune LoRA on the UNet's up-block ResNet convolutions at this rank (LoCon; 0: the "
        "paper's ED-LoRA), for every tuning of the run",
    )
    p.add_argument("--samples", type=int, default=16, help="samples per concept and model")
    p.add_argument("--placement-seeds", type=int, default=10)
    p.add_argument("--fuse-n", type=int, nargs="+", default=[2, 5, 8])
    p.add_argument(
        "--placement-from",
        choices=("group", "all"),
        default="group",
        help="sample each placement group from its own gradient fusion (default) or from the "
        "fusion of the largest --fuse-n",
    )
    p.add_argument(
        "--no-annotated",
        action="store_true",
        help="skip placement with concepts tuned on captioned and masked photos",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/toyworld"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mos").setLevel(logging.WARNING)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.concepts
    fuse_n = [n for n in args.fuse_n if n <= len(names)]
    t0 = time.time()
    result: dict = {
        "concepts": names,
        "steps": args.steps,
        "conv_rank": args.conv_rank,
        "samples": args.samples,
    }

    base_pipe = ev.MixOfShowPipeline.from_base(ev.toy_base())
    # $MOS_TOY_WEIGHTS names another toy base (e.g. one trained on a GPU) than the committed one
    weights = toy_weights_path()
    result["base"] = {
        "weights": COMMITTED if weights == WEIGHTS else str(weights),
        "unet_channels": list(base_pipe.unet.config.block_out_channels),
    }
    log.info("detector accuracy")
    result["detector"] = detector_accuracy(names, base_pipe)

    rows: dict[str, list] = {}
    ident: dict[str, dict] = {}
    packages: dict[str, dict] = {"edlora": {}, "lora": {}}
    for name in names:
        cls = world.CONCEPTS[name].class_word
        base_imgs = ev.samples(base_pipe, f"a photo of a {cls}", args.samples, seed=1)
        ident[name] = {"base": ev.identity(base_imgs, name).__dict__}
        rows[name] = [world.concept_photos(name, 1, seed=0, size=32)[0], base_imgs[0]]
        for method in ("edlora", "lora"):
            start = time.time()
            cfg = ev.toy_train_config(
                method=method, steps=args.steps, conv_rank=args.conv_rank, seed=0
            )
            pkg = ev.tune(name, cfg)
            packages[method][name] = pkg
            pipe = ev.single_concept_pipeline(pkg)
            for scale, label in ((None, method), (0.0, f"{method} scale 0")):
                imgs = ev.samples(
                    pipe, f"a photo of a <{name}>", args.samples, seed=1, lora_scale=scale
                )
                ident[name][label] = ev.identity(imgs, name).__dict__
                rows[name].append(imgs[0])
            log.info(
                "%s %s: %.0f s; identity %.2f (scale 0: %.2f)",
                name,
                method,
                time.time() - start,
                ident[name][method]["mean_score"],
                ident[name][f"{method} scale 0"]["mean_score"],
            )
    result["identity"] = {
        n: {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in d.items()}
        for n, d in ident.items()
    }

    fusion: dict = {}
    fused8 = None
    for n in fuse_n:
        subset = names[:n]
        pkgs = [packages["edlora"][k] for k in subset]
        engine = FusionEngine(ev.toy_base(), pkgs, FusionConfig())
        for strategy in ("gradient-fusion", "weight-fusion"):
            start = time.time()
            res = (
                engine.fuse(progress=False)
                if strategy == "gradient-fusion"
                else engine.weight_fusion()
            )
            fused = FusedModel.from_packages(res.strategy, res.factors, pkgs)
            pipe = ev.fused_pipeline(fused)
            per = {}
            for k in subset:
                imgs = ev.samples(pipe, f"a photo of a <{k}>", args.samples, seed=1)
                per[k] = ev.identity(imgs, k)
                if n == max(fuse_n):
                    rows[k].append(imgs[0])
            single = {k: ident[k]["edlora"]["mean_score"] for k in subset}
            # the same seeds as the single-concept samples: paired per-sample drops
            diffs = [
                a - b
                for k in subset
                for a, b in zip(ident[k]["edlora"]["scores"], per[k].scores, strict=True)
            ]
            fusion[f"{n}/{strategy}"] = {
                "mean_score": statistics.mean(per[k].mean_score for k in subset),
                "detected": statistics.mean(per[k].detected for k in subset),
                "single_mean_score": statistics.mean(single.values()),
                "drop": statistics.mean(single[k] - per[k].mean_score for k in subset),
                # one (concept, sample) pair has no spread to measure
                "drop_se": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
                "per_concept": {k: per[k].mean_score for k in subset},
                "seconds": round(time.time() - start, 1),
            }
            log.info("N=%d %s: drop %.3f", n, strategy, fusion[f"{n}/{strategy}"]["drop"])
            if n == max(fuse_n) and strategy == "gradient-fusion":
                fused8 = fused
    result["fusion"] = fusion

    placement: dict = {}
    grids = []

    def record(key: str, pl: ev.Placement) -> None:
        placement[key] = {
            "all_placed": pl.all_placed,
            "in_own_box": dict(zip(pl.names, pl.in_own_box, strict=True)),
            "own_beats_other": pl.own_beats_other,
        }
        grids.append((key, pl.images))
        log.info("%s: all placed %.2f", key, pl.all_placed)

    if fused8 is not None:
        top = min(len(names), max(fuse_n))
        groups = [names[i : i + 2] for i in range(0, top - 1, 2)]
        groups += [names[i : i + 3] for i in range(0, top - 2, 3)]
        pipe8 = ev.fused_pipeline(fused8)
        for group in groups:
            if args.placement_from == "all":
                pipe = pipe8
            else:  # the group's own gradient fusion, as a user composing them would fuse
                pkgs = [packages["edlora"][k] for k in group]
                res = FusionEngine(ev.toy_base(), pkgs, FusionConfig()).fuse(progress=False)
                pipe = ev.fused_pipeline(FusedModel.from_packages(res.strategy, res.factors, pkgs))
            for layout in ("whole", "views", "tiles"):
                for regional in (True, False):
                    pl = ev.placement(
                        pipe,
                        group,
                        args.placement_seeds,
                        seed=3,
                        regional=regional,
                        views=layout == "views",
                        tiles=layout == "tiles",
                        photo_prompts=layout != "whole",
                    )
                    mode = ("" if layout == "whole" else f"{layout}-") + (
                        "regional" if regional else "plain"
                    )
                    record(f"{'+'.join(group)}/{mode}", pl)
        if not args.no_annotated:
            placed = sorted({k for g in groups for k in g}, key=names.index)
            log.info("tuning %s on captioned and masked photos", ", ".join(placed))
            cfg = ev.toy_train_config(steps=args.steps, conv_rank=args.conv_rank, seed=0)
            pkgs = [ev.tune(k, cfg, captions=True, masks=True) for k in placed]
            res = FusionEngine(ev.toy_base(), pkgs, FusionConfig()).fuse(progress=False)
            pipe = ev.fused_pipeline(FusedModel.from_packages(res.strategy, res.factors, pkgs))
            for group in groups:
                pl = ev.placement(pipe, group, args.placement_seeds, seed=3)
                record(f"{'+'.join(group)}/annotated", pl)
    result["placement_from"] = args.placement_from
    result["placement"] = placement
    result["seconds"] = round(time.time() - t0)

    labels = ["photo", "base (class word)", "ED-LoRA", "ED-LoRA scale 0", "LoRA", "LoRA scale 0"]
    if fused8 is not None:
        labels += [f"fused N={max(fuse_n)} gradient", f"fused N={max(fuse_n)} weight"]
    image_grid([rows[k] for k in names], names, labels, min_cell=96).save(args.out / "identity.png")
    for key, images in grids:
        image_grid([images], [key], (), min_cell=96).save(
            args.out / f"placement-{key.replace('/', '-')}.png"
        )
    (args.out / "toyworld.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "toyworld.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    conv = f" with LoRA on the up-block ResNet convolutions at rank {r['conv_rank']} (LoCon)"
    lines = [
        f"Concepts: {', '.join(r['concepts'])}; {r['steps']} tuning steps"
        f"{conv if r.get('conv_rank') else ''}; {r['samples']} samples each; {r['seconds']} s in all.",
        "",
    ]
    if "base" in r:  # absent in results written before it was recorded
        channels = ", ".join(map(str, r["base"]["unet_channels"]))
        lines[-1:-1] = [f"Base: `{r['base']['weights']}`, UNet ({channels})."]
    lines += ["| detector | TPR (held-out photos) | FPR (other images) |", "|---|---|---|"]
    for k, d in r["detector"].items():
        lines.append(
            f"| {k} | {d['tpr']:.2f} (n={d['n_own']}) | {d['fpr']:.3f} (n={d['n_others']}) |"
        )
    lines += [
        "",
        "| identity: mean score / detected | base (class word) | ED-LoRA | ED-LoRA scale 0 | LoRA | LoRA scale 0 |",
        "|---|---|---|---|---|---|",
    ]
    cols = ["base", "edlora", "edlora scale 0", "lora", "lora scale 0"]
    for k, d in r["identity"].items():
        lines.append(
            f"| {k} | "
            + " | ".join(f"{d[c]['mean_score']:.2f} / {d[c]['detected']:.2f}" for c in cols)
            + " |"
        )
    means = {c: statistics.mean(d[c]["mean_score"] for d in r["identity"].values()) for c in cols}
    lines.append("| **mean** | " + " | ".join(f"**{means[c]:.2f}**" for c in cols) + " |")
    lines += [
        "",
        "| fusion | single (mean score) | gradient fusion | drop ± paired s.e. | weight fusion | drop ± paired s.e. | drop ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    ns = sorted({int(k.split("/")[0]) for k in r["fusion"]})
    for n in ns:
        g, w = r["fusion"][f"{n}/gradient-fusion"], r["fusion"][f"{n}/weight-fusion"]
        ratio = g["drop"] / w["drop"] if w["drop"] > 0 else float("nan")
        lines.append(
            f"| N = {n} | {g['single_mean_score']:.3f} | {g['mean_score']:.3f} | {_drop(g)} | {w['mean_score']:.3f} | {_drop(w)} | {ratio:.2f} |"
        )
    if r["placement"]:
        lines += [
            "",
            f"Placement from {_placement_source(r)}; native views half overlapping, tiles side "
            "by side (one window per strip), both with the training captions as prompts.",
            "",
            "| placement: all concepts in own box, none elsewhere (scores highest in own box) | regional | plain prompt | regional, concepts tuned on annotated photos | regional, native views | plain prompt, native views | regional, tiles | plain prompt, tiles |",
            "|---|---|---|---|---|---|---|---|",
        ]
        groups = sorted({k.split("/")[0] for k in r["placement"]}, key=lambda g: (g.count("+"), g))
        for g in groups:
            cells = []
            modes = ("regional", "plain", "annotated", "views-regional", "views-plain")
            for mode in (*modes, "tiles-regional", "tiles-plain"):
                d = r["placement"].get(f"{g}/{mode}")
                if d is None:
                    cells.append("-")
                    continue
                beats = d.get("own_beats_other")
                cells.append(
                    f"{d['all_placed']:.2f}" + (f" ({beats:.2f})" if beats is not None else "")
                )
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        tiles = {
            k.split("/")[0]: d for k, d in r["placement"].items() if k.endswith("/tiles-regional")
        }
        if tiles and isinstance(next(iter(tiles.values()))["in_own_box"], dict):
            lines += ["", "| regional, tiles: each concept in its own box | |", "|---|---|"]
            for g, d in tiles.items():
                own = ", ".join(f"{k} {v:.2f}" for k, v in d["in_own_box"].items())
                lines.append(f"| {g} | {own} |")
    return "\n".join(lines) + "\n"


def _placement_source(r: dict) -> str:
    if r.get("placement_from", "all") == "group":
        return "each group's own gradient fusion (N = 2 or 3)"
    return f"the gradient fusion of N = {max(int(k.split('/')[0]) for k in r['fusion'])}"


def _drop(d: dict) -> str:
    se = d.get("drop_se")  # absent in results written before it was measured
    return f"{d['drop']:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


if __name__ == "__main__":
    sys.exit(main())
