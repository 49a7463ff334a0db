"""ED-LoRA vs vanilla LoRA: training steps/s and peak memory, same model, same batch, one run.

    python benchmarks/bench_edlora.py --model tiny                       # CPU, seconds
    python benchmarks/bench_edlora.py --model sd15 --resolution 512 --batch-size 2 --steps 60

``sd15`` is Stable Diffusion 1.5's architecture (UNet 860M, VAE, CLIP ViT-L/14 text encoder)
with random weights: speed and memory do not depend on the values, and no weights can be
downloaded here. Each method runs in its own subprocess so peak memory (CUDA's
``max_memory_allocated`` on GPU, the process's max RSS on CPU) is its own. Results are
printed as a Markdown table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def sd15_base():
    """A base model with SD 1.5's shapes and random weights (our tokenizer, CLIP-L widths)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mos.common.base import BaseModel
    from mos.common.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    return BaseModel.from_components(tok, te, unet, vae, "sd15-shaped random weights")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.machine()


def run_one(args: argparse.Namespace) -> dict:
    """Train one method and measure it (runs inside the child process)."""
    from mos.client.data import load_photo_folder
    from mos.client.trainer import train_concept
    from mos.common.base import build_tiny
    from mos.common.config import TrainConfig
    from mos.toyworld.demo import write_demo_photos

    device = torch.device(args.device)
    base = build_tiny() if args.model == "tiny" else sd15_base()
    base.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_photos(Path(tmp), count=5, size=max(96, args.resolution))
        photos = load_photo_folder(tmp)
    config = TrainConfig(
        method=args.method_only,
        steps=args.steps,
        batch_size=args.batch_size,
        resolution=args.resolution,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.checkpointing,
    )
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_concept(
        base,
        photos,
        "bench1",
        "dog",
        config,
        progress=False,
        on_step=lambda step, loss: stamps.append(time.perf_counter()),
    )
    total = time.perf_counter() - start
    warm = min(args.warmup, len(stamps) - 2)
    steps_per_s = (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "CUDA max_memory_allocated"
        name = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        peak_kind = "process max RSS"
        name = _cpu_name()
    return {
        "method": args.method_only,
        "model": args.model,
        "device": name,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": warm,
        "steps_per_s": steps_per_s,
        "total_s": total,
        "peak_gib": peak,
        "peak_kind": peak_kind,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    p.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--out", type=Path, help="JSON file for the results")
    p.add_argument("--method-only", choices=("edlora", "lora"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.resolution is None:
        args.resolution = 32 if args.model == "tiny" else 512
    if args.method_only:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for method in ("edlora", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method-only", method]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ed, lo = rows
    print(
        f"\n{ed['model']} at {ed['resolution']} px, batch {ed['batch_size']}, {ed['steps']} steps "
        f"({ed['warmup']} warm-up), on {ed['device']} (torch {ed['torch']}, {ed['threads']} threads)\n"
    )
    print("| method | steps/s | peak memory (GiB) | whole run (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['steps_per_s']:.2f} | {r['peak_gib']:.2f} | {r['total_s']:.1f} |"
        )
    print(
        f"| ED-LoRA / LoRA | {ed['steps_per_s'] / lo['steps_per_s']:.2f}x | "
        f"{ed['peak_gib'] / lo['peak_gib']:.2f}x | |"
    )
    print(f"\npeak memory is {ed['peak_kind']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    random.seed(0)
    main()
