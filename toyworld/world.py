"""The toy world: coloured shapes on coloured backgrounds, and personal concepts.

Base-world images (32x32 px) show one or two filled shapes (circle, square, triangle) in
one of eight colours on a background of another, captioned "a red circle on a blue
background" or "a red circle and a blue square on a green background"; some single objects
are two-tone ("a red and white checker square", ``PATTERNS``); wide scenes (64x32, 96x32)
put one full-size object in each 32x32 part (``random_wide_scene``). Personal concepts
are multi-coloured sprites the base model never sees (a red-and-white checker square, a
blue ring with a yellow centre, ...); each has a generator of "photos" (position, scale
and background vary). Everything is drawn at 4x and box-filtered down, so edges are
anti-aliased, and is a pure function of its random generator.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw

Fill = int | tuple[int, ...]  # a colour as ImageDraw takes it: L value or RGB

SIZE = 32  # px, the base model's native resolution
SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Extra words of the toy world's tokenizer beyond the tiny model's vocabulary.
WORDS = ("circle", "square", "triangle", "checker", "ring", "flag", "mushroom", "diamond")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _rgb(name: str) -> tuple[int, int, int]:
    return PALETTE[name]


def draw_shape(
    d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Fill
) -> None:
    """A filled shape of half-size ``r`` centred at (cx, cy), in the drawing's pixels."""
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


# Two-tone objects of the base world: the second colour in the right half ("a red and white
# square"), in a dot at the centre ("a red square with a white center"), in the top-right and
# bottom-left quarters ("a red and white checker square") or in the upper half ("a red square
# with a white top"). They give the base model objects with inner structure, as SD knows
# "striped" without knowing anyone's bag.
PATTERNS = ("halves", "center", "checker", "top")


@dataclass(frozen=True)
class Thing:
    """One object of a scene: colour, shape, centre and half-size in output pixels; a
    two-tone object also has a ``pattern`` and its ``second`` colour."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float
    pattern: str | None = None
    second: str | None = None

    @property
    def words(self) -> str:
        if self.pattern == "halves":
            return f"{article(self.colour)} {self.colour} and {self.second} {self.shape}"
        # "with a" before every colour, "a orange center" too: the committed base was
        # trained on these captions (tests/test_toyworld.py pins them)
        if self.pattern == "center":
            return f"{article(self.colour)} {self.colour} {self.shape} with a {self.second} center"
        if self.pattern == "checker":
            return f"{article(self.colour)} {self.colour} and {self.second} checker {self.shape}"
        if self.pattern == "top":
            return f"{article(self.colour)} {self.colour} {self.shape} with a {self.second} top"
        return f"{article(self.colour)} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]

    @property
    def caption(self) -> str:
        objects = " and ".join(t.words for t in self.things)
        return f"{objects} on {article(self.background)} {self.background} background"


def render_scene(scene: Scene, size: int = SIZE, width: int | None = None) -> Image.Image:
    """The scene as a ``width`` x ``size`` px image (square unless ``width`` is given)."""
    s = SUPERSAMPLE
    width = width or size
    img = Image.new("RGB", (width * s, size * s), _rgb(scene.background))
    d = ImageDraw.Draw(img)
    for t in scene.things:
        cx, cy, r = t.cx * s, t.cy * s, t.r * s
        draw_shape(d, t.shape, cx, cy, r, _rgb(t.colour))
        if t.pattern in ("halves", "checker", "top"):
            # the second colour where the shape meets the pattern's region
            w, h = img.size
            region = Image.new("L", img.size, 0)
            rd = ImageDraw.Draw(region)
            if t.pattern == "halves":
                rd.rectangle((cx, 0, w, h), fill=255)
            elif t.pattern == "top":
                rd.rectangle((0, 0, w, cy), fill=255)
            else:
                rd.rectangle((cx, 0, w, cy), fill=255)
                rd.rectangle((0, cy, cx, h), fill=255)
            mask = Image.new("L", img.size, 0)
            draw_shape(ImageDraw.Draw(mask), t.shape, cx, cy, r, 255)
            img.paste(_rgb(t.second or t.colour), mask=ImageChops.darker(mask, region))
        elif t.pattern == "center":
            # the triangle's centroid lies a third of the way up from its base
            dy, hr = (r / 3, 0.3 * r) if t.shape == "triangle" else (0.0, 0.45 * r)
            d.ellipse(
                (cx - hr, cy + dy - hr, cx + hr, cy + dy + hr), fill=_rgb(t.second or t.colour)
            )
        elif t.pattern is not None:
            raise ValueError(f"unknown pattern {t.pattern!r}; the world has {', '.join(PATTERNS)}")
    return img.resize((width, size), Image.Resampling.BOX)


def _two_tone(rng: random.Random, t: Thing, background: str) -> Thing | None:
    """``t`` with a random pattern and second colour, or None where the colour pair is a
    personal concept's (the caller draws again)."""
    second = rng.choice([c for c in COLOURS if c not in (background, t.colour)])
    if frozenset((t.colour, second)) in concept_colour_pairs():
        return None
    return Thing(t.colour, t.shape, t.cx, t.cy, t.r, rng.choice(PATTERNS), second)


def random_scene(
    rng: random.Random,
    *,
    n_objects: int = 1,
    exclude: frozenset[tuple[str, str, str]] = frozenset(),
    size: int = SIZE,
    two_tone: float = 0.0,
) -> Scene:
    """A random scene; single-object scenes avoid the (colour, shape, background) in ``exclude``
    and are two-tone with probability ``two_tone`` (never in a personal concept's colour pair)."""
    while True:
        bg = rng.choice(COLOURS)
        things: list[Thing] = []
        for i in range(n_objects):
            colour = rng.choice([c for c in COLOURS if c != bg])
            shape = rng.choice(SHAPES)
            if n_objects == 1:
                r = rng.uniform(6, 11) * size / SIZE
                cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            else:  # side by side: one object per half, left or right first
                r = rng.uniform(4.5, 7.5) * size / SIZE
                half = size / n_objects
                cx = rng.uniform(half * i + r, half * (i + 1) - r)
                cy = rng.uniform(r, size - r)
            things.append(Thing(colour, shape, cx, cy, r))
        if n_objects > 1 and rng.random() < 0.5:
            things.reverse()  # captions name left and right objects in either order
        scene = Scene(bg, tuple(things))
        if n_objects == 1 and (things[0].colour, things[0].shape, bg) in exclude:
            continue
        if n_objects == 1 and two_tone > 0 and rng.random() < two_tone:
            t = _two_tone(rng, things[0], bg)
            if t is None:
                continue
            scene = Scene(bg, (t,))
        return scene


def random_wide_scene(
    rng: random.Random,
    parts: int,
    *,
    n_objects: int | None = None,
    exclude: frozenset[tuple[str, str, str]] = frozenset(),
    two_tone: float = 0.0,
) -> Scene:
    """A scene on a canvas ``parts`` squares wide (``parts * SIZE`` x ``SIZE`` px), its
    objects at full single-object scale, each in its own square part (``n_objects``, default
    ``parts``, of them, in random parts, named left to right or right to left): the layout
    regional sampling asks for, one concept per part (``train.py --wide``). Two-tone objects
    as in ``random_scene``; a lone object avoids the (colour, shape, background) in
    ``exclude``."""
    n_objects = parts if n_objects is None else n_objects
    if not 1 <= n_objects <= parts:
        raise ValueError(f"{n_objects} objects do not fit one per part in {parts} parts")
    while True:
        bg = rng.choice(COLOURS)
        things: list[Thing] = []
        for part in sorted(rng.sample(range(parts), n_objects)):
            colour = rng.choice([c for c in COLOURS if c != bg])
            shape = rng.choice(SHAPES)
            r = rng.uniform(6, 11)
            cx = rng.uniform(SIZE * part + r, SIZE * (part + 1) - r)
            t = Thing(colour, shape, cx, rng.uniform(r, SIZE - r), r)
            if two_tone > 0 and rng.random() < two_tone:
                t = _two_tone(rng, t, bg) or t
            things.append(t)
        if n_objects == 1 and (things[0].colour, things[0].shape, bg) in exclude:
            continue
        if rng.random() < 0.5:
            things.reverse()
        return Scene(bg, tuple(things))


# A sketch is what an edge detector draws from an image, as the sketch T2I-Adapter's
# training pairs were made (docs/method.md, section 3): white where the colour changes by more
# than SKETCH_THRESHOLD (of 255, in any channel) to the right or below, black elsewhere.
# The base world's anti-aliased edges change by 40-255 over one or two pixels.
SKETCH_THRESHOLD = 48


def sketch_tensor(images: torch.Tensor, threshold: int = SKETCH_THRESHOLD) -> torch.Tensor:
    """Sketches of ``images`` (uint8 ``[n, 3, H, W]``): float ``[n, 1, H, W]`` in {0, 1}, 1
    where a pixel differs from its right or lower neighbour by more than ``threshold`` in
    some channel (the last column and row compare with nothing)."""
    x = images.to(torch.int16)
    edge = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1, keepdim=True) > threshold
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=1, keepdim=True) > threshold
    edge[..., :, :-1] |= dx
    edge[..., :-1, :] |= dy
    return edge.float()


def sketch_of(image: Image.Image, threshold: int = SKETCH_THRESHOLD) -> Image.Image:
    """The sketch of an RGB image: an L-mode image, white lines on black."""
    arr = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    t = sketch_tensor(torch.from_numpy(np.ascontiguousarray(arr))[None], threshold)
    return Image.fromarray((t[0, 0].numpy() * 255).astype(np.uint8), mode="L")


def held_out_triples(seed: int = 1234, fraction: float = 0.2) -> frozenset[tuple[str, str, str]]:
    """(colour, shape, background) triples the base model never sees as single objects."""
    triples = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b]
    rng = random.Random(seed)
    rng.shuffle(triples)
    return frozenset(triples[: int(len(triples) * fraction)])


# --- personal concepts ------------------------------------------------------------------

# A part drawer: (draw, cx, cy, r, fill_of_part) where fill_of_part(i) gives part i's fill.
PartDrawer = Callable[[ImageDraw.ImageDraw, float, float, float, Callable[[int], object]], None]


@dataclass(frozen=True)
class ConceptSprite:
    """A personal concept: parts in fixed colours, drawn by ``draw_parts``."""

    name: str
    class_word: str
    description: str
    colours: tuple[str, ...]  # one per part
    draw_parts: PartDrawer

    def draw(self, d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
        self.draw_parts(d, cx, cy, r, lambda i: _rgb(self.colours[i]))

    def part_masks(self, r: float, size: int | None = None) -> list[Image.Image]:
        """One anti-aliased L-mode mask per part, the sprite centred in a (2r+1)-px square."""
        s = SUPERSAMPLE
        size = size or int(2 * round(r) + 1)
        masks = []
        for p in range(len(self.colours)):
            m = Image.new("L", (size * s, size * s), 0)

            def fill(i: int, p: int = p) -> Fill:
                return 255 * (i == p)

            self.draw_parts(ImageDraw.Draw(m), size * s / 2, size * s / 2, r * s, fill)
            masks.append(m.resize((size, size), Image.Resampling.BOX))
        return masks


def _checker(d, cx, cy, r, fill):
    d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill(0))
    d.rectangle((cx, cy - r, cx + r, cy), fill=fill(1))
    d.rectangle((cx - r, cy, cx, cy + r), fill=fill(1))


def _ring(d, cx, cy, r, fill):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill(0))
    h = r * 0.5
    d.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill(1))


def _halfmoon(d, cx, cy, r, fill):
    d.pieslice((cx - r, cy - r, cx + r, cy + r), 90, 270, fill=fill(0))
    d.pieslice((cx - r, cy - r, cx + r, cy + r), 270, 90, fill=fill(1))


def _flag(d, cx, cy, r, fill):
    w = 2 * r / 3
    for i in range(3):
        d.rectangle((cx - r + i * w, cy - r, cx - r + (i + 1) * w, cy + r), fill=fill(i))


def _house(d, cx, cy, r, fill):
    d.rectangle((cx - r * 0.8, cy - r * 0.1, cx + r * 0.8, cy + r), fill=fill(0))
    d.polygon([(cx, cy - r), (cx + r, cy - r * 0.1), (cx - r, cy - r * 0.1)], fill=fill(1))


def _swiss(d, cx, cy, r, fill):
    d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill(0))
    a, b = r * 0.6, r * 0.22
    d.rectangle((cx - a, cy - b, cx + a, cy + b), fill=fill(1))
    d.rectangle((cx - b, cy - a, cx + b, cy + a), fill=fill(1))


def _diamond(d, cx, cy, r, fill):
    d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill(0))
    h = r * 0.35
    d.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill(1))


def _mushroom(d, cx, cy, r, fill):
    d.rectangle((cx - r * 0.35, cy - r * 0.1, cx + r * 0.35, cy + r), fill=fill(1))
    d.pieslice((cx - r, cy - r, cx + r, cy + r * 0.8), 180, 360, fill=fill(0))


CONCEPTS: dict[str, ConceptSprite] = {
    c.name: c
    for c in (
        ConceptSprite(
            "checker", "square", "a red and white checkered square", ("red", "white"), _checker
        ),
        ConceptSprite(
            "ring", "circle", "a blue disc with a yellow centre", ("blue", "yellow"), _ring
        ),
        ConceptSprite(
            "halfmoon",
            "circle",
            "a disc, purple left and orange right",
            ("purple", "orange"),
            _halfmoon,
        ),
        ConceptSprite(
            "flag",
            "square",
            "a green, white and orange tricolour",
            ("green", "white", "orange"),
            _flag,
        ),
        ConceptSprite("house", "square", "a blue house with a red roof", ("blue", "red"), _house),
        ConceptSprite("swiss", "square", "a white cross on a red square", ("red", "white"), _swiss),
        ConceptSprite(
            "diamond", "square", "a green diamond with a black centre", ("green", "black"), _diamond
        ),
        ConceptSprite(
            "mushroom", "circle", "a red cap on a white stem", ("red", "white"), _mushroom
        ),
    )
}


def concept_colour_pairs() -> frozenset[frozenset[str]]:
    """The colour pairs of the two-colour personal concepts: no two-tone object of the base
    world uses them, so no concept is a base-world object."""
    return frozenset(frozenset(c.colours) for c in CONCEPTS.values() if len(c.colours) == 2)


def concept_token(name: str) -> str:
    return f"<{name}>"


@dataclass(frozen=True)
class ConceptPhoto:
    """A rendered "photo" of a concept, with what a user could annotate: the background
    colour (for its caption) and the subject mask (white = concept)."""

    image: Image.Image
    background: str
    mask: Image.Image


def render_concept_photo(
    concept: ConceptSprite, rng: random.Random, size: int = SIZE * 4
) -> ConceptPhoto:
    """One "photo" of ``concept``: random position, scale and a background of another colour."""
    s = SUPERSAMPLE
    bg = rng.choice([c for c in COLOURS if c not in concept.colours])
    img = Image.new("RGB", (size * s, size * s), _rgb(bg))
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    concept.draw(ImageDraw.Draw(img), cx * s, cy * s, r * s)
    mask = Image.new("L", img.size, 0)
    concept.draw_parts(ImageDraw.Draw(mask), cx * s, cy * s, r * s, lambda i: 255)
    down = Image.Resampling.BOX
    return ConceptPhoto(img.resize((size, size), down), bg, mask.resize((size, size), down))


def concept_photos_annotated(
    name: str, count: int = 8, seed: int = 0, size: int = SIZE * 4
) -> list[ConceptPhoto]:
    """``count`` photos of concept ``name``, a pure function of (name, seed)."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown toy concept {name!r}; known: {', '.join(CONCEPTS)}")
    rng = random.Random(f"{name}:{seed}")
    return [render_concept_photo(CONCEPTS[name], rng, size) for _ in range(count)]


def concept_photos(
    name: str, count: int = 8, seed: int = 0, size: int = SIZE * 4
) -> list[Image.Image]:
    return [p.image for p in concept_photos_annotated(name, count, seed, size)]


def concept_sketch(
    names: Sequence[str],
    boxes: Sequence[tuple[float, float, float, float]],
    width: int,
    height: int = SIZE,
    scale: float = 0.35,
) -> Image.Image:
    """A sketch a user could draw for concepts in boxes: each concept's lines, centred in its
    box (fractions of the canvas), of half-size ``scale`` x the box's shorter side."""
    if len(names) != len(boxes):
        raise ValueError(f"{len(names)} concepts for {len(boxes)} boxes")
    s = SUPERSAMPLE
    img = Image.new("RGB", (width * s, height * s), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for name, (x0, y0, x1, y1) in zip(names, boxes, strict=True):
        if name not in CONCEPTS:
            raise ValueError(f"unknown toy concept {name!r}; known: {', '.join(CONCEPTS)}")
        bw, bh = (x1 - x0) * width, (y1 - y0) * height
        cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
        r = scale * min(bw, bh)  # half-size in output pixels
        CONCEPTS[name].draw(d, cx * s, cy * s, r * s)
    return sketch_of(img.resize((width, height), Image.Resampling.BOX))
