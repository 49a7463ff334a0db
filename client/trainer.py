"""ED-LoRA tuning of one concept on a folder of photos (docs/method.md, section 1).

``train_concept`` adds the concept's tokens to the base, injects rank-4 LoRA adapters into
the text encoder and UNet, and optimises (AdamW, three learning rates, linear decay):

- the concept's embedding rows (every other row is untouchable, see ``TrainableRows``),
  frozen once their mean norm reaches the threshold;
- text-encoder LoRA (q/k/v/out of every CLIP attention);
- UNet LoRA (to_q/to_k/to_v/to_out.0 of every transformer attention).

The loss is the MSE against ``denoising_target`` (epsilon or v) with a noise offset; with
subject masks, optionally only inside the mask, plus the attention regularisation. VAE
latents are encoded once per photo and flip (the crop is fixed; no mirrored copies when
``flip_p`` is 0), keeping the distribution so every step still samples fresh latents,
exactly as encoding each step would.

On return the base carries the concept (tokens, embeddings, adapters) so it can sample.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..common.attention import AttentionMapRecorder, layerwise_cross_attention
from ..common.base import BaseModel, BaseModelError, denoising_target
from ..common.concepts import Concept, ConceptTable, encode_text, tokenize
from ..common.config import TrainConfig
from ..common.edlora import add_concept_tokens, initial_embeddings, trainable_rows
from ..common.lora import UNET_CONV_TARGETS, LoRALayer, inject_lora, lora_state_dict
from ..common.package import ConceptPackage
from ..common.text import added_conditions
from .data import (
    PLACEHOLDER,
    Photo,
    canvas_view,
    crop_view,
    photo_tensors,
    shrunk,
    templated_caption,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    package: ConceptPackage
    concepts: ConceptTable
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    embeddings_frozen_at: int | None = None


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this run, or None for full fp32."""
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "fp16":
        return torch.float16
    if config.mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@torch.no_grad()
def _encode_latents(
    base: BaseModel, pixels: torch.Tensor, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std (already times the VAE scaling factor)."""
    means, stds = [], []
    scale = base.vae.config.scaling_factor
    for chunk in pixels.split(batch):
        dist = base.vae.encode(chunk.to(base.device, base.vae.dtype)).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def denoising_loss(
    base: BaseModel,
    concepts: ConceptTable,
    photos: list[Photo],
    caption: str,
    *,
    resolution: int | None = None,
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    seed: int = 0,
) -> float:
    """Mean denoising MSE (against ``denoising_target``: noise or velocity) of ``base`` on
    ``photos`` with ``caption``, over fixed noise and timesteps.

    The same photos, seed and timesteps give the same batch, so two models can be compared
    (a concept model before and after tuning, or the fused model against the concept model).
    """
    resolution = resolution or base.default_resolution
    pixels = torch.stack([photo_tensors(p, resolution)[0] for p in photos])
    latents, _ = _encode_latents(base, pixels)
    gen = torch.Generator().manual_seed(seed)
    num_layers = base.num_cross_attention_layers
    total = 0.0
    with layerwise_cross_attention(base.unet):
        context, pooled = encode_text(base.text, [caption] * len(photos), concepts, num_layers)
        added = added_conditions(pooled, resolution, resolution)
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=gen).to(base.device)
            tt = torch.full((len(photos),), t, device=base.device)
            noisy = base.noise_scheduler.add_noise(latents, noise, tt)
            pred = base.unet(noisy, tt, encoder_hidden_states=context, **added).sample
            target = denoising_target(base.noise_scheduler, latents, noise, tt)
            total += float(F.mse_loss(pred.float(), target))
    return total / len(timesteps)


def masked_mse(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the squared error ``err`` ``[B, C, h, w]`` over the pixels inside ``mask``.

    ``mask`` ``[B, 1, H, W]`` in [0, 1] is area-downsampled to the latent grid; the mean is
    weighted by it, over every channel.
    """
    m = F.interpolate(mask, size=err.shape[-2:], mode="area")
    return (err * m).sum() / (m.sum() * err.shape[1]).clamp(min=1e-8)


def _word_attention(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A word's attention map ``[B, pixels]``: the mean over its positions."""
    weights = positions.float() / positions.float().sum(dim=1, keepdim=True).clamp(min=1)
    return torch.einsum("bpt,bt->bp", probs.float(), weights)


def _word_map(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A word's attention map ``[B, pixels]`` divided by each sample's maximum."""
    a = _word_attention(probs, positions)
    return a / a.amax(dim=1, keepdim=True).clamp(min=1e-8)


def attention_regularisation(
    maps: dict[int, torch.Tensor],
    masks: torch.Tensor,
    pos_first: torch.Tensor,
    pos_second: torch.Tensor,
) -> torch.Tensor:
    """Pull the 2nd word's attention onto the subject and the 1st word's off the background.

    ``maps[l]``: ``[B, pixels, tokens]``; ``masks``: ``[B, 1, H, W]``; ``pos_*``: ``[B, tokens]``
    booleans marking each word's positions. Per layer, each word's map (mean over its
    positions) is divided by its maximum; the loss is
    ``mean((a2 - m)^2) + mean((a1 * (1 - m))^2)``, averaged over layers.
    """
    losses = []
    for probs in maps.values():
        pixels = probs.shape[1]
        h = int(round(math.sqrt(pixels)))  # square latents; SD's maps are h x h
        m = F.interpolate(masks, size=(h, pixels // h), mode="area").flatten(1)  # [B, pixels]
        a1, a2 = _word_map(probs, pos_first), _word_map(probs, pos_second)
        losses.append(((a2 - m) ** 2).mean() + ((a1 * (1 - m)) ** 2).mean())
    return torch.stack(losses).mean()


def attention_regularisation_authors(
    maps: dict[int, torch.Tensor],
    masks: torch.Tensor,
    pos_first: torch.Tensor,
    pos_second: torch.Tensor,
    full_identity: bool = False,
) -> torch.Tensor:
    """The authors' form: the layers' maps are averaged per resolution; each word's map is
    divided by its maximum over the batch; per resolution the loss is the first word's mean
    attention off the mask plus the second word's (``full_identity``: the second word's
    mean squared error to the mask), summed over resolutions. A resolution whose mask has
    no background pixel adds nothing."""
    by_size: dict[int, list[torch.Tensor]] = {}
    for probs in maps.values():
        by_size.setdefault(probs.shape[1], []).append(probs.float())
    total = masks.new_zeros(())
    for pixels, group in by_size.items():
        probs = torch.stack(group).mean(0)
        h = int(round(math.sqrt(pixels)))
        m = F.interpolate(masks, size=(h, pixels // h), mode="nearest").flatten(1)
        background = m < 0.5
        if not bool(background.any()):
            continue
        a1, a2 = (_word_attention(probs, p) for p in (pos_first, pos_second))
        a1, a2 = a1 / a1.max().clamp(min=1e-8), a2 / a2.max().clamp(min=1e-8)
        subject = ((a2 - m) ** 2).mean() if full_identity else a2[background].mean()
        total = total + subject + a1[background].mean()
    return total


@contextlib.contextmanager
def _rank_fits(option: str, rank: int) -> Iterator[None]:
    """A rank the adapter layers refuse (larger than a layer allows) becomes a user error."""
    try:
        yield
    except ValueError as err:
        raise BaseModelError(f"{option} {rank} is too large for this base model ({err})") from err


def train_concept(
    base: BaseModel,
    photos: list[Photo],
    concept_name: str,
    class_word: str,
    config: TrainConfig,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Tune one concept on ``photos``; returns its package (see module docstring).

    Deterministic for a given ``config.seed`` (LoRA initialisation and dropout included);
    the caller's global RNG state is left as it was.
    """
    devices = [base.device] if base.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _train(base, photos, concept_name, class_word, config, progress, on_step)


@dataclass
class TrainingData:
    """The photos as the training loop reads them: VAE latent distributions per (photo,
    flip), masks, captions tokenised once per layer copy, and the concept words' ids."""

    lat_mean: torch.Tensor  # [N, views, C, h, w]
    lat_std: torch.Tensor
    masks: torch.Tensor  # [N, views, 1, H, W]; ones where a photo has no mask
    has_mask: torch.Tensor  # [N] bool
    caption_ids: torch.Tensor  # [N, copies, 77]
    word_ids: list[torch.Tensor]  # [copies] ids of the first and the last word
    copies: int  # layer-wise copies of each caption (1 for vanilla LoRA)
    # for the per-step augmentations and caption templates
    photos: list[Photo] = field(default_factory=list)
    resolution: int = 0
    phrase: str = ""  # the concept as written in captions
    concepts: ConceptTable | None = None

    @property
    def use_masks(self) -> bool:
        return bool(self.has_mask.any())


@dataclass
class Adapters:
    """The LoRA layers injected for tuning, and their parameters per learning rate."""

    text_prefixes: list[tuple[str, torch.nn.Module]]  # (key prefix, text encoder)
    text_params: list[torch.nn.Parameter]
    unet_params: list[torch.nn.Parameter]
    kv_layers: list[LoRALayer] = field(default_factory=list)  # attn2 to_k / to_v


def prepare_data(
    base: BaseModel,
    photos: list[Photo],
    concept: Concept,
    concepts: ConceptTable,
    resolution: int,
    config: TrainConfig,
) -> TrainingData:
    """Encode every photo (and its mirror, when flips can be drawn) once, and every caption
    once per layer copy."""
    device = base.device
    # with augmentations every step draws new views, encoded then: nothing to encode here
    views = 0 if config.augment != "none" else 2 if config.flip_p > 0 else 1  # mirrors: 1
    pixels, masks, has_mask = [], [], []
    for p in photos:
        has_mask.append(p.mask is not None)
        if not views:
            continue
        x, m = photo_tensors(p, resolution)
        mask = m if m is not None else torch.ones(1, resolution, resolution)
        pixels += [x, x.flip(-1)][:views]
        masks += [mask, mask.flip(-1)][:views]
    if views:
        lat_mean, lat_std = _encode_latents(base, torch.stack(pixels))
        lat_mean = lat_mean.view(len(photos), views, *lat_mean.shape[1:])
        lat_std = lat_std.view(len(photos), views, *lat_std.shape[1:])
        mask_views = torch.stack(masks).view(len(photos), views, 1, resolution, resolution)
    else:
        lat_mean = lat_std = mask_views = torch.empty(0)
    copies = base.num_cross_attention_layers if concept.layerwise else 1
    captions = [p.caption.replace(PLACEHOLDER, concept.phrase()) for p in photos]
    caption_ids = torch.stack(
        [tokenize(base.tokenizer, concepts.expand(c, copies)) for c in captions]
    ).to(device)
    word_ids = [
        torch.tensor(
            base.tokenizer.convert_tokens_to_ids(
                [concept.layer_token(w, i) for i in range(copies)]
            ),
            device=device,
        )
        for w in (0, len(concept.words) - 1)
    ]
    if not views:  # augmented each step: shrink large photos once, not every step
        photos = [shrunk(p, resolution) for p in photos]
    return TrainingData(
        lat_mean=lat_mean,
        lat_std=lat_std,
        masks=mask_views.to(device),
        has_mask=torch.tensor(has_mask, device=device),
        caption_ids=caption_ids,
        word_ids=word_ids,
        copies=copies,
        photos=list(photos),
        resolution=resolution,
        phrase=concept.phrase(),
        concepts=concepts,
    )


def inject_adapters(base: BaseModel, config: TrainConfig) -> Adapters:
    """Rank-``rank`` LoRA on the text encoder(s) (SDXL: both) and the UNet's attention, and
    with ``conv_rank`` on the up blocks' ResNet convolutions (in this order: the global RNG
    draws their initial values)."""
    components = base.lora_components()
    text = [
        (prefix, model, targets) for prefix, model, targets in components if model is not base.unet
    ]
    unet_targets = next(targets for _, model, targets in components if model is base.unet)
    te_layers: dict[str, LoRALayer] = {}
    with _rank_fits("--rank", config.rank):
        for prefix, model, targets in text:
            for name, layer in inject_lora(
                model, targets, config.rank, config.lora_dropout
            ).items():
                te_layers[f"{prefix}.{name}"] = layer
        unet_layers = inject_lora(base.unet, unet_targets, config.rank, config.lora_dropout)
    if config.conv_rank:
        with _rank_fits("--conv-rank", config.conv_rank):
            unet_layers |= inject_lora(
                base.unet, UNET_CONV_TARGETS, config.conv_rank, config.lora_dropout
            )

    def params(layers: dict) -> list[torch.nn.Parameter]:
        return [p for x in layers.values() for p in (x.lora_A.weight, x.lora_B.weight)]

    kv = [
        layer
        for name, layer in unet_layers.items()
        if ".attn2." in f".{name}" and name.endswith(("to_k", "to_v"))
    ]
    prefixes = [(prefix, model) for prefix, model, _ in text]
    return Adapters(prefixes, params(te_layers), params(unet_layers), kv)


def make_optimizer(
    rows: torch.nn.Parameter, adapters: Adapters, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the three learning rates, and the learning-rate schedule."""
    optimizer = torch.optim.AdamW(
        [
            {"params": [rows], "lr": config.lr_embedding},
            {"params": adapters.text_params, "lr": config.lr_text},
            {"params": adapters.unet_params, "lr": config.lr_unet},
        ],
        weight_decay=config.weight_decay,
    )

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / config.steps) if config.lr_schedule == "linear" else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_loss(
    base: BaseModel,
    data: TrainingData,
    config: TrainConfig,
    gen: torch.Generator,
    amp: torch.dtype | None,
    recorder: AttentionMapRecorder | None,
    kv_layers: Sequence[LoRALayer] = (),
) -> torch.Tensor:
    """One batch: draw photos, flips, (augmented views,) latents, noise and timesteps, (then
    captions and the k/v LoRA branches dropped) from ``gen`` in this order, and return the
    denoising loss (with the mask, the photo area and the attention regulariser)."""
    device = base.device
    n = len(data.has_mask)
    idx = torch.randint(n, (config.batch_size,), generator=gen)
    flip = (torch.rand(config.batch_size, generator=gen) < config.flip_p).long()
    area = None
    if config.augment == "none":
        mean, std = data.lat_mean[idx, flip], data.lat_std[idx, flip]
        m = data.masks[idx.to(device), flip.to(device)]
    else:
        views = [
            canvas_view(data.photos[i], data.resolution, gen, scale=(config.canvas_scale, 1.0))
            if config.augment == "canvas"
            else crop_view(data.photos[i], data.resolution, gen)
            for i in idx.tolist()
        ]
        x, m, a = (torch.stack(t) for t in zip(*views, strict=True))
        x, m, a = (torch.where(flip[:, None, None, None].bool(), t.flip(-1), t) for t in (x, m, a))
        mean, std = _encode_latents(base, x)
        m = m.to(device)
        area = a.to(device) if config.augment == "canvas" else None
    latents = mean + std * torch.randn(mean.shape, generator=gen).to(mean.device)
    latents = latents.to(device)
    noise = torch.randn(mean.shape, generator=gen)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn((*mean.shape[:2], 1, 1), generator=gen)
    noise = noise.to(device)
    num_train_t = base.noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, num_train_t, (config.batch_size,), generator=gen).to(device)
    noisy = base.noise_scheduler.add_noise(latents, noise, t)
    target = denoising_target(base.noise_scheduler, latents, noise, t)
    batch_ids = data.caption_ids[idx.to(device)]
    if config.caption_templates != "none":
        assert data.concepts is not None
        captions = [
            templated_caption(data.photos[i], config.caption_templates, gen).replace(
                PLACEHOLDER, data.phrase
            )
            for i in idx.tolist()
        ]
        batch_ids = torch.stack(
            [tokenize(base.tokenizer, data.concepts.expand(c, data.copies)) for c in captions]
        ).to(device)
    if kv_layers and config.kv_dropout_mode == "lora" and config.kv_dropout > 0:
        off = torch.rand(len(kv_layers), generator=gen) < config.kv_dropout
        for layer, dropped in zip(kv_layers, off.tolist(), strict=True):
            layer.scale = 0.0 if dropped else 1.0
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        hidden, pooled = base.text(batch_ids.flatten(0, 1))
        hidden = hidden.view(config.batch_size, data.copies, *hidden.shape[1:])
        if pooled is not None:  # SDXL: one pooled embedding per image, the layer copies' mean
            pooled = pooled.view(config.batch_size, data.copies, -1).mean(dim=1)
        if data.copies == 1:
            hidden = hidden[:, 0]
        if recorder is not None:
            recorder.clear()
        added = added_conditions(pooled, data.resolution, data.resolution)
        pred = base.unet(noisy, t, encoder_hidden_states=hidden, **added).sample
    err = (pred.float() - target.float()) ** 2
    subject_loss = data.use_masks and config.mask_loss
    if area is not None:  # the canvas: the loss counts on the photo only (and its mask)
        loss = masked_mse(err, m if subject_loss else area)
    else:
        loss = masked_mse(err, m) if subject_loss else err.mean()
    if recorder is not None:
        sel = data.has_mask[idx.to(device)]
        if bool(sel.any()):
            b_ids = batch_ids[:, 0]
            pos1 = torch.isin(b_ids, data.word_ids[0])
            pos2 = torch.isin(b_ids, data.word_ids[1])
            maps = {i: a[sel] for i, a in recorder.maps.items()}
            if config.attention_reg_form == "squared":
                reg = attention_regularisation(maps, m[sel], pos1[sel], pos2[sel])
            else:
                full = config.attention_reg_form == "full-identity"
                reg = attention_regularisation_authors(maps, m[sel], pos1[sel], pos2[sel], full)
            loss = loss + config.attention_reg_weight * reg
    return loss


def _backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler | None,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    schedule.step()


def _freeze_if_norm_reached(rows: torch.nn.Parameter, config: TrainConfig) -> bool:
    """Freeze the embeddings once their mean L2 norm reaches the threshold (True if now)."""
    if config.embedding_norm_threshold <= 0 or not rows.requires_grad:
        return False
    if float(rows.detach().norm(dim=-1).mean()) < config.embedding_norm_threshold:
        return False
    rows.requires_grad_(False)
    rows.grad = None
    return True


def _train(
    base: BaseModel,
    photos: list[Photo],
    concept_name: str,
    class_word: str,
    config: TrainConfig,
    progress: bool,
    on_step: Callable[[int, float], None] | None,
) -> TrainResult:
    device = base.device
    resolution = config.resolution or base.default_resolution
    if resolution % base.vae_scale_factor:
        raise ValueError(f"resolution {resolution} must be a multiple of {base.vae_scale_factor}")
    num_layers = base.num_cross_attention_layers
    concept = Concept(
        concept_name,
        class_word,
        method=config.method,
        num_layers=num_layers if config.method == "edlora" else 1,
    )
    concepts = ConceptTable([concept])
    gen = torch.Generator().manual_seed(config.seed)
    embeddings0 = initial_embeddings(base, concept, generator=gen)
    ids = add_concept_tokens(base, concept)
    data = prepare_data(base, photos, concept, concepts, resolution, config)
    adapters = inject_adapters(base, config)
    gc = config.gradient_checkpointing == "on" or (
        config.gradient_checkpointing == "auto" and device.type == "cuda"
    )
    if gc:
        base.unet.enable_gradient_checkpointing()
        for encoder in base.text_encoders():
            encoder.gradient_checkpointing_enable({"use_reentrant": False})
    amp = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    use_attn_reg = data.use_masks and config.attention_reg_weight > 0
    recorder = AttentionMapRecorder() if use_attn_reg else None

    losses: list[float] = []
    frozen_at: int | None = None
    start = time.perf_counter()
    for encoder in base.text_encoders():
        encoder.train()
    base.unet.train()
    try:
        with (
            trainable_rows(base.text_encoders(), ids) as rows,
            layerwise_cross_attention(
                base.unet,
                config.kv_dropout if config.kv_dropout_mode == "features" else 0.0,
                recorder,
            ),
        ):
            with torch.no_grad():
                rows.rows.copy_(embeddings0.reshape(len(ids), -1))
            optimizer, schedule = make_optimizer(rows.rows, adapters, config)
            # a live bar on a terminal; in logs, a line every 10% instead
            bar = tqdm(
                range(config.steps),
                desc=f"tuning {concept.token}",
                disable=True if not progress else None,
            )
            log_every = max(1, config.steps // 10)
            for step in bar:
                loss = step_loss(base, data, config, gen, amp, recorder, adapters.kv_layers)
                _backward_and_step(loss, optimizer, schedule, scaler)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss became {value} at step {step}; lower the learning rates"
                    )
                losses.append(value)
                if frozen_at is None and _freeze_if_norm_reached(rows.rows, config):
                    frozen_at = step + 1
                    log.info(
                        "embedding norm reached %.2f at step %d: embeddings frozen",
                        config.embedding_norm_threshold,
                        frozen_at,
                    )
                bar.set_postfix(loss=f"{value:.4f}")
                if progress and (step + 1) % log_every == 0:
                    recent = losses[-log_every:]
                    log.info(
                        "step %d/%d loss %.4f", step + 1, config.steps, sum(recent) / len(recent)
                    )
                if on_step is not None:
                    on_step(step, value)
            trained = rows.rows.detach().clone()
    finally:
        for encoder in base.text_encoders():
            encoder.eval()
        base.unet.eval()
        if gc:
            base.unet.disable_gradient_checkpointing()
            for encoder in base.text_encoders():
                encoder.gradient_checkpointing_disable()
        for param in adapters.text_params + adapters.unet_params:
            param.requires_grad_(False)
        for layer in adapters.kv_layers:
            layer.scale = 1.0
    seconds = time.perf_counter() - start
    embeddings = trained.view(len(concept.words), data.copies, -1).float().cpu()
    tail = losses[-max(1, len(losses) // 10) :]
    package = ConceptPackage(
        concept=concept,
        rank=config.rank,
        conv_rank=config.conv_rank,
        embeddings=embeddings,
        lora={
            **{
                k: v
                for prefix, model in adapters.text_prefixes
                for k, v in lora_state_dict(model, prefix).items()
            },
            **lora_state_dict(base.unet, "unet"),
        },
        base_fingerprint=base.fingerprint,
        base_source=base.source,
        architecture=base.architecture,
        training={**config.model_dump(), "resolution": resolution, "num_photos": len(photos)},
        metrics={
            "steps": config.steps,
            "final_loss": sum(tail) / len(tail),
            "seconds": round(seconds, 3),
            "embeddings_frozen_at": frozen_at,
        },
    )
    return TrainResult(package, concepts, losses, seconds, frozen_at)
