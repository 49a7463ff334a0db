"""Sampling with layer-wise concept embeddings (ED-LoRA), in the style of a diffusers pipeline.

``MixOfShowPipeline(base, concepts)`` samples from a base that carries concepts (tokens,
embeddings, LoRA adapters): every prompt is encoded once per cross-attention layer and each
layer reads its own copy. Any diffusers scheduler can be set as ``pipe.scheduler``;
classifier-free guidance as in ``StableDiffusionPipeline`` (``[uncond, cond]`` batches), so
a pipeline without concepts gives exactly what diffusers gives for the same seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from .adapters import AdapterCondition, adapter_features, check_adapter_fits
from .attention import layerwise_cross_attention, regional_cross_attention
from .base import BaseModel
from .concepts import ConceptTable, encode_prompts
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


class MixOfShowPipeline:
    def __init__(self, base: BaseModel, concepts: ConceptTable | None = None) -> None:
        self.base = base
        self.concepts = concepts if concepts is not None else ConceptTable()
        self.scheduler = base.scheduler

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
        return cls(base, concepts)

    @contextlib.contextmanager
    def lora_scale(self, scale: float | None) -> Iterator[None]:
        """Temporarily scale every LoRA adapter (0 = embeddings only; None = leave as is)."""
        layers = [x for m in (self.base.text_encoder, self.base.unet) for _, x in lora_layers(m)]
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
        b = self.base
        return encode_prompts(
            b.text_encoder, b.tokenizer, prompts, self.concepts, b.num_cross_attention_layers
        )

    def _context(self, prompts: Sequence[str], region_prompts: Sequence[str]) -> torch.Tensor:
        """``[batch, L, (1 + R) * tokens, dim]``: each prompt, then every region's prompt."""
        cond = self.encode(prompts)
        if not region_prompts:
            return cond
        reg = self.encode(region_prompts)  # [R, L, T, D]
        reg = reg.permute(1, 0, 2, 3).flatten(1, 2)  # [L, R*T, D]
        return torch.cat([cond, reg.unsqueeze(0).expand(len(prompts), -1, -1, -1)], dim=2)

    def _views(self, model_in, t, context, extra, views, view_regions) -> torch.Tensor:
        """The UNet's prediction for a large latent, averaged over its windows (each with
        the regions inside it: the global prompt's tokens, then those regions')."""
        b = self.base
        tokens = b.tokenizer.model_max_length
        full = tuple(model_in.shape[-2:])
        pred = torch.zeros_like(model_in)
        count = torch.zeros_like(model_in[:1, :1])
        residuals = extra.get("down_intrablock_additional_residuals")
        for view, (inside, masks) in zip(views, view_regions, strict=True):
            keep = [context[:, :, :tokens]]
            keep += [context[:, :, (1 + r) * tokens : (2 + r) * tokens] for r in inside]
            ctx = torch.cat(keep, dim=2)
            attention = (
                regional_cross_attention(b.unet, masks, tokens)
                if inside
                else layerwise_cross_attention(b.unet)
            )
            kwargs = {}
            if residuals is not None:
                kwargs["down_intrablock_additional_residuals"] = [
                    crop_view(f, view, full) for f in residuals
                ]
            with attention:
                out = b.unet(
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
        of each and redraws them as one, benchmarks/RESULTS.md)."""
        b = self.base
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
        height = height or b.default_resolution
        width = width or b.default_resolution
        factor = b.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if not 0.0 <= adapter_conditioning_factor <= 1.0:
            raise ValueError(
                "adapter_conditioning_factor is the fraction of the steps with adapter "
                f"guidance, in [0, 1]; got {adapter_conditioning_factor}"
            )
        device = b.device
        dtype = b.unet.dtype

        regions = list(regions)
        lh, lw = height // factor, width // factor
        levels = len(b.unet.config.block_out_channels)
        sizes = latent_sizes(lh, lw, levels)
        full_masks = [region_masks([r.box for r in regions], h, w) for h, w in sizes]
        attention: contextlib.AbstractContextManager[object]
        if regions:
            masks = {h * w: m for (h, w), m in zip(sizes, full_masks, strict=True)}
            attention = regional_cross_attention(b.unet, masks, b.tokenizer.model_max_length)
        else:
            attention = layerwise_cross_attention(b.unet)
        native = b.default_resolution // factor
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

        for condition in adapters:
            check_adapter_fits(condition.adapter, b.unet, factor)
        features = adapter_features(
            adapters, [r.box for r in regions], width, height, device, dtype
        )

        with self.lora_scale(lora_scale), attention:
            cond = self._context(prompts, [r.prompt for r in regions])
            cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
            do_cfg = guidance_scale > 1.0
            if do_cfg:
                uncond = self._context(negatives, [r.negative_prompt for r in regions])
                uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
                context = torch.cat([uncond, cond]).to(dtype)
            else:
                context = cond.to(dtype)

            batch = len(prompts) * num_images_per_prompt
            shape = (batch, b.unet.config.in_channels, lh, lw)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            elif tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
            else:
                latents = latents.to(device, dtype)
            scheduler = self.scheduler
            scheduler.set_timesteps(num_inference_steps, device=device)
            latents = latents * scheduler.init_noise_sigma
            guided = int(round(adapter_conditioning_factor * len(scheduler.timesteps)))
            for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling")):
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                extra = {}
                if features and i < guided:  # the UNet pops from the list: a fresh one each step
                    n = model_in.shape[0]
                    extra["down_intrablock_additional_residuals"] = [
                        f.expand(n, -1, -1, -1) for f in features
                    ]
                if len(views) == 1:
                    eps = b.unet(model_in, t, encoder_hidden_states=context, **extra).sample
                else:
                    eps = self._views(model_in, t, context, extra, views, view_regions)
                if do_cfg:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                latents = scheduler.step(eps, t, latents).prev_sample

        if output_type == "latent":
            return latents
        images = b.vae.decode(latents / b.vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]
