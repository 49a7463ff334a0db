"""A folder of private photos -> training examples. Nothing here ever leaves the client.

Accepted: ``.jpg .jpeg .png .webp``. EXIF orientation is applied; RGBA/LA/palette images are
composited on white, CMYK and grayscale converted to RGB. Beside ``name.jpg``:
``name.txt`` is its caption (``<TOK>`` stands for the concept; default
``"a photo of a <TOK>"``), ``name.mask.png`` its subject mask (white = subject).

Every problem is collected first and reported together, naming each bad file: an empty
folder, an unreadable/truncated/0-byte image, a file that is not an image, a
decompression bomb, a caption without ``<TOK>``, a mask that does not fit its image.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSION = ".txt"
MASK_SUFFIX = ".mask.png"
PLACEHOLDER = "<TOK>"
DEFAULT_CAPTION = "a photo of a <TOK>"
MAX_PIXELS = 100_000_000  # 100 MP: above any camera; larger headers are decompression bombs


class PhotoFolderError(ValueError):
    """The photo folder has problems; ``problems`` lists ``(file, reason)``."""

    def __init__(self, folder: Path, problems: list[tuple[str, str]]) -> None:
        self.folder = folder
        self.problems = problems
        lines = "\n".join(f"  {name}: {why}" for name, why in problems)
        super().__init__(f"{folder}: {len(problems)} problem(s):\n{lines}")


@dataclass
class Photo:
    path: Path
    image: Image.Image  # RGB, orientation applied
    caption: str  # with <TOK>
    mask: Image.Image | None = None  # L, same size as image


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing bombs before any pixel is allocated."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except UnidentifiedImageError as err:
            raise ValueError("not an image PIL can read") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"decompression bomb refused ({err})") from err
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(
                f"{w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit "
                "(possible decompression bomb)"
            )
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"truncated or corrupt image ({err})") from err
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB (transparency over white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        img = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_photo_folder(
    folder: str | Path,
    *,
    skip_bad: bool = False,
    default_caption: str = DEFAULT_CAPTION,
    max_pixels: int = MAX_PIXELS,
) -> list[Photo]:
    """Read every photo of ``folder``; raise ``PhotoFolderError`` naming each bad file.

    With ``skip_bad`` bad files are left out with a warning (an empty result still fails).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoFolderError(folder, [(str(folder), "not a folder")])
    problems: list[tuple[str, str]] = []
    photos: list[Photo] = []
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    names = {p.name for p in files}
    for path in files:
        name = path.name
        lower = name.lower()
        if path.is_dir():
            continue
        if lower.endswith(MASK_SUFFIX) or lower.endswith(CAPTION_EXTENSION):
            stem = name[: -len(MASK_SUFFIX)] if lower.endswith(MASK_SUFFIX) else path.stem
            if not any(
                stem + ext in names or stem + ext.upper() in names for ext in IMAGE_EXTENSIONS
            ):
                log.warning("%s has no image beside it; ignored", name)
            continue
        if not lower.endswith(IMAGE_EXTENSIONS):
            problems.append((name, f"not an image (supported: {', '.join(IMAGE_EXTENSIONS)})"))
            continue
        try:
            photos.append(_read_one(path, default_caption, max_pixels))
        except ValueError as err:
            problems.append((name, str(err)))
    if problems:
        if not skip_bad:
            raise PhotoFolderError(folder, problems)
        for name, why in problems:
            log.warning("skipping %s: %s", name, why)
    if not photos:
        raise PhotoFolderError(
            folder, problems + [(str(folder), f"no usable photos ({', '.join(IMAGE_EXTENSIONS)})")]
        )
    return photos


def _read_one(path: Path, default_caption: str, max_pixels: int) -> Photo:
    image = to_rgb(_open_checked(path, max_pixels))
    caption = default_caption
    caption_path = path.with_suffix(CAPTION_EXTENSION)
    if caption_path.is_file():
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        if PLACEHOLDER not in caption:
            raise ValueError(f"caption {caption_path.name} does not contain {PLACEHOLDER}")
    mask = None
    mask_path = path.with_name(path.stem + MASK_SUFFIX)
    if mask_path.is_file():
        try:
            mask = ImageOps.exif_transpose(_open_checked(mask_path, max_pixels)).convert("L")
        except ValueError as err:
            raise ValueError(f"mask {mask_path.name}: {err}") from err
        if mask.size != image.size:
            raise ValueError(
                f"mask {mask_path.name} is {mask.size[0]}x{mask.size[1]}, "
                f"the image is {image.size[0]}x{image.size[1]}"
            )
    return Photo(path=path, image=image, caption=caption, mask=mask)


def _resize_crop(img: Image.Image, resolution: int, resample: int) -> Image.Image:
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def photo_tensors(photo: Photo, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize the shorter side to ``resolution`` and centre-crop.

    Returns the image ``[3, R, R]`` in [-1, 1] and the mask ``[1, R, R]`` in [0, 1] (or None).
    """
    img = _resize_crop(photo.image, resolution, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if photo.mask is None:
        return x.contiguous(), None
    m = _resize_crop(photo.mask, resolution, Image.Resampling.BILINEAR)
    mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]
    return x.contiguous(), mask
