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
from dataclasses import dataclass, replace
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
    captioned: bool = False  # the caption came from a file beside the photo


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
    return Photo(
        path=path, image=image, caption=caption, mask=mask, captioned=caption_path.is_file()
    )


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


# --- the authors' augmentations and caption templates (TrainConfig.augment, caption_templates)

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip
HUMAN_TEMPLATES = (
    "a photo of a {}", "a photo of one {}", "a photo of the {}", "the photo of a {}",
    "a rendering of a {}", "a rendition of the {}", "a rendition of a {}",
    "a cropped photo of the {}", "a cropped photo of a {}", "a bad photo of the {}",
    "a bad photo of a {}", "a photo of a weird {}", "a weird photo of a {}",
    "a bright photo of the {}", "a good photo of the {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of a cool {}", "a bright photo of the {}",
)  # fmt: skip
TEMPLATES = {"object": OBJECT_TEMPLATES, "human": HUMAN_TEMPLATES}


def _draw(gen: torch.Generator, high: int) -> int:
    """A uniform integer in ``[0, high)`` from ``gen``."""
    return int(torch.randint(high, (1,), generator=gen))


def templated_caption(photo: Photo, templates: str, gen: torch.Generator) -> str:
    """A caption as the authors build it each step: the photo's caption file (a tag list such
    as ``"<TOK>, smiling, on a beach"``; without one just ``<TOK>``) with its tags after the
    first shuffled, put into a random template of ``templates`` (``object`` or ``human``)."""
    tags = [t.strip() for t in (photo.caption if photo.captioned else PLACEHOLDER).split(",")]
    rest = [tags[1 + i] for i in torch.randperm(len(tags) - 1, generator=gen).tolist()]
    choices = TEMPLATES[templates]
    return choices[_draw(gen, len(choices))].format(", ".join(tags[:1] + rest))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _mask_tensor(mask: Image.Image | None, size: tuple[int, int]) -> torch.Tensor:
    if mask is None:
        return torch.ones(1, size[1], size[0])
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def shrunk(photo: Photo, resolution: int) -> Photo:
    """``photo`` with its shorter side brought down to ``resolution`` (never up), the mask
    alike: what the per-step augmentations start from, so a camera photo is resized once."""
    w, h = photo.image.size
    s = resolution / min(w, h)
    if s >= 1:
        return photo
    size = (max(1, round(w * s)), max(1, round(h * s)))
    mask = photo.mask.resize(size, Image.Resampling.BILINEAR) if photo.mask else None
    return replace(photo, image=photo.image.resize(size, Image.Resampling.BICUBIC), mask=mask)


def crop_view(
    photo: Photo, resolution: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' object augmentation: the shorter side resized to ``resolution``, then a
    random ``resolution`` square crop. Returns image ``[3, R, R]`` in [-1, 1], subject mask
    ``[1, R, R]`` (ones without one) and the image area (all ones here)."""
    w, h = photo.image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    left, top = _draw(gen, nw - resolution + 1), _draw(gen, nh - resolution + 1)
    box = (left, top, left + resolution, top + resolution)
    img = photo.image.resize((nw, nh), Image.Resampling.BICUBIC).crop(box)
    mask = None
    if photo.mask is not None:
        mask = photo.mask.resize((nw, nh), Image.Resampling.BILINEAR).crop(box)
    area = torch.ones(1, resolution, resolution)
    return _to_tensor(img), _mask_tensor(mask, img.size), area


def canvas_view(
    photo: Photo,
    resolution: int,
    gen: torch.Generator,
    crop_p: float = 0.5,
    scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' subject augmentation: with probability ``crop_p`` a random crop (a tall
    photo keeps its top, cut to a random height between its width and its height; a wide
    one a random square of its height), then the long edge resized to ``resolution`` times
    a factor drawn from ``scale`` and the photo placed at a random position on a black
    ``resolution`` canvas. The returned image area (``[1, R, R]``, ones on the photo) is
    where the loss counts."""
    img, mask = photo.image, photo.mask
    w, h = img.size
    if float(torch.rand(1, generator=gen)) < crop_p:
        if h > w:
            box = (0, 0, w, w + _draw(gen, h - w + 1))
        else:
            left = _draw(gen, w - h + 1)
            box = (left, 0, left + h, h)
        img = img.crop(box)
        mask = mask.crop(box) if mask is not None else None
    w, h = img.size
    lo, hi = scale
    long_edge = resolution * (lo + (hi - lo) * float(torch.rand(1, generator=gen)))
    f = long_edge / max(w, h)
    nw, nh = max(1, min(resolution, round(w * f))), max(1, min(resolution, round(h * f)))
    left, top = _draw(gen, resolution - nw + 1), _draw(gen, resolution - nh + 1)
    canvas = Image.new("RGB", (resolution, resolution))
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), (left, top))
    full_mask = torch.ones(1, resolution, resolution)
    if mask is not None:
        m = Image.new("L", (resolution, resolution))
        m.paste(mask.resize((nw, nh), Image.Resampling.BILINEAR), (left, top))
        full_mask = _mask_tensor(m, m.size)
    area = torch.zeros(1, resolution, resolution)
    area[:, top : top + nh, left : left + nw] = 1.0
    return _to_tensor(canvas), full_mask * area, area
