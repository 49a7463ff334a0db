"""``mos-demo``: the README's main command, end to end on the built-in tiny model.

It draws a few "photos" of two made-up concepts (a smiling sprite with a red hat; a blue
ring), tunes each with ``mos-client`` exactly as two users would, then fuses both packages
with ``mos-fuse``. In ``--out``: each concept's package, sample grid and loss curve, and
``fused/`` with the fused model and its fusion report.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from . import cli


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


DEMO_CONCEPTS = (("smiley1", "face", draw_sprite_photo), ("ring2", "toy", draw_ring_photo))


def main(argv: list[str] | None = None) -> int:
    from ..server import cli as fuse_cli

    p = argparse.ArgumentParser(prog="mos-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    packages = []
    for name, class_word, draw in DEMO_CONCEPTS:
        photos = args.out / "photos" / name
        write_demo_photos(photos, draw=draw)
        print(f"mos-demo: wrote demo photos of <{name}> to {photos}")
        package = args.out / f"{name}.safetensors"
        options = ["--class-word", class_word, "--steps", str(args.steps), "--batch-size", "4"]
        code = cli.main(
            [
                "--data",
                str(photos),
                "--concept",
                f"<{name}>",
                *options,
                "--out",
                str(package),
                "--force",
            ]
        )
        if code:
            return code
        packages.append(str(package))
    code = fuse_cli.main(["--concepts", *packages, "--out", str(args.out / "fused"), "--force"])
    if code == 0:
        print(
            f"mos-demo: done. Look at {args.out}/*.samples.png (each concept), "
            f"{args.out}/fused/fusion_report.md and .png (the fused model)"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
