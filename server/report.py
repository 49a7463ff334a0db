"""Fidelity of fused models against each concept's own model (JSON, Markdown, PNG grid).

Per concept ``i`` and per fusion strategy:

- ``text_drift`` = ||h_fused - h_i||^2 / ||h_i||^2, the text encoder's output at the
  concept's token positions (every layer copy) on the fusion prompts;
- ``unet_drift`` = ||e_fused - e_i||^2 / ||e_i - e_base||^2, noise predictions on the
  concept's prompts at every step of the concept model's own sampling trajectories, two
  seeds other than fusion's (``e_base``: the base model with the concept's embeddings but
  no LoRA). 0 means the fused model predicts exactly what the
  concept model does; 1 means it is as far from it as the base is.

And per strategy ``prior_drift`` = ||e_fused - e_base||^2 / ||e_base||^2 on plain prompts
without concepts: how much fusing disturbed what the base model knew.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..common.attention import layerwise_cross_attention
from ..common.concepts import encode_text
from ..common.images import image_grid
from ..common.pipeline import MixOfShowPipeline
from ..common.text import added_conditions
from .fusion import FusionEngine, FusionResult

PLAIN_PROMPTS = ("a photo of a dog", "a red car on the street", "a cat on the beach")
EVAL_SEED = 1000  # fusion samples with seed 0; fidelity is measured on other samples


@torch.no_grad()
def trajectory(
    engine: FusionEngine, prompts: Sequence[str], seeds: int = 2, steps: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample every prompt ``seeds`` times with the adapters as set (no guidance) and return
    every UNet input visited: ``(x_t, t, prompt index)``. Seeds differ from fusion's."""
    base = engine.base
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append((sample.detach().clone(), torch.as_tensor(t).expand(sample.shape[0]).clone()))

    handle = base.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        MixOfShowPipeline.from_base(base, engine.table)(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=1.0,
            num_images_per_prompt=seeds,
            generator=torch.Generator().manual_seed(EVAL_SEED),
            output_type="latent",
        )
    finally:
        handle.remove()
    xs = torch.cat([x for x, _ in seen])
    ts = torch.cat([t for _, t in seen]).to(xs.device)
    index = torch.arange(len(prompts)).repeat_interleave(seeds).repeat(len(seen))
    return xs, ts, index


@torch.no_grad()
def noise_predictions(
    engine: FusionEngine,
    prompts: Sequence[str],
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The UNet's prediction (noise or velocity, as the scheduler says) on the given inputs,
    with the adapters as currently set."""
    base = engine.base
    xs, ts, index = inputs
    ctx, pooled = encode_text(base.text, prompts, engine.table, engine.num_layers)
    size = (xs.shape[-2] * base.vae_scale_factor, xs.shape[-1] * base.vae_scale_factor)
    out = []
    with layerwise_cross_attention(base.unet):
        for chunk in torch.arange(len(xs)).split(16):
            rows = index[chunk].to(ctx.device)
            c = ctx[rows].to(base.unet.dtype)
            p = None if pooled is None else pooled[rows].to(base.unet.dtype)
            added = added_conditions(p, *size)
            pred = base.unet(xs[chunk], ts[chunk], encoder_hidden_states=c, **added).sample
            out.append(pred.double())
    return torch.cat(out)


@torch.no_grad()
def _text_at_concept(engine: FusionEngine, name: str) -> torch.Tensor:
    hidden, positions = engine.concept_prompt_features(name, "concept")
    return hidden.permute(0, 2, 1, 3)[positions].double()  # [positions, L, dim]


def _sq(x: torch.Tensor) -> float:
    return float((x**2).sum())


def fidelity(engine: FusionEngine, results: Sequence[FusionResult], seeds: int = 2) -> dict:
    """The drift table for every concept and strategy (see module docstring).

    UNet drift is measured along the concept model's own sampling trajectories (prior
    drift along the base model's), at every step, on seeds other than fusion's.
    """
    rows: list[dict[str, Any]] = []
    for name in engine.names:
        prompts = engine.prompts_of(name)
        engine.apply(engine.concept_factors(name))
        inputs = trajectory(engine, prompts, seeds)
        h_own, e_own = _text_at_concept(engine, name), noise_predictions(engine, prompts, inputs)
        engine.apply(None)
        e_base = noise_predictions(engine, prompts, inputs)
        row: dict[str, Any] = {
            "concept": engine.packages[name].concept.token,
            "source": engine.sources[name],
        }
        for res in results:
            engine.apply(res.factors)
            h_f, e_f = _text_at_concept(engine, name), noise_predictions(engine, prompts, inputs)
            row[res.strategy] = {
                "text_drift": _sq(h_f - h_own) / max(_sq(h_own), 1e-30),
                "unet_drift": _sq(e_f - e_own) / max(_sq(e_own - e_base), 1e-30),
            }
        rows.append(row)
    engine.apply(None)
    inputs = trajectory(engine, PLAIN_PROMPTS, seeds)
    e_plain = noise_predictions(engine, PLAIN_PROMPTS, inputs)
    prior = {}
    for res in results:
        engine.apply(res.factors)
        e_f = noise_predictions(engine, PLAIN_PROMPTS, inputs)
        prior[res.strategy] = _sq(e_f - e_plain) / _sq(e_plain)
    engine.apply(None)
    mean = {
        res.strategy: {
            k: sum(r[res.strategy][k] for r in rows) / len(rows)
            for k in ("text_drift", "unet_drift")
        }
        for res in results
    }
    return {"concepts": rows, "prior_drift": prior, "mean": mean}


def sample_grid(
    engine: FusionEngine, results: Sequence[FusionResult], steps: int = 25, seed: int = 0
):
    """Rows: concepts; columns: the concept's own model, then each fused model; same seed."""
    pipe = MixOfShowPipeline.from_base(engine.base, engine.table)
    rows, labels = [], []
    for name in engine.names:
        token = engine.packages[name].concept.token
        prompt = engine.config.sample_prompt.format(token)
        row: list[Image.Image] = []
        for factors in [engine.concept_factors(name)] + [r.factors for r in results]:
            engine.apply(factors)
            row += pipe(
                prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)
            )
        rows.append(row)
        labels.append(prompt)
    engine.apply(None)
    return image_grid(rows, labels, ["concept model"] + [r.strategy for r in results])


def markdown(report: dict) -> str:
    strategies = list(report["prior_drift"])
    head = ["concept"] + [f"{m} ({s})" for m in ("text drift", "UNet drift") for s in strategies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(d: dict) -> list[str]:
        return [f"{d[s]['text_drift']:.4g}" for s in strategies] + [
            f"{d[s]['unet_drift']:.4g}" for s in strategies
        ]

    for row in report["concepts"]:
        lines.append("| " + " | ".join([row["concept"], *cells(row)]) + " |")
    lines.append("| **mean** | " + " | ".join(cells(report["mean"])) + " |")
    lines.append("")
    lines.append(
        "Prior drift on plain prompts (vs the base model): "
        + ", ".join(f"{s} {report['prior_drift'][s]:.4g}" for s in strategies)
    )
    if "objective" in report:
        lines.append("")
        lines.append(
            "Least-squares objective per stage: "
            + ", ".join(f"{k} {v:.4g}" for k, v in report["objective"].items())
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path, grid=None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fusion_report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "fusion_report.md").write_text(
        "# Fusion report\n\nDrift of each fused model from each concept's own model "
        "(0 = identical; 1 = as far as the base model). See mos.server.report.\n\n"
        + markdown(report)
    )
    if grid is not None:
        grid.save(out_dir / "fusion_report.png")
