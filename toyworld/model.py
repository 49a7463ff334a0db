"""The toy world's base model: SD 1.x-shaped, small, trained by ``toyworld.train``.

``load_toy()`` builds the architecture from ``toy_configs()`` and loads the committed
weights (``toyworld/weights/toy-base.safetensors``, fp16, a few MB), so ``--base-model toy``
works offline like ``tiny``. The tokenizer is the tiny model's CLIP-format BPE tokenizer
over its word list plus the toy world's words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from mos.common.base import TOY, BaseModel, build_components, tiny_configs
from mos.common.files import atomic_write
from mos.common.tokenizer import build_tiny_tokenizer, default_words

from .world import WORDS

WEIGHTS = Path(__file__).parent / "weights" / "toy-base.safetensors"
SKETCH_ADAPTER = Path(__file__).parent / "weights" / "toy-sketch-adapter"
UNET_CHANNELS = (48, 96, 96)  # the committed base's UNet block widths
WEIGHTS_ENV = "MOS_TOY_WEIGHTS"  # another toy base file instead of the committed one
# DDPM's linear betas instead of SD's scaled-linear ones, and v-prediction (as SD 2.x).
# With SD's schedule the last timestep keeps sqrt(alpha_bar) = 0.07 of the latent, and on
# 16x16 latents the image's mean colour then shows through the noise as clearly as the
# noise's own mean (std 1/16): the model learned to read the background from the noise and
# sampling from pure noise ignored the prompt (3% of held-out prompts right). Linear betas
# leave 0.007 of it. With epsilon prediction the noisiest timesteps, where the prompt decides
# the image, then cost almost nothing to get wrong (the noise is the input): the model never
# learned to use the text (the same error with and without a prompt). Predicting the velocity
# makes them count: 800 steps gave 91% colour and 100% background on held-out prompts,
# against 15% and 58% after 3000 epsilon steps.
TOY_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}


def toy_tokenizer() -> CLIPTokenizer:
    return build_tiny_tokenizer(list(dict.fromkeys(default_words() + list(WORDS))))


def check_unet_channels(channels: Sequence[int]) -> tuple[int, int, int]:
    """The toy UNet's three block widths, validated (each a multiple of its 8 norm groups)."""
    channels = tuple(int(c) for c in channels)
    if len(channels) != 3 or any(c < 8 or c % 8 for c in channels):
        raise ValueError(
            f"the toy UNet has 3 blocks, each a multiple of 8 channels wide; got {channels}"
        )
    return channels


def toy_configs(unet_channels: Sequence[int] = UNET_CHANNELS) -> dict[str, dict]:
    """The tiny model's layout (32 px images, latents 4x16x16, cross-attention at 16x16 and
    8x8 and in the mid block), 1.5x wider UNet blocks (48, 96, 96) with 2 attention heads
    (head width 24-48 instead of 4-8: CPU attention with 4-wide heads took 40% of a training
    step) and a text width of 64 instead of 32. ``unet_channels`` widens the UNet (the
    feasibility probe's (64, 128, 128) is a GPU recipe: on 2 CPU cores it trains at
    ~0.5 it/s)."""
    configs = tiny_configs()
    configs["unet"].update(
        block_out_channels=check_unet_channels(unet_channels),
        attention_head_dim=2,
        cross_attention_dim=64,
    )
    configs["text_encoder"].update(hidden_size=64, intermediate_size=128, projection_dim=64)
    return configs


def build_toy_architecture(
    tokenizer: CLIPTokenizer | None = None,
    seed: int = 0,
    unet_channels: Sequence[int] = UNET_CHANNELS,
) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """The untrained toy model (random weights from ``seed``)."""
    tokenizer = tokenizer or toy_tokenizer()
    text_encoder, unet, vae = build_components(toy_configs(unet_channels), tokenizer, seed)
    return tokenizer, text_encoder, unet, vae


def save_toy_weights(
    path: Path,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    info: dict,
) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        for name, t in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = t.detach().to("cpu", torch.float16).contiguous()
    meta = {"format": "mos-toy-base", "info": json.dumps(info, sort_keys=True)}
    meta["unet_channels"] = ",".join(str(c) for c in unet.config.block_out_channels)
    meta["vae_scaling_factor"] = str(float(vae.config.scaling_factor))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def toy_weights_path() -> Path:
    """The weights the ``toy`` base loads: ``$MOS_TOY_WEIGHTS`` if set (another toy base,
    e.g. one trained on a GPU with ``--unet-channels``), else the committed file."""
    other = os.environ.get(WEIGHTS_ENV)
    return Path(other) if other else WEIGHTS


def load_toy_components(
    path: Path | None = None,
) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL, dict]:
    """The trained toy model's components (fp32) and its training info (``path`` None:
    ``toy_weights_path()``)."""
    path = path or toy_weights_path()
    if not path.is_file():
        named = f" (named by ${WEIGHTS_ENV})" if path != WEIGHTS else ""
        raise FileNotFoundError(
            f"{path}{named}: the toy model's weights are missing; train them with "
            "`python -m mos.toyworld.train` (see benchmarks/README.md)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mos-toy-base":
            raise ValueError(f"{path}: not a toy base model file")
        # files written before the UNet width was recorded have the default layout
        channels = meta.get("unet_channels")
        channels = channels.split(",") if channels else UNET_CHANNELS
        tokenizer, text_encoder, unet, vae = build_toy_architecture(unet_channels=channels)
        for prefix, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
            state = {
                k[len(prefix) + 1 :]: f.get_tensor(k).float()
                for k in f.keys()  # noqa: SIM118 - safe_open is not iterable
                if k.startswith(prefix + ".")
            }
            module.load_state_dict(state, strict=True)
    vae.register_to_config(scaling_factor=float(meta["vae_scaling_factor"]))
    return tokenizer, text_encoder, unet, vae, json.loads(meta.get("info", "{}"))


def toy_base() -> BaseModel:
    """The toy world's trained base model (``--base-model toy``; the ``mos.bases`` entry
    point ``toy``)."""
    tokenizer, text_encoder, unet, vae, _ = load_toy_components()
    return BaseModel.from_components(
        tokenizer, text_encoder, unet, vae, TOY, dict(TOY_SCHEDULER_CONFIG)
    )


def toy_sketch_adapter() -> Path:
    """The toy model's sketch T2I-Adapter folder (``--adapter toy-sketch``; the
    ``mos.adapters`` entry point ``toy-sketch``)."""
    return SKETCH_ADAPTER
