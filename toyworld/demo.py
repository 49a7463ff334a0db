"""``mos-demo``: the README's main command, end to end on the built-in toy model.

It draws eight "photos" of each of three toy concepts (a red-and-white checker square, a
disc half purple and half orange, a blue house with a red roof), one folder per client,
and runs the federation on them with Flower's simulation engine (``mos-simulate``): each
virtual client tunes its concept with ED-LoRA, plus LoRA on the UNet's convolutions
(LoCon, ``--conv-rank 16``; ``--conv-rank 0`` is the paper's ED-LoRA alone), and uploads
only its package; the server fuses them and sends the fused model back. It ends by
composing the concepts side by side with regional sampling, each box in its own
native-size window (``composed.png``), checked with the toy world's detector. In
``--out``:
``server/`` (registry, ``models/v1`` with the fused model and its fidelity report),
``clients/<name>/`` (each client's package and its copy of the fused model) and
``composed.png``.

The toy model follows prompts (91% of held-out prompts). With LoCon its concepts come out
recognisably (the paper's ED-LoRA alone draws their colours, not their layout), and each
lands in its own box about as often as the fused model draws it alone; all three in the
same image less often (benchmarks/RESULTS.md, toy world). The demo prints both.
``--base-model tiny`` runs it on the random-weight tiny model instead (three made-up
concepts; every code path in seconds, samples are noise), ``--base-model tiny-sdxl`` on
the random-weight SDXL-shaped one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from mos.client.layout import CLIENT_FILE


def draw_sprite_photo(rng: random.Random, size: int = 96) -> Image.Image:
    """One photo of the demo concept: a yellow face with a red hat on a random background."""
    bg = tuple(rng.randint(40, 220) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r + r // 2, size - r)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 210, 40), outline=(60, 40, 0))
    e = max(1, r // 5)
    for ex in (cx - r // 3, cx + r // 3):
        d.ellipse((ex - e, cy - r // 4 - e, ex + e, cy - r // 4 + e), fill=(20, 20, 20))
    d.arc(
        (cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2),
        20,
        160,
        fill=(120, 20, 20),
        width=max(1, r // 8),
    )
    d.polygon([(cx - r, cy - r // 2), (cx + r, cy - r // 2), (cx, cy - 2 * r)], fill=(210, 30, 40))
    return img


def draw_ring_photo(rng: random.Random, size: int = 96) -> Image.Image:
    """One photo of the second demo concept: a thick blue ring with a white dot."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(120, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(20, 40, 200), width=max(2, r // 3))
    d.ellipse((cx - r // 5, cy - r // 5, cx + r // 5, cy + r // 5), fill=(255, 255, 255))
    return img


def write_demo_photos(
    folder: Path, count: int = 6, seed: int = 0, size: int = 96, draw=draw_sprite_photo
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:02d}.png"
        draw(rng, size).save(path)
        paths.append(path)
    return paths


def draw_star_photo(rng: random.Random, size: int = 96) -> Image.Image:
    """One photo of the third demo concept: a green five-pointed star with a purple rim."""
    import math

    img = Image.new("RGB", (size, size), tuple(rng.randint(150, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    points = [
        (
            cx + (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi * k / 5),
            cy - (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi * k / 5),
        )
        for k in range(10)
    ]
    d.polygon(points, fill=(30, 170, 60), outline=(120, 30, 150), width=max(1, r // 6))
    return img


DEMO_CONCEPTS = (
    ("smiley1", "face", draw_sprite_photo),
    ("ring2", "toy", draw_ring_photo),
    ("star3", "star", draw_star_photo),
)


def write_client_folders(root: Path, count: int = 6, size: int = 96) -> list[Path]:
    """One photo folder per demo client, each with its ``.mos-client.json``."""
    folders = []
    for i, (name, class_word, draw) in enumerate(DEMO_CONCEPTS):
        folder = root / name
        write_demo_photos(folder, count=count, seed=i, size=size, draw=draw)
        (folder / CLIENT_FILE).write_text(json.dumps({"concept": name, "class_word": class_word}))
        folders.append(folder)
    return folders


# three concepts that LoCon draws recognisably, in colour pairs that differ (the earlier
# trio's checker and swiss are both red and white; RESULTS.md)
TOY_DEMO_CONCEPTS = ("checker", "halfmoon", "house")


def write_toy_folders(root: Path, count: int = 8) -> list[Path]:
    """One photo folder per toy-world demo client, each with its ``.mos-client.json``."""
    from .evaluate import write_concept_folder

    return [write_concept_folder(root / name, name, count, seed=0) for name in TOY_DEMO_CONCEPTS]


def compose(out: Path, names: list[str], seeds: int = 4) -> Path:
    """Draw ``names`` side by side from the latest fused model; report where each is found."""
    from mos.common.base import load_base_model
    from mos.common.fused import COMPACT_FILE, FusedModel
    from mos.common.images import image_grid
    from mos.common.pipeline import MixOfShowPipeline

    from . import evaluate as ev

    models = sorted((out / "server" / "models").glob("v*"), key=lambda p: int(p.name[1:]))
    fused = FusedModel.load_compact(models[-1] / COMPACT_FILE)
    base = load_base_model("toy")
    pipe = MixOfShowPipeline.from_base(base, fused.attach(base))
    # the concepts' training caption as prompts, each box denoised in its own window of the
    # base's size: the setting that puts toy concepts in their boxes whole (RESULTS.md)
    placed = ev.placement(pipe, names, seeds, seed=0, tiles=True, photo_prompts=True)
    path = out / "composed.png"
    labels = [f"seed {k}" for k in range(seeds)]
    row = " | ".join(f"<{n}>" for n in names)
    image_grid([placed.images], [row], labels, min_cell=288).save(path)  # 3x: pixels visible
    for name, rate in zip(names, placed.in_own_box, strict=True):
        print(f"mos-demo: <{name}> found in its own box in {rate:.0%} of {seeds} seeds")
    print(
        "mos-demo: a concept looks most like itself in its own box in "
        f"{placed.own_beats_other:.0%} of the (seed, concept) pairs"
    )
    print(f"mos-demo: all {len(names)} in their boxes (and not elsewhere): {placed.all_placed:.0%}")
    return path


def main(argv: list[str] | None = None) -> int:
    from mos.server.launch import simulate_main

    p = argparse.ArgumentParser(prog="mos-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="ED-LoRA steps on each client (0: 300 on tiny; on toy 1000 with LoCon, 400 without)",
    )
    p.add_argument(
        "--conv-rank",
        type=int,
        help="clients also tune LoRA on the UNet's up-block ResNet convolutions at this rank (LoCon, "
        "beyond the paper; default 16 on toy, which draws the concepts recognisably with it, "
        "0 on tiny; 0: the paper's ED-LoRA alone)",
    )
    p.add_argument("--clients", type=int, default=3, choices=(1, 2, 3))
    p.add_argument(
        "--fusion-steps",
        type=int,
        help="sampler steps of each image the server draws from a concept's model to fuse it "
        "(default 20, the paper's; fewer: a quicker, rougher fusion)",
    )
    p.add_argument(
        "--base-model",
        default="toy",
        choices=("toy", "tiny", "tiny-sdxl"),
        help="toy (the trained toy world, the default), tiny (random weights: every code "
        "path, noise for samples) or tiny-sdxl (the same on an SDXL-shaped model)",
    )
    args = p.parse_args(argv)
    if args.fusion_steps is not None and args.fusion_steps < 1:
        p.error(f"--fusion-steps must be at least 1, got {args.fusion_steps}")
    toy = args.base_model == "toy"
    if toy:  # the toy base's presets: with LoCon unless told --conv-rank 0
        preset = "toy" if args.conv_rank == 0 else "toy-locon"
        training = ["--preset", preset]
        if args.conv_rank:
            training += ["--conv-rank", str(args.conv_rank)]
        if args.steps:
            training += ["--steps", str(args.steps)]
    else:
        training = ["--steps", str(args.steps or 300), "--conv-rank", str(args.conv_rank or 0)]
    folders = (write_toy_folders if toy else write_client_folders)(args.out / "photos")
    print(f"mos-demo: wrote the photos of {len(folders)} clients to {args.out / 'photos'}")
    code = simulate_main(
        [
            "--clients",
            str(args.clients),
            "--data-root",
            str(args.out / "photos"),
            "--out",
            str(args.out),
            *training,
            "--base-model",
            args.base_model,
            *(["--fusion-steps", str(args.fusion_steps)] if args.fusion_steps is not None else []),
        ]
    )
    if code != 0:
        return code
    print(
        f"mos-demo: the fused model and its report: {args.out}/server/models/; "
        f"each client's copy: {args.out}/clients/<name>/fused/"
    )
    if toy:
        names = sorted(f.name for f in folders)[: args.clients]
        path = compose(args.out, names)
        print(f"mos-demo: done. The concepts composed by regional sampling: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
