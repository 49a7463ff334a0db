"""T2I-Adapter conditioning for regional sampling (docs/method.md, section 3): keypose, sketch.

A diffusers ``T2IAdapter`` turns a condition image into one feature map per UNet
down-block resolution; the UNet adds them inside its down blocks
(``down_intrablock_additional_residuals``). We scale each feature map by a *weight map*:
the global weight everywhere, and inside a region's box that region's weight (the mean of
the weights of overlapping boxes, the same rule as regional attention), so a keypose can
guide one concept's box and leave the others free. Several adapters (keypose + sketch)
add their weighted features, as diffusers' ``MultiAdapter`` does.

Pure functions (``weight_map``, ``condition_tensor``, ``adapter_features``) are tested
against brute force; ``load_adapter`` is the thin I/O part (local folder or hub id).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import numpy as np
import torch
from diffusers import T2IAdapter, UNet2DConditionModel
from PIL import Image, UnidentifiedImageError

from .regions import Box, box_mask

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AdapterError(ValueError):
    """An adapter or its condition image cannot be used; the message says why."""


@dataclass
class AdapterCondition:
    """One adapter, its condition image, a global weight and optional per-region weights.

    ``region_weights[i]`` is the weight inside region ``i``'s box (``None``: the global
    weight); give one entry per region, or none at all.
    """

    adapter: T2IAdapter
    image: Image.Image | torch.Tensor
    weight: float = 1.0
    region_weights: Sequence[float | None] = field(default_factory=tuple)
    name: str = "adapter"


ADAPTERS_GROUP = "mos.adapters"


def named_adapters() -> dict[str, EntryPoint]:
    """T2I-Adapters installed under a name (entry points in the ``mos.adapters`` group, each a
    function that returns the adapter's folder); this package installs ``toy-sketch``."""
    return {ep.name: ep for ep in entry_points(group=ADAPTERS_GROUP)}


def load_adapter(spec: str | Path, dtype: torch.dtype = torch.float32) -> T2IAdapter:
    """A ``T2IAdapter`` from an installed name (``named_adapters``), a local folder
    (``config.json`` + weights) or a hub id."""
    spec_str = str(spec)
    named = named_adapters()
    path = Path(named[spec_str].load()()) if spec_str in named else Path(spec_str).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AdapterError(
                f"adapter {path}: expected a diffusers T2IAdapter folder with config.json"
            )
        kwargs = {"local_files_only": True}
        source = str(path)
    elif _HUB_ID.match(spec_str):
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        kwargs = {"local_files_only": offline}
        source = spec_str
    else:
        raise AdapterError(
            f"adapter '{spec_str}' not found: give "
            + "".join(f"'{n}', " for n in sorted(named))
            + "a local T2IAdapter folder or a hub id such as "
            "'TencentARC/t2iadapter_openpose_sd14v1'"
        )
    try:
        adapter = T2IAdapter.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except Exception as err:  # diffusers raises OSError/ValueError/EnvironmentError here
        raise AdapterError(
            f"could not load the T2I-Adapter '{source}': {type(err).__name__}: {err}"
        ) from err
    return adapter.eval().requires_grad_(False)


def read_condition_image(path: str | Path) -> Image.Image:
    """A condition image from disk; an unreadable file is an ``AdapterError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"condition image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise AdapterError(f"condition image {path}: not a readable image ({err})") from err


def condition_tensor(
    image: Image.Image | torch.Tensor, width: int, height: int, in_channels: int
) -> torch.Tensor:
    """``[1, in_channels, height, width]`` in [0, 1]; a PIL image of another size is resized
    (lanczos, as diffusers does) with a log note; grey or RGB to what the adapter takes."""
    if isinstance(image, torch.Tensor):
        t = image.unsqueeze(0) if image.dim() == 3 else image
        if t.dim() != 4 or t.shape[1] != in_channels or tuple(t.shape[2:]) != (height, width):
            raise AdapterError(
                f"condition tensor of shape {tuple(image.shape)}: expected "
                f"[1, {in_channels}, {height}, {width}]"
            )
        return t.float()
    if image.size != (width, height):
        log.info(
            "condition image is %dx%d; resized to the sample's %dx%d",
            *image.size,
            width,
            height,
        )
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    mode = "L" if in_channels == 1 else "RGB"
    if in_channels not in (1, 3):
        raise AdapterError(f"adapters with {in_channels} input channels are not supported")
    arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def weight_map(
    boxes: Sequence[Box],
    region_weights: Sequence[float | None],
    global_weight: float,
    height: int,
    width: int,
) -> torch.Tensor:
    """``[height, width]``: ``global_weight``, and inside boxes with a weight the mean of
    those boxes' weights (cells whose centre lies inside, as ``regions.box_mask``)."""
    if region_weights and len(region_weights) != len(boxes):
        raise AdapterError(
            f"{len(region_weights)} per-region adapter weights for {len(boxes)} regions; "
            "give one per region (or none)"
        )
    total = torch.zeros(height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for box, w in zip(boxes, region_weights, strict=False):
        if w is None:
            continue
        m = box_mask(box, height, width).double()
        total += m * float(w)
        count += m
    out = torch.full((height, width), float(global_weight), dtype=torch.float64)
    return torch.where(count > 0, total / count.clamp(min=1), out).float()


@torch.no_grad()
def adapter_features(
    conditions: Sequence[AdapterCondition],
    boxes: Sequence[Box],
    width: int,
    height: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The summed, weight-mapped features of every adapter: one ``[1, C, h, w]`` per level."""
    summed: list[torch.Tensor] = []
    for cond in conditions:
        in_channels = int(cond.adapter.config.in_channels)
        image = condition_tensor(cond.image, width, height, in_channels)
        feats = cond.adapter(image.to(device, cond.adapter.dtype))
        for level, f in enumerate(feats):
            wm = weight_map(boxes, tuple(cond.region_weights), cond.weight, *f.shape[-2:])
            f = f.to(dtype) * wm.to(device, dtype)
            if level < len(summed):
                if summed[level].shape != f.shape:
                    raise AdapterError(
                        f"adapter '{cond.name}' gives features of shape {tuple(f.shape)} at level "
                        f"{level}, the others {tuple(summed[level].shape)}"
                    )
                summed[level] = summed[level] + f
            else:
                summed.append(f)
    return summed


def check_adapter_fits(adapter: T2IAdapter, unet: UNet2DConditionModel, vae_factor: int) -> None:
    """Refuse an adapter built for another UNet (channels per level, total downscale).

    SDXL adapters (``adapter_type="full_adapter_xl"``) give one more feature map than the
    UNet has down blocks (the last, at the deepest width, is added in the mid block) and
    start at twice the latent downscale (SDXL's first down block has no attention: its
    residual is added after that block's downsampler)."""
    cfg = adapter.config
    unet_channels = list(unet.config.block_out_channels)
    channels = list(cfg.channels)
    xl_adapter = cfg.get("adapter_type") == "full_adapter_xl"
    xl_unet = unet.config.get("addition_embed_type") == "text_time"
    if xl_adapter != xl_unet:
        kind, other = ("an SDXL", "an SD 1.x/2.x") if xl_adapter else ("an SD 1.x/2.x", "an SDXL")
        raise AdapterError(
            f"this is {kind} T2I-Adapter ({cfg.get('adapter_type')}); the base model is "
            f"{other} model: use an adapter made for the base's architecture"
        )
    want_channels = unet_channels + [unet_channels[-1]] if xl_adapter else unet_channels
    want_factor = 2 * vae_factor if xl_adapter else vae_factor
    if channels != want_channels:
        raise AdapterError(
            f"this adapter has channels {channels}; the UNet's down blocks have {unet_channels} "
            f"(an adapter for it has {want_channels}): it was made for another base model"
        )
    if int(cfg.downscale_factor) != want_factor:
        raise AdapterError(
            f"this adapter downscales by {cfg.downscale_factor}; this base model needs "
            f"{want_factor} (its latents are 1/{vae_factor} of the image): it was made for "
            "another base model"
        )
