"""Reading toy-world images back: an attribute analyser and a concept detector.

Both are pure functions of an RGB image (a PIL image or a float tensor [3, H, W] in [0, 1]).

- ``analyse(img)`` reads the background colour (the border's median), the main object's
  colour (pixels far from the background) and its shape from how much of its bounding box
  it fills (square ~1, circle ~0.79, triangle ~0.5).
- ``ConceptDetector`` scores how much an image shows a concept: every part of the sprite
  (its colour regions) must be found in place. For each scale and position it takes, per
  part, the mean "is this the part's colour" over the part's mask, and the score is the
  smallest of those over parts, maximised over positions and scales. A plain red square
  matches the red half of the checker sprite but not the white half, so it scores low.
  ``score_map`` keeps the positions, so a score can be restricted to a box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .world import COLOURS, CONCEPTS, PALETTE, ConceptSprite

_PALETTE = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255.0


def as_tensor(img: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """A float [3, H, W] tensor in [0, 1]."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    if isinstance(img, np.ndarray):
        return torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(img.shape)}")
    return img.float()


def nearest_colour(rgb: torch.Tensor) -> str:
    return COLOURS[int(torch.cdist(rgb.view(1, 3), _PALETTE).argmin())]


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    object_fraction: float

    def matches(self, colour: str, shape: str, background: str) -> bool:
        return (self.colour, self.shape, self.background) == (colour, shape, background)


def analyse(img: Image.Image | torch.Tensor, threshold: float = 0.3) -> Reading:
    """Background, main object colour and shape of a single-object toy-world image."""
    x = as_tensor(img)
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)  # [3, n]
    bg_rgb = border.median(dim=1).values
    background = nearest_colour(bg_rgb)
    dist = (x - bg_rgb.view(3, 1, 1)).norm(dim=0)
    obj = dist > threshold
    fraction = float(obj.float().mean())
    if int(obj.sum()) < 6:
        return Reading(background, None, None, fraction)
    colour = nearest_colour(x[:, obj].median(dim=1).values)
    ys, xs = torch.nonzero(obj, as_tuple=True)
    box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
    fill = float(obj.sum()) / box
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    return Reading(background, colour, shape, fraction)


class ConceptDetector:
    """Part-wise colour template matching of one concept sprite over positions and scales."""

    def __init__(
        self, concept: ConceptSprite | str, radii: tuple[float, ...] = (), tolerance: float = 0.35
    ) -> None:
        self.concept = CONCEPTS[concept] if isinstance(concept, str) else concept
        self.tolerance = tolerance
        self.radii = radii or (5.0, 6.0, 7.0, 8.0, 9.5, 11.0, 13.0)
        self.colours = torch.tensor(
            [PALETTE[c] for c in self.concept.colours], dtype=torch.float32
        ).div(255.0)
        # per radius: [parts + 1, 1, k, k] kernels, each normalised to sum 1: the parts' masks
        # (crisp: >= half covered), then the ring just outside the sprite (2 px wide), where
        # none of the parts' colours may be (a red triangle on a blue background is not the
        # blue house with a red roof).
        self.kernels: list[torch.Tensor] = []
        for r in self.radii:
            size = int(2 * round(r) + 1) + 4
            masks = torch.stack(
                [
                    torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0 >= 0.5).float()
                    for m in self.concept.part_masks(r, size)
                ]
            )
            silhouette = masks.amax(dim=0, keepdim=True)
            ring = F.max_pool2d(silhouette[None], 5, stride=1, padding=2)[0] - silhouette
            k = torch.cat([masks, ring]).unsqueeze(1)
            self.kernels.append(k / k.sum(dim=(2, 3), keepdim=True).clamp_min(1.0))

    def colour_maps(self, x: torch.Tensor) -> torch.Tensor:
        """[parts + 1, H, W]: 1 where a pixel is the part's colour, falling to 0 at
        ``tolerance``; last, 1 where it is none of the parts' colours."""
        d = (x.unsqueeze(0) - self.colours.view(-1, 3, 1, 1)).norm(dim=1)
        parts = (1 - d / self.tolerance).clamp(0, 1)
        outside = 1 - parts.amax(dim=0, keepdim=True)
        return torch.cat([parts, outside])

    def score_map(self, img: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        """Per radius, the score of the sprite centred at each position ([H, W], -1 where it
        would not fit)."""
        x = as_tensor(img)
        h, w = x.shape[1:]
        maps = self.colour_maps(x).unsqueeze(0)  # [1, parts, H, W]
        out = []
        for k in self.kernels:
            size = k.shape[-1]
            full = torch.full((h, w), -1.0)
            if size > min(h, w):
                out.append(full)
                continue
            per_part = F.conv2d(maps, k, groups=k.shape[0])[0]  # [parts+1, h-k+1, w-k+1]
            score = per_part.min(dim=0).values
            o = size // 2
            full[o : o + score.shape[0], o : o + score.shape[1]] = score
            out.append(full)
        return out

    def score(
        self, img: Image.Image | torch.Tensor, box: tuple[float, float, float, float] | None = None
    ) -> float:
        """Score in [0, 1]; with ``box`` (x0, y0, x1, y1 as fractions of the image) only
        placements centred inside the box count."""
        maps = self.score_map(img)
        h, w = maps[0].shape
        best = 0.0
        for m in maps:
            if box is not None:
                x0, y0, x1, y1 = box
                m = m[
                    int(y0 * h) : max(int(y0 * h) + 1, round(y1 * h)),
                    int(x0 * w) : max(int(x0 * w) + 1, round(x1 * w)),
                ]
            if m.numel():
                best = max(best, float(m.max()))
        return max(best, 0.0)


def detectors() -> dict[str, ConceptDetector]:
    return {name: ConceptDetector(c) for name, c in CONCEPTS.items()}
