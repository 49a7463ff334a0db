"""Train the toy world's sketch T2I-Adapter on the committed toy base (which stays frozen).

    python -m mos.toyworld.train_adapter --out toyworld/weights/toy-sketch-adapter

The spatial condition of regional sampling (docs/method.md, section 3) on the toy world: a
diffusers ``T2IAdapter`` that reads a sketch (``world.sketch_of``: the lines where an
image's colour changes, as sketch adapters are trained on edge maps of their images) and
adds one feature map per UNet level to the down blocks' outputs. Training pairs are the base
world's scenes and their sketches: square canvases with one or two objects and wide ones
with one object per 32x32 part (``world.random_wide_scene``), so that a sketch with an
object in each box asks the base for what it was never trained to draw on its own. The
base model (UNet, text encoder, VAE) is frozen: concepts tuned on it are unchanged and the
adapter is a plug-in (``mos-sample --adapter toyworld/weights/toy-sketch-adapter
--adapter-image sketch.png``).

Timesteps are drawn with the cubic schedule of the T2I-Adapter paper (Mou et al. 2023),
which favours the noisy steps where the layout is decided; the loss is the base's
(v-prediction, Min-SNR weights), empty captions 10% of the time as for classifier-free
guidance (the pipeline adds the adapter's features to both halves of the guidance batch).
At the end it measures, with and without the adapter, how often samples of held-out single
prompts and of two-object prompts on a 64x32 canvas are read back right, and how much of
the condition's sketch the samples' own sketches cover.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, T2IAdapter
from PIL import Image
from tqdm import tqdm

from mos.common.adapters import AdapterCondition, load_adapter
from mos.common.base import TOY, BaseModel, denoising_target
from mos.common.concepts import tokenize
from mos.common.images import image_grid, loss_curve
from mos.common.pipeline import MixOfShowPipeline

from . import world
from .analyse import analyse
from .model import TOY_SCHEDULER_CONFIG, WEIGHTS, load_toy_components
from .train import (
    Pool,
    caption_variants,
    encode_latents,
    make_dataset,
    make_wide_dataset,
    min_snr_weights,
    optimise,
    start_run,
    track,
)

log = logging.getLogger("mos.toyworld.train_adapter")

ADAPTER = WEIGHTS.parent / "toy-sketch-adapter"


def build_sketch_adapter(unet_channels: Sequence[int], vae_factor: int = 2) -> T2IAdapter:
    """An untrained one-channel (sketch) full T2I-Adapter for a UNet with these channels."""
    return T2IAdapter(
        in_channels=1,
        channels=list(unet_channels),
        num_res_blocks=2,
        downscale_factor=vae_factor,
        adapter_type="full_adapter",
    )


@dataclass
class SketchPool(Pool):
    """A training pool (``train.Pool``) with the sketch of every image."""

    sketches: torch.Tensor | None = None  # float [n, 1, H, W] in {0, 1}


def cubic_timesteps(n: int, num_train: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` timesteps t = (1 - u^3) T, u uniform: most of them noisy (T2I-Adapter's schedule)."""
    u = torch.rand(n, generator=gen)
    return ((1 - u**3) * num_train).long().clamp(0, num_train - 1)


def train_adapter(
    adapter: T2IAdapter,
    unet,
    text_encoder,
    tokenizer,
    pools: Sequence[SketchPool],
    fractions: Sequence[float],
    steps: int,
    lr: float,
    gen: torch.Generator,
    ema_decay: float = 0.999,
    min_snr: float = 5.0,
    seed: int = 0,
) -> tuple[T2IAdapter, list[float]]:
    """Train ``adapter`` against the frozen ``unet`` and ``text_encoder``; each step draws
    its batch from pool i with probability ``fractions[i]``. Returns the EMA adapter."""
    sched = DDPMScheduler.from_config(TOY_SCHEDULER_CONFIG)
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    adapter.train().requires_grad_(True)
    params = list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = copy.deepcopy(adapter).eval().requires_grad_(False)
    ema_params = list(ema.parameters())
    weights = min_snr_weights(sched, min_snr).to(unet.device)
    rng = random.Random(f"adapter:{seed}")
    device = unet.device
    losses: list[float] = []
    bar = tqdm(range(steps), desc="sketch adapter", mininterval=10)
    for step in bar:
        pool = rng.choices(pools, weights=fractions)[0]
        idx = torch.randint(0, len(pool.means), (pool.batch,), generator=gen)
        z = pool.means[idx] + pool.stds[idx] * torch.randn(pool.means[idx].shape, generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        t = cubic_timesteps(pool.batch, sched.config.num_train_timesteps, gen)
        noisy = sched.add_noise(z, noise, t).to(device)
        noise, t = noise.to(device), t.to(device)
        captions = [
            "" if rng.random() < 0.1 else caption_variants(pool.scenes[i], rng)
            for i in idx.tolist()
        ]
        with torch.no_grad():
            context = text_encoder(tokenize(tokenizer, captions).to(device))[0]
        assert pool.sketches is not None  # every adapter pool has its sketches
        features = adapter(pool.sketches[idx].to(device))
        pred = unet(
            noisy, t, encoder_hidden_states=context, down_intrablock_additional_residuals=features
        ).sample
        target = denoising_target(sched, z.to(device), noise, t)
        loss = ((pred - target).pow(2).mean(dim=(1, 2, 3)) * weights[t]).mean()
        optimise(opt, params, loss, step, steps, lr, 100, ema_params, ema_decay)
        track(bar, losses, loss, step, steps, 500)
    adapter.eval().requires_grad_(False)
    return ema, losses


def sketch_cover(sample_sketch: torch.Tensor, condition: torch.Tensor) -> float:
    """Fraction of the condition's line pixels with a line of the sample within one pixel
    (both ``[1, H, W]`` in {0, 1}); 1.0 for an empty condition."""
    near = F.max_pool2d(sample_sketch[None], 3, stride=1, padding=1)[0]
    lines = condition.sum()
    return 1.0 if lines == 0 else float((near * condition).sum() / lines)


def _lines(sketch) -> torch.Tensor:
    """A sketch image as a ``[1, H, W]`` tensor in {0, 1}."""
    return torch.from_numpy(np.asarray(sketch, dtype=np.float32) / 255.0)[None]


@torch.no_grad()
def sketch_eval(
    base: BaseModel,
    adapter: T2IAdapter | None,
    n: int = 48,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
) -> dict:
    """Sample held-out single prompts (32x32) and two-object prompts (64x32), each with the
    sketch of a scene that fits it (or no adapter): how often the analyser reads the prompt
    back (the wide canvas half by half) and how much of the sketch the samples draw."""
    pipe = MixOfShowPipeline.from_base(base)
    rng = random.Random(f"sketch-eval:{seed}")
    held = sorted(world.held_out_triples())
    single = []
    for c, s, b in rng.sample(held, min(n, len(held))):
        r = rng.uniform(6, 11)
        thing = world.Thing(c, s, rng.uniform(r, world.SIZE - r), rng.uniform(r, world.SIZE - r), r)
        single.append(world.Scene(b, (thing,)))
    wide = [world.random_wide_scene(rng, 2) for _ in range(n)]
    out: dict = {}
    grids = []
    for kind, scenes, width in (("single", single, world.SIZE), ("wide", wide, 2 * world.SIZE)):
        gen = torch.Generator().manual_seed(seed)
        hits = cover = 0.0
        images = []
        for sc in scenes:
            cond = world.sketch_of(world.render_scene(sc, width=width))
            adapters = () if adapter is None else (AdapterCondition(adapter, cond),)
            img = pipe(
                sc.caption,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gen,
                width=width,
                height=world.SIZE,
                adapters=adapters,
            )[0]
            assert isinstance(img, Image.Image)
            images.append(img)
            cover += sketch_cover(_lines(world.sketch_of(img)), _lines(cond))
            if kind == "single":
                t = sc.things[0]
                hits += analyse(img).matches(t.colour, t.shape, sc.background)
            else:
                halves = [
                    analyse(img.crop((x, 0, x + world.SIZE, world.SIZE))) for x in (0, world.SIZE)
                ]
                want = Counter((t.colour, t.shape) for t in sc.things)
                hits += Counter((h.colour, h.shape) for h in halves) == want
        out[kind] = {
            "read_back": round(hits / len(scenes), 3),
            "sketch_cover": round(cover / len(scenes), 3),
        }
        grids.append(images)
    out["n"] = n
    out["images"] = grids
    return out


def write_eval(base: BaseModel, adapter: T2IAdapter, n: int, out: Path, info: dict) -> None:
    """``sketch_eval`` without and with ``adapter`` into ``info``; the first 8 samples of
    each as ``samples-single.png`` and ``samples-wide.png`` (rows: without, with)."""
    grids: dict[str, list] = {"single": [], "wide": []}
    for label, a in (("without_adapter", None), ("with_sketch_adapter", adapter)):
        result = sketch_eval(base, a, n=n)
        for kind, images in zip(("single", "wide"), result.pop("images"), strict=True):
            grids[kind].append(images[:8])
        info[label] = result
        log.info("%s: %s", label.replace("_", " "), result)
    for kind, rows in grids.items():
        image_grid(rows, ["without", "with sketch"], min_cell=96).save(out / f"samples-{kind}.png")


def load_sketch_adapter(path: Path = ADAPTER) -> T2IAdapter:
    """The committed toy sketch adapter (a diffusers ``T2IAdapter`` folder)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: the toy sketch adapter is missing; train it with "
            "`python -m mos.toyworld.train_adapter` (see benchmarks/README.md)"
        )
    return load_adapter(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mos.toyworld.train_adapter", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=ADAPTER, help="the adapter's folder")
    p.add_argument("--base", type=Path, default=WEIGHTS, help="the frozen toy base's weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=24000, help="square training canvases")
    p.add_argument("--wide-images", type=int, default=8000, help="canvases per wide shape")
    p.add_argument("--wide", type=float, default=0.5, help="fraction of the steps on wide canvases")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--eval-prompts", type=int, default=48)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not 0.0 <= args.wide < 1.0:
        p.error(f"--wide is a fraction of the steps, in [0, 1); got {args.wide}")
    if args.steps < 1 or args.images < 1 or args.wide_images < 1:
        p.error("--steps, --images and --wide-images must be at least 1")
    gen = start_run(args.seed, args.threads)
    t_start = time.time()

    tokenizer, text_encoder, unet, vae, base_info = load_toy_components(args.base)
    device = torch.device(args.device)
    for module in (text_encoder, unet, vae):
        module.to(device)
    scaling = float(vae.config.scaling_factor)
    pools: list[SketchPool] = []
    log.info("drawing and encoding %d square canvases", args.images)
    two_tone = base_info.get("two_tone", 0.3)  # the base's own world
    images, scenes = make_dataset(args.images, args.seed + 100, two_tone=two_tone)
    m, sd = encode_latents(vae, images)
    pools.append(
        SketchPool(m * scaling, sd * scaling, scenes, args.batch, world.sketch_tensor(images))
    )
    for parts in (2, 3):
        log.info("drawing and encoding %d canvases %d squares wide", args.wide_images, parts)
        wide, wide_scenes = make_wide_dataset(
            args.wide_images, args.seed + 100, parts, two_tone=two_tone
        )
        m, sd = encode_latents(vae, wide)
        batch = max(1, round(args.batch / parts))
        pools.append(
            SketchPool(m * scaling, sd * scaling, wide_scenes, batch, world.sketch_tensor(wide))
        )
    del images

    adapter = build_sketch_adapter(unet.config.block_out_channels).to(device)
    log.info("adapter parameters: %.2f M", sum(q.numel() for q in adapter.parameters()) / 1e6)
    t0 = time.time()
    fractions = [1 - args.wide, args.wide / 2, args.wide / 2]
    ema, losses = train_adapter(
        adapter,
        unet,
        text_encoder,
        tokenizer,
        pools,
        fractions,
        args.steps,
        args.lr,
        gen,
        args.ema,
        seed=args.seed,
    )
    train_s = time.time() - t0
    ema = ema.to("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(args.out, safe_serialization=True)
    image_grid([[loss_curve(losses, "sketch adapter loss")]], min_cell=1).save(
        args.out / "loss.png"
    )
    log.info("wrote %s", args.out)

    for module in (text_encoder, unet, vae):
        module.to("cpu")
    base = BaseModel.from_components(
        tokenizer, text_encoder, unet, vae, TOY, dict(TOY_SCHEDULER_CONFIG)
    )
    info = {
        "base": args.base.name,
        "base_sha256": hashlib.sha256(args.base.read_bytes()).hexdigest(),
        "seed": args.seed,
        "images": args.images,
        "wide_images": args.wide_images,
        "wide": args.wide,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "ema": args.ema,
        "train_seconds": round(train_s),
        "torch_threads": torch.get_num_threads(),
        "final_loss": round(float(np.mean(losses[-100:])), 4),
    }
    write_eval(base, ema, args.eval_prompts, args.out, info)
    info["total_seconds"] = round(time.time() - t_start)
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
