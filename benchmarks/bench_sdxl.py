"""SDXL against SD 1.5 by the layer widths: package size, fused-model size, Gram memory.

    python benchmarks/bench_sdxl.py                    # seconds, CPU, no weights
    python benchmarks/bench_sdxl.py --ranks 4 16 --conv-rank 16

The standard architectures are built on PyTorch's ``meta`` device (shapes, no memory), with
this project's LoRA targets and fusion groups: for each base, the cross-attention layers
(the layer-wise embeddings per word), the bytes of a concept package at each rank (fp32
LoRA factors plus embeddings, as ``mos-client`` writes them), and the memory of the Gram
statistics gradient fusion keeps per stage (one ``d x d`` matrix per group of target layers
that read the same input, float64 as the default ``--gram-dtype``, float32 halves it; with
``--conv-rank`` the LoCon convolutions' im2col Gram matrices join the spatial stage), plus
the fp16 weights of the models that run while fusing. The Gram statistics do not grow with
the image size or the number of concepts (they are summed as features stream through); at
1024 px the sampled activations of stage 4 pass through without being kept.

Writes ``--out``/sdxl.json and sdxl.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mos.common.base import (
    SD_SCHEDULER_CONFIG,
    BaseModel,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
)
from mos.common.config import FusionConfig
from mos.common.package import expected_lora_shapes
from mos.common.tokenizer import build_tiny_tokenizer
from mos.server.fusion import FusionEngine

VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)  # fmt: skip
SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(  # stable-diffusion-xl-base-1.0's unet/config.json
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _clip(cls, config: dict, vocab: int):
    return cls(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, **config))


def shaped_base(kind: str, device: str = "meta") -> BaseModel:
    """SD 1.5 or SDXL with the standard widths, on the meta device (no weights), or on
    ``device`` with random weights (``bench_fusion.py --model sdxl``)."""
    tok = build_tiny_tokenizer()
    sched = SD_SCHEDULER_CONFIG
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        vae = AutoencoderKL(**VAE)
        if kind == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET)
            te, te2, tok2 = _clip(CLIPTextModel, CLIP_L, 49408), None, None
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            te = _clip(CLIPTextModel, CLIP_L, 49408)
            te2, tok2 = _clip(CLIPTextModelWithProjection, CLIP_BIGG, 49408), build_tiny_tokenizer()
            tok2.pad_token = "!"  # as SDXL's second tokenizer
    for module in (unet, vae, te, te2):
        if module is not None:
            module.eval().requires_grad_(False)
    return BaseModel(
        tokenizer=tok,
        text_encoder=te,
        unet=unet,
        vae=vae,
        noise_scheduler=DDPMScheduler.from_config(sched),
        scheduler=DPMSolverMultistepScheduler.from_config(sched),
        source=f"{kind}-shaped ({'meta' if device == 'meta' else 'random weights'})",
        fingerprint="shapes only" if device == "meta" else f"random {kind}-shaped",
        tokenizer_2=tok2,
        text_encoder_2=te2,
    )


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(kind: str, ranks: list[int], conv_rank: int) -> dict:
    base = shaped_base(kind)
    layers = base.num_cross_attention_layers
    words = 2  # ED-LoRA
    emb_bytes = words * layers * base.text_dim * 4
    packages = {}
    for rank in ranks:
        shapes = expected_lora_shapes(base, rank)
        lora = sum(torch.Size(s).numel() for s in shapes.values()) * 4
        packages[str(rank)] = {"lora_bytes": lora, "total_bytes": lora + emb_bytes}
    if conv_rank:
        shapes = expected_lora_shapes(base, ranks[0], conv_rank)
        packages[f"{ranks[0]} + conv {conv_rank}"] = {
            "total_bytes": sum(torch.Size(s).numel() for s in shapes.values()) * 4 + emb_bytes
        }
    engine = FusionEngine(base, [], FusionConfig())
    if conv_rank:
        engine._add_conv_layers()
    grams: dict[str, dict[str, int]] = {}
    for group in engine.groups.values():
        layer = engine.layers[group.targets[0]]
        d = int(layer.in_features)
        row = grams.setdefault(group.part, {"groups": 0, "float64_bytes": 0})
        row["groups"] += 1
        row["float64_bytes"] += d * d * 8
    weights = {
        "unet": _numel(base.unet) * 2,
        "text_encoders": sum(_numel(m) for m in base.text_encoders()) * 2,
        "vae": _numel(base.vae) * 2,
    }
    return {
        "cross_attention_layers": layers,
        "text_dim": base.text_dim,
        "lora_targets": len(engine.layers),
        "embedding_bytes": emb_bytes,
        "packages": packages,
        "gram": grams,
        "gram_total_float64_bytes": sum(r["float64_bytes"] for r in grams.values()),
        "fp16_weight_bytes": weights,
        "native_px": int(base.unet.config.sample_size) * 8,
    }


def markdown(r: dict) -> str:
    mb = 1024**2
    kinds = list(r["bases"])
    lines = ["| | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r["bases"][k]) for k in kinds) + " |")

    row("native size", lambda b: f"{b['native_px']} px")
    row("cross-attention layers (embeddings per word)", lambda b: str(b["cross_attention_layers"]))
    row("text encoding width", lambda b: str(b["text_dim"]))
    row("LoRA target layers", lambda b: str(b["lora_targets"]))
    row("layer-wise embeddings (2 words, fp32)", lambda b: f"{b['embedding_bytes'] / mb:.2f} MB")
    for key in r["bases"][kinds[0]]["packages"]:
        row(
            f"concept package, rank {key}",
            lambda b, key=key: f"{b['packages'][key]['total_bytes'] / mb:.1f} MB",
        )
    for part in ("text", "kv", "spatial"):
        row(
            f"Gram statistics, {part} stage (float64)",
            lambda b, part=part: (
                f"{b['gram'][part]['float64_bytes'] / mb:.0f} MB ({b['gram'][part]['groups']} groups)"
            ),
        )
    row("Gram statistics, all (float64)", lambda b: f"{b['gram_total_float64_bytes'] / mb:.0f} MB")
    row(
        "fp16 weights: UNet / text encoders / VAE",
        lambda b: " / ".join(f"{v / 1024**3:.2f} GB" for v in b["fp16_weight_bytes"].values()),
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--conv-rank", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sdxl"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "ranks": args.ranks,
        "conv_rank": args.conv_rank,
        "bases": {kind: measure(kind, args.ranks, args.conv_rank) for kind in ("sd15", "sdxl")},
    }
    (args.out / "sdxl.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "sdxl.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
