"""``mos-demo``: the README's main command, end to end on the built-in tiny model.

It draws a few "photos" of a made-up concept (a smiling sprite with a red hat, at random
places and sizes on random backgrounds), then runs ``mos-client`` on them exactly as a user
would, writing the concept package, the validation grid and the loss curve to ``--out``.
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


def write_demo_photos(folder: Path, count: int = 6, seed: int = 0, size: int = 96) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:02d}.png"
        draw_sprite_photo(rng, size).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mos-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    photos = args.out / "photos"
    write_demo_photos(photos)
    print(f"mos-demo: wrote demo photos to {photos}")
    code = cli.main(
        [
            "--data",
            str(photos),
            "--concept",
            "<smiley1>",
            "--class-word",
            "face",
            "--steps",
            str(args.steps),
            "--batch-size",
            "4",
            "--out",
            str(args.out / "smiley1.safetensors"),
            "--force",
        ]
    )
    if code == 0:
        print(
            f"mos-demo: done. Look at {args.out}/smiley1.samples.png and {args.out}/smiley1.loss.png"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
