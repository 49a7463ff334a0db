"""Regions for regionally controllable sampling (docs/method.md, section 3): boxes, their masks at
every attention resolution, and the rule that combines attention outputs.

Pure functions, tested against brute force. A box is ``(x0, y0, x1, y1)`` in fractions of
the image width and height (``0 <= x0 < x1 <= 1``); a feature-map cell belongs to a box when
its centre lies inside. Combination: inside one or more boxes, the mean of those regions'
outputs; outside every box, the global output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Box = tuple[float, float, float, float]


class RegionError(ValueError):
    """A region is malformed (box outside the image, zero area, empty prompt)."""


@dataclass(frozen=True)
class Region:
    prompt: str
    box: Box
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise RegionError("a region needs a prompt")
        check_box(self.box)


def check_box(box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise RegionError(f"a box is x0,y0,x1,y1; got {len(box)} numbers")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise RegionError(f"box {box} is outside the image (fractions must lie in [0, 1])")
    if x1 <= x0 or y1 <= y0:
        raise RegionError(f"box {box} has zero area (need x0 < x1 and y0 < y1)")
    return (x0, y0, x1, y1)


def box_from_pixels(box: Sequence[float], width: int, height: int) -> Box:
    """Pixels (or fractions: every value <= 1) to fractions, checked."""
    if len(box) != 4:
        raise RegionError(f"a box is x0,y0,x1,y1; got {len(box)} numbers")
    if all(float(v) <= 1.0 for v in box):
        return check_box(box)
    if any(float(v) != int(float(v)) for v in box):
        raise RegionError(
            f"box {tuple(box)}: values above 1 mean pixels, and pixels are whole numbers "
            "(for fractions keep every value in [0, 1])"
        )
    x0, y0, x1, y1 = (float(v) for v in box)
    if max(x0, x1) > width or max(y0, y1) > height or min(box) < 0:
        raise RegionError(f"box {tuple(box)} px is outside the {width}x{height} image")
    return check_box((x0 / width, y0 / height, x1 / width, y1 / height))


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """``[height, width]`` bool: the cells whose centre lies inside ``box``."""
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    x0, y0, x1, y1 = box
    inside_y = (ys >= y0) & (ys < y1)
    inside_x = (xs >= x0) & (xs < x1)
    return inside_y[:, None] & inside_x[None, :]


def region_masks(boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """``[regions, height * width]`` float masks, flattened the way attention sees tokens."""
    if not boxes:
        return torch.zeros(0, height * width)
    return torch.stack([box_mask(b, height, width).flatten() for b in boxes]).float()


def combine(global_out: torch.Tensor, region_outs: torch.Tensor, masks: torch.Tensor):
    """``global_out`` ``[B, N, C]``, ``region_outs`` ``[R, B, N, C]``, ``masks`` ``[R, N]``.

    Inside any box: the mean over the boxes that cover the cell; elsewhere ``global_out``.
    """
    m = masks.to(global_out.dtype)[:, None, :, None]  # [R, 1, N, 1]
    count = m.sum(0)  # [1, N, 1]
    summed = (m * region_outs).sum(0)
    return torch.where(count > 0, summed / count.clamp(min=1), global_out)


def latent_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The feature-map sizes of a UNet with ``levels`` resolutions (each halves, rounding up
    as strided convolutions do)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def view_windows(
    height: int, width: int, size: int, stride: int, align: int = 1
) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, h, w)`` windows of at most ``size`` x ``size`` latent cells, ``stride``
    apart, covering a ``height`` x ``width`` latent (the last one in each direction flush
    with the edge), as MultiDiffusion denoises a canvas wider than the model's own.
    Corners must fall on multiples of ``align`` (the UNet's total downsampling), so that
    every level's features crop exactly."""
    if size < 1 or stride < 1 or stride > size:
        raise ValueError(f"views need 1 <= stride <= size; got size {size}, stride {stride}")

    def starts(extent: int) -> list[int]:
        if extent <= size:
            return [0]
        out = list(range(0, extent - size + 1, stride))
        if out[-1] != extent - size:
            out.append(extent - size)
        return out

    views = [
        (y, x, min(size, height), min(size, width)) for y in starts(height) for x in starts(width)
    ]
    bad = [v for v in views if v[0] % align or v[1] % align]
    if bad:
        raise ValueError(
            f"view corners {[(y, x) for y, x, _, _ in bad]} are not multiples of {align}: "
            f"a {height}x{width} latent cannot be tiled by {size}-cell views {stride} apart"
        )
    return views


def view_stride(size: int, overlap: float, align: int = 1) -> int:
    """The stride of ``size``-cell windows that share ``overlap`` of their width with their
    neighbour, a multiple of ``align`` (0 < stride <= size)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"the view overlap is a fraction in [0, 1); got {overlap}")
    stride = round(size * (1.0 - overlap) / align) * align
    return min(max(stride, align), size)


def crop_view(
    t: torch.Tensor, view: tuple[int, int, int, int], full: tuple[int, int]
) -> torch.Tensor:
    """The part of ``t`` (``[..., H, W]``, a level of a ``full``-sized latent, H and W
    ``full`` divided by a power of two) under latent window ``view``."""
    y0, x0, h, w = view
    s = full[0] // t.shape[-2]
    return t[..., y0 // s : (y0 + h) // s, x0 // s : (x0 + w) // s]
