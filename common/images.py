"""Pictures people look at: labelled sample grids and loss curves, as PIL images (PNG)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    min_cell: int = 128,
) -> Image.Image:
    """Lay out ``rows`` of images in a grid with optional row/column captions.

    Cells smaller than ``min_cell`` are enlarged (nearest neighbour, so pixels stay visible).
    """
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    w, h = rows[0][0].size
    scale = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * scale, h * scale
    font = _font()
    label_w = (max((len(t) for t in row_labels), default=0) * 6 + 10) if row_labels else 0
    label_h = 16 if col_labels else 0
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncols * cw, label_h + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels):
        draw.text((label_w + j * cw + 4, 2), text, fill="black", font=font)
    for i, row in enumerate(rows):
        if i < len(row_labels):
            draw.text((4, label_h + i * ch + ch // 2 - 6), row_labels[i], fill="black", font=font)
        for j, img in enumerate(row):
            cell = img.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST)
            grid.paste(cell, (label_w + j * cw, label_h + i * ch))
    return grid


def loss_curve(
    values: Sequence[float], title: str = "loss", size: tuple[int, int] = (480, 240)
) -> Image.Image:
    """A line plot of ``values`` (raw in light grey, a moving average in blue)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((8, 4), title, fill="black", font=font)
    if not values:
        return img
    left, right, top, bottom = 48, w - 10, 20, h - 20
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, n - 1))
        return x, bottom - (bottom - top) * ((v - lo) / span)

    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((2, top - 4), f"{hi:.3g}", fill="black", font=font)
    draw.text((2, bottom - 8), f"{lo:.3g}", fill="black", font=font)
    draw.text((right - 60, bottom + 4), f"{n} steps", fill="black", font=font)
    if n > 1:
        draw.line([xy(i, v) for i, v in enumerate(values)], fill=(200, 200, 200))
        k = max(1, n // 20)
        smooth = [
            sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
            for i in range(n)
        ]
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    return img
