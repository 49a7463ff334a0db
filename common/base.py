"""Base models: a diffusers folder, a single-file checkpoint, a hub id, ``tiny`` or ``tiny-sdxl``.

``load_base_model(spec)`` returns a ``BaseModel``: the five SD 1.x / 2.x components (SDXL:
seven, with a second tokenizer and text encoder) plus a training scheduler (DDPM) and a
sampling scheduler (DPM-Solver++), the base fingerprint that concept packages are checked
against, its architecture (``sd1``, ``sd2``, ``sdxl``), and where it came from.

``tiny`` is SD 1.x-shaped (cross-attention at two resolutions, AutoencoderKL, CLIP text
encoder, a CLIP-format tokenizer with whole-word tokens) and small enough that tests and
the demo run on a laptop CPU; it is built from a seed, deterministically, without network.
``toy`` has the same layout, slightly wider, with weights trained on the toy world
(``mos.toyworld``: coloured shapes, 32 px), so its samples follow their prompts.
``tiny-sdxl`` is SDXL-shaped: two CLIP text encoders of different widths (the second with
a projection, for the pooled embedding), a UNet with SDXL's size/crop conditioning
(``addition_embed_type="text_time"``), linear projections and several transformer blocks
per attention block; random weights, for tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .attention import cross_attention_layers
from .lora import TEXT_ENCODER_TARGETS, UNET_CONV_TARGETS, UNET_TARGETS, target_layer_names
from .text import SDXL, TextEncoders
from .tokenizer import build_tiny_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
# what a base's architecture is called in messages
ARCHITECTURE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", SDXL: "SDXL"}
TOY = "toy"  # installed by mos.toyworld (the ``mos.bases`` entry point)
BASES_GROUP = "mos.bases"
# SD 1.x's noise schedule (scaled-linear betas, 1000 steps). clip_sample must stay off for
# latent models (clipping predicted latents to [-1, 1] wrecks latent-space sampling).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def denoising_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to predict at ``scheduler.add_noise(latents, noise, t)``: the
    noise (``epsilon``, SD 1.x), the velocity (``v_prediction``, SD 2.x and the toy model) or
    the clean latents (``sample``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config")


class BaseModelError(ValueError):
    """A base model could not be loaded; the message says why and what to do."""


@dataclass
class BaseModel:
    """The components of an SD 1.x / 2.x or SDXL model plus what training and packages need
    to know. ``tokenizer_2`` / ``text_encoder_2`` are SDXL's second tokenizer and text
    encoder (OpenCLIP bigG with its projection); ``None`` for SD 1.x / 2.x."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    scheduler: DPMSolverMultistepScheduler
    source: str
    fingerprint: str = field(default="")
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    def __post_init__(self) -> None:
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise BaseModelError("an SDXL base needs both its second tokenizer and text encoder")
        if self.tokenizer_2 is not None:
            check_shared_vocabulary(self.tokenizer, self.tokenizer_2, self.source)
        if not self.fingerprint:
            self.fingerprint = base_fingerprint(self)

    @property
    def architecture(self) -> str:
        """``sdxl`` (two text encoders), ``sd2`` (linear projections in the UNet's
        transformers, as SD 2.x) or ``sd1``."""
        if self.text_encoder_2 is not None:
            return SDXL
        return "sd2" if self.unet.config.get("use_linear_projection") else "sd1"

    @property
    def architecture_name(self) -> str:
        return ARCHITECTURE_NAMES[self.architecture]

    @property
    def text(self) -> TextEncoders:
        """The tokenizer(s) and text encoder(s) as one callable (``mos.common.text``)."""
        return TextEncoders(
            self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2
        )

    def text_encoders(self) -> list[CLIPTextModel]:
        """The text encoder, and SDXL's second one."""
        return list(self.text.encoders())

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def num_cross_attention_layers(self) -> int:
        return len(cross_attention_layers(self.unet))

    @property
    def text_dim(self) -> int:
        """Width of the text encoding the UNet reads (SDXL: both encoders' widths added);
        a concept's embeddings are this wide (SDXL: the first encoder's row, then the
        second's)."""
        return self.text.dim

    def lora_components(
        self, conv: bool = False
    ) -> list[tuple[str, torch.nn.Module, tuple[str, ...]]]:
        """``[(key prefix, model, LoRA targets)]`` for the text encoder(s) and the UNet, and
        with ``conv`` one more entry for the UNet's up-block ResNet convolutions
        (``UNET_CONV_TARGETS``).

        Keys follow the diffusers LoRA convention, ``text_encoder.text_model.encoder...``
        (SDXL's second encoder: ``text_encoder_2...``), whether or not this transformers
        version nests CLIP under ``text_model``.
        """
        out: list[tuple[str, torch.nn.Module, tuple[str, ...]]] = []
        for name, te in (
            ("text_encoder", self.text_encoder),
            ("text_encoder_2", self.text_encoder_2),
        ):
            if te is not None:
                prefix = name if hasattr(te, "text_model") else f"{name}.text_model"
                out.append((prefix, te, TEXT_ENCODER_TARGETS))
        out.append(("unet", self.unet, UNET_TARGETS))
        if conv:
            out.append(("unet", self.unet, UNET_CONV_TARGETS))
        return out

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> BaseModel:
        for module in (*self.text_encoders(), self.unet, self.vae):
            if dtype is None or module.dtype == dtype:
                module.to(device)
            else:
                module.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, path: str | Path) -> None:
        """Write an ordinary diffusers folder (``StableDiffusionPipeline.from_pretrained``, or
        for SDXL ``StableDiffusionXLPipeline.from_pretrained``, reads it)."""
        if self.text_encoder_2 is not None:
            xl = sdxl_pipeline_class()(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
            )
            xl.save_pretrained(str(path), safe_serialization=True)
            return
        pipe = sd_pipeline_class()(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(path), safe_serialization=True)

    @classmethod
    def from_components(
        cls,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        source: str,
        scheduler_config: dict | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
    ) -> BaseModel:
        """Freeze the components and add the training and sampling schedulers (SD 1.x's
        noise schedule unless ``scheduler_config`` says otherwise; SDXL uses the same)."""
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is not None:
                module.eval().requires_grad_(False)
        config = dict(scheduler_config or SD_SCHEDULER_CONFIG)
        return cls(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=unet,
            vae=vae,
            noise_scheduler=DDPMScheduler.from_config(config),
            scheduler=DPMSolverMultistepScheduler.from_config(config),
            source=source,
            tokenizer_2=tokenizer_2,
            text_encoder_2=text_encoder_2,
        )

    @classmethod
    def from_pipeline(
        cls, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, source: str
    ) -> BaseModel:
        return cls.from_components(
            pipe.tokenizer,
            pipe.text_encoder,
            pipe.unet,
            pipe.vae,
            source,
            dict(pipe.scheduler.config),
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
        )


def check_shared_vocabulary(first: CLIPTokenizer, second: CLIPTokenizer, source: str) -> None:
    """SDXL's two tokenizers must share their vocabulary (they may differ in the padding
    token): one row of token ids, concept tokens included, then serves both encoders."""
    if first.get_vocab() != second.get_vocab():
        raise BaseModelError(
            f"{source}: the two tokenizers of this SDXL base have different vocabularies; "
            "only bases whose tokenizers differ at most in their padding token are supported"
        )


def _muted_diffusers_import(name: str) -> type:
    """``diffusers.<name>``, imported with transformers' notices muted.

    Importing a pipeline pulls in CLIP's image processor, and transformers then prints that
    torchvision is missing (we never use image processors) on every command.
    """
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        import diffusers

        return getattr(diffusers, name)
    finally:
        transformers.logging.set_verbosity(previous)


def sd_pipeline_class() -> type[StableDiffusionPipeline]:
    """diffusers' ``StableDiffusionPipeline`` (imported quietly)."""
    return _muted_diffusers_import("StableDiffusionPipeline")


def sdxl_pipeline_class() -> type[StableDiffusionXLPipeline]:
    """diffusers' ``StableDiffusionXLPipeline`` (imported quietly)."""
    return _muted_diffusers_import("StableDiffusionXLPipeline")


def tiny_configs() -> dict[str, dict]:
    """Configs of the built-in tiny model (SD 1.x layout, small widths, 32 px images)."""
    return {
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
        ),
    }


def build_components(
    configs: dict[str, dict], tokenizer: CLIPTokenizer, seed: int = 0
) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Text encoder, UNet and VAE from ``configs`` (as ``tiny_configs()``), random weights
    drawn from ``seed`` (the caller's RNG state is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **configs["text_encoder"],
        )
        text_encoder = CLIPTextModel(text_config)
    return text_encoder, unet, vae


def build_tiny(seed: int = 0) -> BaseModel:
    """The built-in tiny SD 1.x-shaped model, with random weights drawn from ``seed``."""
    tokenizer = build_tiny_tokenizer()
    text_encoder, unet, vae = build_components(tiny_configs(), tokenizer, seed)
    source = TINY if seed == 0 else f"{TINY}:{seed}"
    return BaseModel.from_components(tokenizer, text_encoder, unet, vae, source)


def tiny_sdxl_configs() -> dict[str, dict]:
    """Configs of the built-in tiny SDXL-shaped model (32 px images).

    As SDXL: cross-attention from the second and third resolutions, more transformer blocks
    deeper down, linear projections, ``text_time`` added conditioning whose input is the
    pooled embedding plus six 8-dim time-id embeddings; two text encoders of different
    widths (32 and 48, concatenated to the UNet's 80), the second with a 24-dim projection.
    """
    te2_width, projection = 48, 24
    return {
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=32 + te2_width,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=projection + 6 * 8,
            norm_num_groups=8,
        ),
        "vae": tiny_configs()["vae"],
        "text_encoder": tiny_configs()["text_encoder"],
        "text_encoder_2": dict(
            hidden_size=te2_width,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=projection,
        ),
    }


def build_tiny_sdxl(seed: int = 0) -> BaseModel:
    """The built-in tiny SDXL-shaped model, random weights drawn from ``seed``."""
    configs = tiny_sdxl_configs()
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    tokenizer_2.pad_token = "!"  # as SDXL's second tokenizer: same vocabulary, other padding
    text_encoder, unet, vae = build_components(configs, tokenizer, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2),
                bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                pad_token_id=tokenizer_2.pad_token_id,
                **configs["text_encoder_2"],
            )
        )
    source = TINY_SDXL if seed == 0 else f"{TINY_SDXL}:{seed}"
    return BaseModel.from_components(
        tokenizer,
        text_encoder,
        unet,
        vae,
        source,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
    )


def named_bases() -> dict[str, EntryPoint]:
    """Base models installed under a name (entry points in the ``mos.bases`` group, each a
    function that returns a ``BaseModel``); this package installs ``toy``."""
    return {ep.name: ep for ep in entry_points(group=BASES_GROUP)}


def load_named_base(name: str) -> BaseModel:
    """The base model installed as ``name`` (see ``named_bases``)."""
    bases = named_bases()
    if name not in bases:
        known = ", ".join(sorted(bases)) or "none"
        raise BaseModelError(f"no base model is installed as {name!r} (installed: {known})")
    try:
        base = bases[name].load()()
    except (FileNotFoundError, ValueError) as err:
        raise BaseModelError(str(err)) from err
    if not isinstance(base, BaseModel):
        raise BaseModelError(f"the base model installed as {name!r} is not a BaseModel")
    return base


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_base_model(
    spec: str | Path,
    *,
    config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> BaseModel:
    """Load a base model from ``spec``.

    - ``tiny`` (or ``tiny:SEED``): the built-in tiny model (random weights);
    - ``tiny-sdxl`` (or ``tiny-sdxl:SEED``): the built-in tiny SDXL-shaped model;
    - a name installed in the ``mos.bases`` entry-point group (``named_bases``), such as
      ``toy``: the toy world's trained base model (``mos.toyworld``, 32 px shapes);
    - a folder with ``model_index.json``: a diffusers Stable Diffusion or SDXL folder;
    - a ``.safetensors`` file: a single-file SD 1.x / SDXL checkpoint (original key names;
      SDXL is told by its second text encoder's keys, ``conditioner.embedders.1``).
      Offline it needs ``config``, a local diffusers folder of the same architecture
      (weights not needed: ``model_index.json``, the ``*/config.json`` files, tokenizer);
    - anything shaped ``owner/name``: a Hugging Face hub id (needs the network).
    """
    spec_str = str(spec)
    installed = named_bases()
    if spec_str in installed:
        return load_named_base(spec_str).to("cpu", dtype)
    for name, build in ((TINY, build_tiny), (TINY_SDXL, build_tiny_sdxl)):
        if spec_str == name or spec_str.startswith(name + ":"):
            seed_text = spec_str.partition(":")[2] or "0"
            if not seed_text.isdigit():
                raise BaseModelError(
                    f"'{spec_str}': the {name} model takes an integer seed, e.g. {name}:1"
                )
            return build(int(seed_text)).to("cpu", dtype)

    path = Path(spec_str).expanduser()
    if path.is_dir():
        return _load_diffusers_folder(path, dtype)
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        raise BaseModelError(
            f"{path}: pickle-based checkpoints are not loaded (they can run code). "
            "Convert it to .safetensors first, or use a diffusers folder."
        )
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise BaseModelError(f"{path}: no such checkpoint file")
        return _load_single_file(path, config, dtype)
    if path.exists():
        raise BaseModelError(
            f"{path}: not a diffusers folder (with model_index.json) nor a .safetensors checkpoint"
        )
    if _HUB_ID.match(spec_str):
        return _load_hub(spec_str, dtype)
    raise BaseModelError(
        f"base model '{spec_str}' not found: give "
        + "".join(f"'{n}', " for n in [TINY, TINY_SDXL, *sorted(installed)])
        + "a diffusers folder, "
        "a single-file .safetensors checkpoint, or a hub id such as "
        "'stable-diffusion-v1-5/stable-diffusion-v1-5'"
    )


def _finish(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, source: str) -> BaseModel:
    base = BaseModel.from_pipeline(pipe, source)
    log.info(
        "loaded %s base model %s (%d cross-attention layers, fingerprint %s)",
        base.architecture_name,
        source,
        base.num_cross_attention_layers,
        base.fingerprint[:12],
    )
    return base


def _is_sdxl_folder(path: Path) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def _load_diffusers_folder(path: Path, dtype: torch.dtype) -> BaseModel:
    if not (path / "model_index.json").is_file():
        raise BaseModelError(
            f"{path}: a diffusers model folder needs model_index.json "
            "(and unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    xl = _is_sdxl_folder(path)
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    parts += ["text_encoder_2", "tokenizer_2"] if xl else []
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        what = "SDXL folder" if xl else "folder"
        raise BaseModelError(f"{path}: missing component {what}(s): {', '.join(missing)}")
    try:
        with _quiet_diffusers():  # a fused folder's concept_table is for MixOfShowPipeline
            if xl:
                pipe = sdxl_pipeline_class().from_pretrained(
                    str(path), dtype=dtype, local_files_only=True
                )
            else:
                pipe = sd_pipeline_class().from_pretrained(
                    str(path),
                    dtype=dtype,
                    safety_checker=None,
                    requires_safety_checker=False,
                    local_files_only=True,
                )
    except (OSError, ValueError) as err:
        raise BaseModelError(f"{path}: could not load the diffusers folder: {err}") from err
    return _finish(pipe, str(path))


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings off for one call (restored after)."""
    from diffusers.utils import logging as diffusers_logging

    saved = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved)


SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model"  # OpenCLIP bigG in an SDXL checkpoint


def single_file_is_sdxl(path: Path) -> bool:
    """Whether a single-file checkpoint is SDXL (it holds a second text encoder under
    ``conditioner.embedders.1``); reads the key names only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in f.keys())  # noqa: SIM118


def _load_single_file(path: Path, config: str | Path | None, dtype: torch.dtype) -> BaseModel:
    try:
        xl = single_file_is_sdxl(path)
    except Exception as err:  # safetensors raises its own error types
        raise BaseModelError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    what = "SDXL" if xl else "SD 1.x"
    example = "stable-diffusion-xl-base-1.0" if xl else "stable-diffusion-v1-5"
    if config is not None:
        config_dir = Path(config).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise BaseModelError(
                f"--base-config {config_dir}: expected a diffusers folder with model_index.json, "
                "unet/config.json, vae/config.json, text_encoder/config.json and tokenizer/"
                + (" (and text_encoder_2/, tokenizer_2/ for SDXL)" if xl else "")
            )
        if _is_sdxl_folder(config_dir) != xl:
            other = "an SD 1.x/2.x" if xl else "an SDXL"
            raise BaseModelError(
                f"--base-config {config_dir} is {other} folder but {path} is an {what} "
                f"checkpoint: give a config folder of the checkpoint's architecture ({example})"
            )
        kwargs: dict = {"config": str(config_dir), "local_files_only": True}
    else:
        kwargs = {"local_files_only": _offline()}
    try:
        if xl:
            pipe = sdxl_pipeline_class().from_single_file(str(path), dtype=dtype, **kwargs)
        else:
            pipe = sd_pipeline_class().from_single_file(
                str(path),
                dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
                **kwargs,
            )
    except Exception as err:  # diffusers raises many kinds here; all mean "cannot load"
        if config is None:
            raise BaseModelError(
                f"{path}: a single-file {what} checkpoint carries weights only; its configs and "
                "tokenizer come from the hub, which cannot be reached. Pass --base-config DIR, a "
                f"local diffusers folder of the same architecture (e.g. a {example} folder; "
                f"weights not needed). ({type(err).__name__}: {err})"
            ) from err
        raise BaseModelError(
            f"{path}: could not load the {what} checkpoint with config {config}: {err}"
        ) from err
    return _finish(pipe, str(path))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _load_hub(repo_id: str, dtype: torch.dtype) -> BaseModel:
    from diffusers import DiffusionPipeline

    try:
        with _quiet_diffusers():  # SDXL ignores the safety-checker arguments
            pipe = DiffusionPipeline.from_pretrained(
                repo_id,
                dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=_offline(),
            )
    except Exception as err:  # network errors, missing repo, missing cache
        raise BaseModelError(
            f"could not load '{repo_id}' from the Hugging Face hub (no network, not in the local "
            f"cache, or no such model): {type(err).__name__}: {err}. Download it on a machine with "
            "network and pass the folder instead."
        ) from err
    kinds = (sd_pipeline_class(), sdxl_pipeline_class())
    if not isinstance(pipe, kinds):
        raise BaseModelError(
            f"'{repo_id}' is a {type(pipe).__name__}; a base model must be a Stable Diffusion "
            "1.x / 2.x or SDXL text-to-image model"
        )
    return _finish(pipe, repo_id)


def base_fingerprint(base: BaseModel) -> str:
    """SHA-256 over what concept packages depend on.

    The tokenizer's vocabulary, the token-embedding matrix, and every LoRA-target linear of
    the text encoder and UNet (names, shapes and values rounded to fp16, so an fp16 and an
    fp32 copy of the same base agree). Computed when the base is loaded, before any concept
    tokens are added.
    """
    h = hashlib.sha256()
    h.update(json.dumps(sorted(base.tokenizer.get_vocab().items())).encode())
    te = base.text_encoder
    tensors = [("token_embedding", te.get_input_embeddings().weight)]
    if base.text_encoder_2 is not None:
        tensors.append(("token_embedding_2", base.text_encoder_2.get_input_embeddings().weight))
    for prefix, model, targets in base.lora_components():
        for name in target_layer_names(model, targets):
            tensors.append((f"{prefix}.{name}", model.get_submodule(name).weight))
    for name, tensor in tensors:
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        h.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()
