"""Train the toy world's base model (``--base-model toy``) from a fixed seed.

    python -m mos.toyworld.train --out toyworld/weights/toy-base.safetensors

Two phases on generated data (``toyworld.world``):

1. the VAE (AutoencoderKL, 32 px -> 4x16x16 latents): L1 + MSE reconstruction and a small
   KL term; its latents' standard deviation sets ``scaling_factor``;
2. the UNet and the CLIP text encoder together, from scratch, on the cached latents
   (v-prediction on linear betas, see ``model.TOY_SCHEDULER_CONFIG``; the weight of nearly
   clean timesteps capped as in Min-SNR; 10% empty captions for classifier-free guidance;
   an EMA of the weights).

Captions vary ("a red circle on a blue background", "a photo of a red circle", "a circle",
two objects joined by "and"), so prompts such as "a photo of a <TOK>" and region prompts
make sense to the model. 30% of the single objects are two-tone (halves, a centre dot,
checker quarters, a top half; ``world.PATTERNS``), never in a personal concept's colours:
the base then knows patterns but none of the concepts, and a concept's embedding alone can
carry much of its identity (ED-LoRA at LoRA scale 0: detector score 0.03 -> 0.17,
RESULTS.md). A fifth of the (colour, shape, background) triples is held out and measured
at the end: ``toyworld.analyse`` reads held-out samples back, and two-object prompts on a
64x32 canvas are read back half by half. ``--wide F`` spends a fraction F of the UNet steps
on wide canvases with one full-size object per 32x32 part (``world.random_wide_scene``);
measured as a fine-tune of the committed base it draws such canvases right (10% -> 44%)
but concepts worse, so it is off by default (RESULTS.md, toy world).
Progress is logged; the loss curve is written as PNG beside the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mos.common.base import BaseModel, denoising_target
from mos.common.concepts import tokenize
from mos.common.images import image_grid, loss_curve

from . import world
from .analyse import analyse
from .model import (
    TOY,
    TOY_SCHEDULER_CONFIG,
    UNET_CHANNELS,
    WEIGHTS,
    build_toy_architecture,
    check_unet_channels,
    load_toy_components,
    save_toy_weights,
)

log = logging.getLogger("mos.toyworld.train")


def caption_variants(scene: world.Scene, rng: random.Random) -> str:
    """One of several phrasings of a scene's caption (attributes sometimes left out)."""
    if len(scene.things) > 1 or scene.things[0].pattern or rng.random() < 0.8:
        text = scene.caption
    else:
        t = scene.things[0]
        colour = f"{t.colour} " if rng.random() < 0.5 else ""
        text = f"{world.article(colour or t.shape)} {colour}{t.shape}"
        if rng.random() < 0.5:
            text += f" on {world.article(scene.background)} {scene.background} background"
    if rng.random() < 0.3:
        text = f"a photo of {text}"
    return text


def make_dataset(n: int, seed: int, two_object_fraction: float = 0.25, two_tone: float = 0.0):
    """``n`` images (uint8 [n, 3, 32, 32]) and their scenes, held-out triples excluded; a
    ``two_tone`` fraction of the single objects is two-tone (``world.PATTERNS``)."""
    rng = random.Random(seed)
    held = world.held_out_triples()
    scenes = [
        world.random_scene(
            rng,
            n_objects=2 if rng.random() < two_object_fraction else 1,
            exclude=held,
            two_tone=two_tone,
        )
        for _ in range(n)
    ]
    images = np.stack([np.asarray(world.render_scene(s)) for s in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)), scenes


def make_wide_dataset(n: int, seed: int, parts: int, two_tone: float = 0.0):
    """``n`` wide images (uint8 [n, 3, 32, 32 * parts]) and their scenes: mostly one object
    per part, a third of them with fewer objects (``world.random_wide_scene``)."""
    rng = random.Random(f"wide:{parts}:{seed}")
    held = world.held_out_triples()
    scenes = [
        world.random_wide_scene(
            rng,
            parts,
            n_objects=parts if rng.random() < 2 / 3 else rng.randint(1, parts - 1),
            exclude=held,
            two_tone=two_tone,
        )
        for _ in range(n)
    ]
    width = world.SIZE * parts
    images = np.stack([np.asarray(world.render_scene(s, width=width)) for s in scenes])
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), scenes


@dataclass
class Pool:
    """Training latents of one canvas shape, their captions and the batch size for them."""

    means: torch.Tensor
    stds: torch.Tensor
    scenes: list
    batch: int


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def train_vae(
    vae, images: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator
) -> list[float]:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = to_unit(images[idx]).to(vae.device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(vae.device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = (
                lr
                * min(1.0, (step + 1) / 50)
                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            )
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode", mininterval=5):
        post = vae.encode(to_unit(images[i : i + batch]).to(vae.device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def min_snr_weights(sched, gamma: float) -> torch.Tensor:
    """Loss weights per timestep that cap the weight of nearly clean timesteps at ``gamma``
    (in units of the clean-latent error), as Min-SNR-gamma does (Hang et al. 2023), without
    lowering the weight of the noisiest ones, where the prompt decides the image. For
    ``v_prediction`` the clean-latent error counts SNR + 1 times in the velocity error, so the
    weight is min(1, gamma / (SNR + 1)); for ``epsilon`` it counts SNR times: min(1, gamma / SNR).
    ``gamma <= 0`` gives equal weights."""
    ab = sched.alphas_cumprod.double()
    snr = ab / (1 - ab)
    if gamma <= 0:
        return torch.ones_like(snr).float()
    counts = snr + 1 if sched.config.prediction_type == "v_prediction" else snr
    return (gamma / counts).clamp(max=1.0).float()


def optimise(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    loss: torch.Tensor,
    step: int,
    steps: int,
    lr: float,
    warmup: int,
    ema_params: list[torch.Tensor],
    ema_decay: float,
) -> None:
    """One step of the toy trainers: gradients clipped at norm 1; the learning rate warmed up
    linearly over ``warmup`` steps, then cosine down to 10% at ``steps``; the EMA copy moved
    towards the weights (decay ramped up to ``ema_decay`` over the first steps)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    warm = min(1.0, (step + 1) / warmup)
    cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups:
        g["lr"] = lr * warm * cos
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - decay)


def track(bar, losses: list[float], loss: torch.Tensor, step: int, steps: int, every: int) -> None:
    """Keep ``loss``; its recent mean on the progress bar every ``every // 10`` steps and in
    the log every ``every`` steps."""
    losses.append(float(loss.detach()))
    if step % max(1, every // 10) == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-(every // 10) :]):.4f}")
    if step and step % every == 0:
        log.info(
            "step %d/%d: loss %.4f (mean of last %d)", step, steps, np.mean(losses[-every:]), every
        )


def train_denoiser(
    unet,
    text_encoder,
    tokenizer,
    pools: Sequence[Pool],
    captions_of: Callable[[Pool, list[int]], list[str]],
    steps: int,
    lr: float,
    gen: torch.Generator,
    ema_decay: float,
    min_snr: float = 5.0,
    wide_fraction: float = 0.0,
    seed: int = 0,
):
    """Train on ``pools[0]`` (square canvases); with ``wide_fraction`` > 0 that fraction of
    the steps takes its batch from one of the other pools (wide canvases), in turn."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(TOY_SCHEDULER_CONFIG)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    for m in (unet, text_encoder):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [
        copy.deepcopy(unet).eval().requires_grad_(False),
        copy.deepcopy(text_encoder).eval().requires_grad_(False),
    ]
    ema_params = [p for m in ema for p in m.parameters()]
    weights = min_snr_weights(sched, min_snr).to(unet.device)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="unet+text", mininterval=10)
    schedule = random.Random(f"pools:{seed}")
    wide_steps = 0
    for step in bar:
        pool = pools[0]
        if wide_fraction > 0 and schedule.random() < wide_fraction:
            pool = pools[1 + wide_steps % (len(pools) - 1)]
            wide_steps += 1
        means, stds, batch = pool.means, pool.stds, pool.batch
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        device = unet.device
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)  # scaled
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = sched.add_noise(z, noise, t).to(device)
        noise, t = noise.to(device), t.to(device)
        ids = tokenize(tokenizer, captions_of(pool, idx.tolist())).to(device)
        context = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        target = denoising_target(sched, z.to(device), noise, t)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        optimise(opt, params, loss, step, steps, lr, 200, ema_params, ema_decay)
        track(bar, losses, loss, step, steps, 1000)
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    return ema[0], ema[1], losses


def start_run(seed: int, threads: int) -> torch.Generator:
    """Logging, torch threads (0: all cores) and the seeds of a training script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def held_out_prompts(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    triples = sorted(world.held_out_triples())
    rng = random.Random(seed)
    return rng.sample(triples, min(n, len(triples)))


@torch.no_grad()
def adherence(
    base: BaseModel, n: int = 96, steps: int = 25, guidance: float = 4.0, seed: int = 0
) -> dict:
    """Sample held-out prompts; how often the analyser reads back each attribute."""
    from mos.common.pipeline import MixOfShowPipeline

    pipe = MixOfShowPipeline.from_base(base)
    triples = held_out_prompts(n)
    hits = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    images = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(triples), 32):
        chunk = triples[i : i + 32]
        prompts = [world.Scene(b, (world.Thing(c, s, 0, 0, 0),)).caption for c, s, b in chunk]
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen)
        for (c, s, b), img in zip(chunk, out, strict=True):
            r = analyse(img)
            hits["colour"] += r.colour == c
            hits["shape"] += r.shape == s
            hits["background"] += r.background == b
            hits["all"] += r.matches(c, s, b)
            images.append(img)
    return {k: v / len(triples) for k, v in hits.items()} | {"n": len(triples), "images": images}


@torch.no_grad()
def wide_adherence(
    base: BaseModel, n: int = 48, steps: int = 25, guidance: float = 4.0, seed: int = 0
) -> dict:
    """Sample "a <left object> and a <right object> on a <bg> background" on a 64x32 canvas
    (plain prompts, no regions) and read back each half: how often colour and shape of both
    objects match, in either order, and how often the background does."""
    from mos.common.pipeline import MixOfShowPipeline

    pipe = MixOfShowPipeline.from_base(base)
    rng = random.Random(f"wide-eval:{seed}")
    scenes = [world.random_wide_scene(rng, 2) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    hits = {"objects": 0, "background": 0}
    images = []
    for i in range(0, n, 16):
        chunk = scenes[i : i + 16]
        out = pipe(
            [sc.caption for sc in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            width=2 * world.SIZE,
            height=world.SIZE,
        )
        for sc, img in zip(chunk, out, strict=True):
            halves = [
                analyse(img.crop((x, 0, x + world.SIZE, world.SIZE))) for x in (0, world.SIZE)
            ]
            want = Counter((t.colour, t.shape) for t in sc.things)
            hits["objects"] += Counter((h.colour, h.shape) for h in halves) == want
            hits["background"] += all(h.background == sc.background for h in halves)
            images.append(img)
    return {k: v / n for k, v in hits.items()} | {"n": n, "images": images}


def sample_grid(images: list, cols: int = 16):
    """The samples in rows of ``cols``."""
    return image_grid([images[i : i + cols] for i in range(0, len(images), cols)], min_cell=96)


def _widths(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 64,128,128; got {value!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mos.toyworld.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=60000)
    p.add_argument(
        "--two-tone",
        type=float,
        default=0.3,
        help="fraction of two-tone single objects (world.PATTERNS)",
    )
    p.add_argument(
        "--wide",
        type=float,
        default=0.0,
        help="fraction of the UNet steps on wide canvases, one object per square part",
    )
    p.add_argument(
        "--wide-parts",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=(2, 3),
        help="canvas widths in squares, comma-separated (default 2,3)",
    )
    p.add_argument("--wide-images", type=int, default=12000, help="images per wide canvas")
    p.add_argument(
        "--init",
        type=Path,
        help="continue from these toy weights (with --vae-steps 0 the VAE and its scale stay)",
    )
    p.add_argument(
        "--unet-channels",
        type=_widths,
        default=None,
        help="UNet block widths, comma-separated (default 48,96,96; 64,128,128 is the GPU "
        "probe's); with --init, those of the init weights",
    )
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4500, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--min-snr", type=float, default=5.0, help="cap on the weight of clean timesteps (0: off)"
    )
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-prompts", type=int, default=96)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not 0.0 <= args.wide <= 1.0:
        p.error(f"--wide is a fraction of the steps, in [0, 1]; got {args.wide}")
    if args.wide > 0 and (not args.wide_parts or min(args.wide_parts) < 2):
        p.error(f"--wide-parts are canvas widths of 2 or more squares; got {args.wide_parts}")
    if args.unet_channels is not None:
        try:
            args.unet_channels = check_unet_channels(args.unet_channels)
        except ValueError as err:
            p.error(f"--unet-channels: {err}")
        if args.init:
            p.error("--unet-channels: a run with --init keeps the init weights' UNet widths")
    gen = start_run(args.seed, args.threads)
    t_start = time.time()

    log.info("drawing %d training images", args.images)
    images, scenes = make_dataset(args.images, args.seed, two_tone=args.two_tone)
    if args.init:
        tokenizer, text_encoder, unet, vae, _ = load_toy_components(args.init)
    else:
        tokenizer, text_encoder, unet, vae = build_toy_architecture(
            seed=args.seed, unet_channels=args.unet_channels or UNET_CHANNELS
        )
    device = torch.device(args.device)
    for module in (text_encoder, unet, vae):
        module.to(device)
    log.info(
        "parameters: unet %.2f M, vae %.2f M, text encoder %.2f M",
        *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, vae, text_encoder)),
    )
    t0 = time.time()
    vae_losses = train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr, gen)
    vae_s = time.time() - t0
    means, stds = encode_latents(vae, images)
    keep = args.init is not None and args.vae_steps == 0
    scaling = float(vae.config.scaling_factor) if keep else float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log.info(
        "vae: %.0f s, final loss %.4f, scaling factor %.3f",
        vae_s,
        np.mean(vae_losses[-50:]) if vae_losses else float("nan"),
        scaling,
    )
    pools = [Pool(means * scaling, stds * scaling, scenes, args.batch)]
    if args.wide > 0:
        for parts in args.wide_parts:
            log.info("drawing and encoding %d canvases %d squares wide", args.wide_images, parts)
            wide, wide_scenes = make_wide_dataset(
                args.wide_images, args.seed, parts, two_tone=args.two_tone
            )
            m, sd = encode_latents(vae, wide)
            batch = max(1, round(args.batch / parts))  # about the same pixels per step
            pools.append(Pool(m * scaling, sd * scaling, wide_scenes, batch))

    cap_rng = random.Random(args.seed + 1)

    def captions_of(pool: Pool, idx: list[int]) -> list[str]:
        return [
            "" if cap_rng.random() < 0.1 else caption_variants(pool.scenes[i], cap_rng) for i in idx
        ]

    t0 = time.time()
    ema_unet, ema_text, unet_losses = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        pools,
        captions_of,
        args.steps,
        args.lr,
        gen,
        args.ema,
        args.min_snr,
        wide_fraction=args.wide,
        seed=args.seed,
    )
    unet_s = time.time() - t0
    info = {
        "seed": args.seed,
        "images": args.images,
        "two_tone": args.two_tone,
        "wide": args.wide,
        "wide_parts": list(args.wide_parts) if args.wide > 0 else [],
        "wide_images": args.wide_images if args.wide > 0 else 0,
        "init": str(args.init) if args.init else None,
        "vae_steps": args.vae_steps,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "ema": args.ema,
        "min_snr": args.min_snr,
        "vae_lr": args.vae_lr,
        "prediction_type": TOY_SCHEDULER_CONFIG["prediction_type"],
        "unet_channels": list(unet.config.block_out_channels),
        "vae_seconds": round(vae_s),
        "unet_seconds": round(unet_s),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(float(np.mean(unet_losses[-200:])), 4),
    }
    save_toy_weights(args.out, ema_text, ema_unet, vae, info)
    curves = [[loss_curve(unet_losses, "UNet + text loss")]]
    if vae_losses:
        curves.insert(0, [loss_curve(vae_losses, "VAE loss")])
    image_grid(curves, min_cell=1).save(args.out.with_suffix(".loss.png"))
    log.info("wrote %s (%.1f MB)", args.out, args.out.stat().st_size / 1e6)

    base = BaseModel.from_components(
        tokenizer, ema_text, ema_unet, vae, TOY, dict(TOY_SCHEDULER_CONFIG)
    )
    result = adherence(base, n=args.eval_prompts)
    sample_grid(result.pop("images")).save(args.out.with_suffix(".samples.png"))
    info["held_out_adherence"] = {
        k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()
    }
    wide_result = wide_adherence(base, n=args.eval_prompts // 2)
    sample_grid(wide_result.pop("images"), cols=8).save(args.out.with_suffix(".wide.png"))
    info["wide_adherence"] = {
        k: round(v, 3) if isinstance(v, float) else v for k, v in wide_result.items()
    }
    info["total_seconds"] = round(time.time() - t_start)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("held-out prompts: %s", info["held_out_adherence"])
    log.info("two objects on a 64x32 canvas: %s", info["wide_adherence"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
