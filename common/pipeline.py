"""Sampling with layer-wise concept embeddings (ED-LoRA): a diffusers ``DiffusionPipeline``.

``MixOfShowPipeline.from_base(base, concepts)`` samples from a base that carries concepts
(tokens, embeddings, LoRA adapters): every prompt is encoded once per cross-attention
layer and each layer reads its own copy. As a ``DiffusionPipeline`` it has ``.to()``,
``progress_bar``, ``components`` and ``save_pretrained`` / ``from_pretrained``, which also
write and read the concept table (``concepts.json``). Any diffusers scheduler can be set
as ``pipe.scheduler``; classifier-free guidance as in ``StableDiffusionPipeline``
(``[uncond, cond]`` batches), so a pipeline without concepts gives exactly what diffusers
gives for the same seed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .adapters import AdapterCondition, adapter_features, check_adapter_fits
from .attention import cross_attention_layers, layerwise_cross_attention, regional_cross_attention
from .base import BaseModel
from .concepts import Concept, ConceptError, ConceptTable, encode_prompts, encode_text
from .files import atomic_write
from .fused import PIPELINE_FILE, PIPELINE_SOURCE
from .lora import lora_layers
from .package import ConceptPackage, attach_package
from .regions import (
    Region,
    crop_view,
    latent_sizes,
    region_masks,
    view_stride,
    view_windows,
)
from .text import TextEncoders, added_conditions

CONCEPTS_FILE = "concepts.json"  # the concept table beside model_index.json


class MixOfShowPipeline(DiffusionPipeline):
    """Text-to-image sampling with ED-LoRA concepts and regions (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer_2", "text_encoder_2"]  # SDXL's second text encoder

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        concept_table: list[dict] | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
    ) -> None:
        """``concept_table``: the concepts as ``model_index.json`` lists them (what
        ``Concept.to_dict`` writes), so that stock ``DiffusionPipeline.from_pretrained``
        builds a pipeline that knows them. ``tokenizer_2`` / ``text_encoder_2``: SDXL's."""
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            tokenizer_2=tokenizer_2,
            text_encoder_2=text_encoder_2,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.concepts = ConceptTable(Concept.from_dict(d) for d in concept_table or [])
        for tok in (tokenizer, tokenizer_2):
            if tok is not None:
                _check_tokens(self.concepts, tok, "this pipeline")

    @property
    def text(self) -> TextEncoders:
        """The tokenizer(s) and text encoder(s) as one callable (``mos.common.text``)."""
        return TextEncoders(
            self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2
        )

    @classmethod
    def from_base(cls, base: BaseModel, concepts: ConceptTable | None = None) -> MixOfShowPipeline:
        """A pipeline on ``base``'s components (shared, not copied) knowing ``concepts``."""
        pipe = cls(
            base.vae,
            base.text_encoder,
            base.tokenizer,
            base.unet,
            base.scheduler,
            tokenizer_2=base.tokenizer_2,
            text_encoder_2=base.text_encoder_2,
        )
        pipe.concepts = concepts if concepts is not None else ConceptTable()
        return pipe

    @classmethod
    def from_packages(
        cls, base: BaseModel, packages: Sequence[ConceptPackage]
    ) -> MixOfShowPipeline:
        """Attach one concept package to ``base`` (several need fusion: ``mos-fuse``)."""
        if len(packages) > 1:
            raise ValueError(
                "one base can carry one concept package's LoRA at a time; fuse several "
                "packages into one model first"
            )
        concepts = ConceptTable()
        for pkg in packages:
            attach_package(base, pkg, concepts)
        return cls.from_base(base, concepts)

    @property
    def default_resolution(self) -> int:
        """The base's native image size in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def num_layers(self) -> int:
        """The UNet's cross-attention layers: one text encoding per layer."""
        return len(cross_attention_layers(self.unet))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """A diffusers folder (``model_index.json``, one folder per component) plus
        ``concepts.json``. Adapters must be merged first: a package's LoRA is saved as its
        concept package, a fused model with ``mos.common.fused.save_fused_folder``."""
        if any(True for m in (*self.text.encoders(), self.unet) for _ in lora_layers(m)):
            raise ValueError(
                "this pipeline carries LoRA adapters, which a diffusers folder cannot hold: "
                "save the concept package, or merge the adapters (save_fused_folder)"
            )
        kwargs.setdefault("safe_serialization", True)
        self.register_to_config(concept_table=[c.to_dict() for c in self.concepts])
        super().save_pretrained(save_directory, **kwargs)
        table = {"format": "mix-of-show/concepts", "concepts": [c.to_dict() for c in self.concepts]}
        text = json.dumps(table, indent=2)
        atomic_write(Path(save_directory) / CONCEPTS_FILE, lambda tmp: Path(tmp).write_text(text))
        source = Path(save_directory) / PIPELINE_FILE
        atomic_write(source, lambda tmp: Path(tmp).write_text(PIPELINE_SOURCE))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> MixOfShowPipeline:
        """diffusers' loader, then the concept table of a local folder (``concepts.json``;
        a folder without one loads with no concepts). Every concept token must be in the
        tokenizer."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        table_path = Path(pretrained_model_name_or_path) / CONCEPTS_FILE
        if table_path.is_file():
            data = json.loads(table_path.read_text())
            pipe.concepts = ConceptTable(Concept.from_dict(d) for d in data["concepts"])
            _check_tokens(pipe.concepts, pipe.tokenizer, str(pretrained_model_name_or_path))
        return pipe

    @contextlib.contextmanager
    def lora_scale(self, scale: float | None) -> Iterator[None]:
        """Temporarily scale every LoRA adapter (0 = embeddings only; None = leave as is)."""
        layers = [x for m in (*self.text.encoders(), self.unet) for _, x in lora_layers(m)]
        saved = [layer.scale for layer in layers]
        try:
            if scale is not None:
                for layer in layers:
                    layer.scale = float(scale)
            yield
        finally:
            for layer, s in zip(layers, saved, strict=True):
                layer.scale = s

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[batch, L, tokens, dim]`` for the UNet's L cross-attention layers."""
        return encode_prompts(self.text, prompts, self.concepts, self.num_layers)

    def _context(
        self, prompts: Sequence[str], region_prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[batch, L, (1 + R) * tokens, dim]``: each prompt, then every region's prompt;
        and (SDXL) the pooled embedding of each prompt (regions leave it as it is)."""
        cond, pooled = encode_text(self.text, prompts, self.concepts, self.num_layers)
        if not region_prompts:
            return cond, pooled
        reg = self.encode(region_prompts)  # [R, L, T, D]
        reg = reg.permute(1, 0, 2, 3).flatten(1, 2)  # [L, R*T, D]
        reg = reg.unsqueeze(0).expand(len(prompts), -1, -1, -1)
        return torch.cat([cond, reg], dim=2), pooled

    def _views(self, model_in, t, context, extra, views, view_regions, pooled) -> torch.Tensor:
        """The UNet's prediction for a large latent, averaged over its windows (each with
        the regions inside it: the global prompt's tokens, then those regions')."""
        tokens = self.tokenizer.model_max_length
        full = tuple(model_in.shape[-2:])
        pred = torch.zeros_like(model_in)
        count = torch.zeros_like(model_in[:1, :1])
        residuals = extra.get("down_intrablock_additional_residuals")
        for view, (inside, masks) in zip(views, view_regions, strict=True):
            keep = [context[:, :, :tokens]]
            keep += [context[:, :, (1 + r) * tokens : (2 + r) * tokens] for r in inside]
            ctx = torch.cat(keep, dim=2)
            attention = (
                regional_cross_attention(self.unet, masks, tokens)
                if inside
                else layerwise_cross_attention(self.unet)
            )
            kwargs: dict[str, Any] = {}
            if pooled is not None:  # SDXL: each window is an image of the window's size
                _, _, vh, vw = view
                f = self.vae_scale_factor
                kwargs.update(added_conditions(pooled, vh * f, vw * f))
            if residuals is not None:
                kwargs["down_intrablock_additional_residuals"] = [
                    crop_view(f, view, full) for f in residuals
                ]
            with attention:
                out = self.unet(
                    crop_view(model_in, view, full), t, encoder_hidden_states=ctx, **kwargs
                ).sample
            crop_view(pred, view, full).add_(out)
            crop_view(count, view, full).add_(1)
        return pred / count

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        lora_scale: float | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = False,
        regions: Sequence[Region] = (),
        adapters: Sequence[AdapterCondition] = (),
        adapter_conditioning_factor: float = 1.0,
        native_views: bool = False,
        view_overlap: float = 0.5,
        callback: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Sample; with ``regions`` each region's prompt is drawn in its box (docs/method.md,
        section 3), the global prompt everywhere else. ``adapters`` add T2I-Adapter
        guidance (keypose, sketch) with a global weight and optional per-region weights, in
        the first ``adapter_conditioning_factor`` of the steps (as diffusers' adapter
        pipelines: the layout is set early, the later steps draw the details freely).
        ``native_views`` denoises a canvas larger than the base's own resolution in
        overlapping windows of that resolution, averaging their predictions (MultiDiffusion,
        as diffusers' panorama pipeline): each window sees the canvas size the base was
        trained on, with the regions (and adapter features) that fall inside it.
        ``view_overlap`` is the fraction of a window its neighbour shares (0.5, the
        panorama pipeline's; 0: side-by-side tiles, each denoised on its own, which on the
        toy base keeps every concept whole: a window that straddles two boxes sees half
        of each and redraws them as one, benchmarks/RESULTS.md). ``callback(step, steps)``
        is called after each denoising step (a progress bar in another process, a UI)."""
        prompts, negatives = self._check_inputs(
            prompt, negative_prompt, num_inference_steps, adapter_conditioning_factor
        )
        height = height or self.default_resolution
        width = width or self.default_resolution
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}")
        regions = list(regions)
        layout = self._layout(
            regions, height // factor, width // factor, native_views, view_overlap
        )
        for condition in adapters:
            check_adapter_fits(condition.adapter, self.unet, factor)
        features = adapter_features(
            adapters, [r.box for r in regions], width, height, self.device, self.unet.dtype
        )
        with self.lora_scale(lora_scale), layout.attention:
            context, pooled = self._guided_context(
                prompts, negatives, regions, num_images_per_prompt, guidance_scale
            )
            latents = self._initial_latents(
                len(prompts) * num_images_per_prompt, layout.size, latents, generator
            )
            latents = self._denoise(
                latents,
                context,
                pooled,
                layout,
                features,
                num_inference_steps,
                guidance_scale,
                adapter_conditioning_factor,
                progress,
                callback,
            )
        return self._decode(latents, output_type)

    # --- the steps of __call__ ------------------------------------------------------------
    @staticmethod
    def _check_inputs(
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str],
        num_inference_steps: int,
        adapter_conditioning_factor: float,
    ) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        negatives = (
            [negative_prompt] * len(prompts)
            if isinstance(negative_prompt, str)
            else list(negative_prompt)
        )
        if len(negatives) != len(prompts):
            raise ValueError("give one negative prompt, or one per prompt")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if not 0.0 <= adapter_conditioning_factor <= 1.0:
            raise ValueError(
                "adapter_conditioning_factor is the fraction of the steps with adapter "
                f"guidance, in [0, 1]; got {adapter_conditioning_factor}"
            )
        return prompts, negatives

    def _layout(
        self,
        regions: list[Region],
        lh: int,
        lw: int,
        native_views: bool,
        view_overlap: float,
    ) -> _Layout:
        """The cross-attention processors for the regions, and the windows of the canvas
        (one, or the native-size views with the regions inside each)."""
        factor = self.vae_scale_factor
        levels = len(self.unet.config.block_out_channels)
        sizes = latent_sizes(lh, lw, levels)
        full_masks = [region_masks([r.box for r in regions], h, w) for h, w in sizes]
        attention: contextlib.AbstractContextManager[object]
        if regions:
            masks = {h * w: m for (h, w), m in zip(sizes, full_masks, strict=True)}
            attention = regional_cross_attention(self.unet, masks, self.tokenizer.model_max_length)
        else:
            attention = layerwise_cross_attention(self.unet)
        native = self.default_resolution // factor
        align = 2 ** (levels - 1)
        stride = view_stride(native, view_overlap, align)  # checks the overlap, views or not
        views = (
            view_windows(lh, lw, native, stride, align=align) if native_views else [(0, 0, lh, lw)]
        )
        view_regions = []  # per view (when there are several): its regions and their masks
        for view in views if len(views) > 1 else ():
            crops = [
                crop_view(m.view(-1, h, w), view, (lh, lw))
                for (h, w), m in zip(sizes, full_masks, strict=True)
            ]
            inside = [r for r in range(len(regions)) if crops[0][r].any()]
            view_regions.append(
                (inside, {c.shape[-2] * c.shape[-1]: c[inside].flatten(1) for c in crops})
            )
        return _Layout((lh, lw), attention, views, view_regions)

    def _guided_context(
        self,
        prompts: list[str],
        negatives: list[str],
        regions: list[Region],
        num_images_per_prompt: int,
        guidance_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text context of every image: ``[uncond; cond]`` with guidance, else cond; and
        (SDXL) the pooled embeddings in the same order. SDXL with no negative prompt at all
        guides against zeros, as ``StableDiffusionXLPipeline`` (``force_zeros_for_empty_prompt``)."""
        dtype = self.unet.dtype
        cond, pooled = self._context(prompts, [r.prompt for r in regions])
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
        if pooled is not None:
            pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0).to(dtype)
        if guidance_scale <= 1.0:
            return cond.to(dtype), pooled
        no_negatives = not any(
            n.strip() for n in [*negatives, *(r.negative_prompt for r in regions)]
        )
        if pooled is not None and no_negatives:
            return torch.cat([torch.zeros_like(cond), cond]).to(dtype), torch.cat(
                [torch.zeros_like(pooled), pooled]
            )
        uncond, pooled_u = self._context(negatives, [r.negative_prompt for r in regions])
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
        if pooled is not None and pooled_u is not None:
            pooled_u = pooled_u.repeat_interleave(num_images_per_prompt, dim=0).to(dtype)
            pooled = torch.cat([pooled_u, pooled])
        return torch.cat([uncond, cond]).to(dtype), pooled

    def _initial_latents(
        self,
        batch: int,
        size: tuple[int, int],
        latents: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        device, dtype = self.device, self.unet.dtype
        shape = (batch, self.unet.config.in_channels, *size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(device, dtype)

    def _denoise(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        layout: _Layout,
        features: list[torch.Tensor],
        num_inference_steps: int,
        guidance_scale: float,
        adapter_conditioning_factor: float,
        progress: bool,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """The sampler loop: classifier-free guidance, adapter residuals in the first steps,
        one UNet call on the canvas or one per view."""
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        do_cfg = guidance_scale > 1.0
        guided = int(round(adapter_conditioning_factor * len(scheduler.timesteps)))
        self.set_progress_bar_config(disable=not progress, desc="sampling")
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            extra = {}
            if features and i < guided:  # the UNet pops from the list: a fresh one each step
                n = model_in.shape[0]
                extra["down_intrablock_additional_residuals"] = [
                    f.expand(n, -1, -1, -1) for f in features
                ]
            if len(layout.views) == 1:
                f = self.vae_scale_factor
                h, w = model_in.shape[-2] * f, model_in.shape[-1] * f
                added = added_conditions(pooled, h, w)
                eps = self.unet(model_in, t, encoder_hidden_states=context, **extra, **added).sample
            else:
                eps = self._views(
                    model_in, t, context, extra, layout.views, layout.view_regions, pooled
                )
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
            if callback is not None:
                callback(i + 1, len(scheduler.timesteps))
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor:
        if output_type == "latent":
            return latents
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]


def _check_tokens(concepts: ConceptTable, tokenizer: CLIPTokenizer, where: str) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for c in concepts for t in c.all_tokens() if t not in vocab]
    if missing:
        raise ConceptError(f"{where}: the tokenizer lacks concept tokens {missing[:3]}")


@dataclass
class _Layout:
    """Where a sample's regions and windows lie on its latent canvas."""

    size: tuple[int, int]  # latent height, width
    attention: contextlib.AbstractContextManager[object]
    views: list[tuple[int, int, int, int]]
    view_regions: list[tuple[list[int], dict[int, torch.Tensor]]]
