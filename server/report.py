"""Fidelity of fused models against each concept's own model (JSON, Markdown, PNG grid).

Per concept ``i`` and per fusion strategy:

- ``text_drift`` = ||h_fused - h_i||^2 / ||h_i||^2, the text encoder's output at the
  concept's token positions (every layer copy) on the fusion prompts;
- ``unet_drift`` = ||e_fused - e_i||^2 / ||e_i - e_base||^2, noise predictions on the
  concept's prompts over several timesteps and seeds (``e_base``: the base model with the
  concept's embeddings but no LoRA). 0 means the fused model predicts exactly what the
  concept model does; 1 means it is as far from it as the base is.

And per strategy ``prior_drift`` = ||e_fused - e_base||^2 / ||e_base||^2 on plain prompts
without concepts: how much fusing disturbed what the base model knew.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..common.concepts import encode_prompts, tokenize
from ..common.images import image_grid
from ..common.pipeline import MixOfShowPipeline
from .fusion import PARTS, FusionEngine, FusionResult

PLAIN_PROMPTS = ("a photo of a dog", "a red car on the street", "a cat on the beach")
TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def _noise_predictions(engine: FusionEngine, prompts: Sequence[str], seeds: int) -> torch.Tensor:
    """UNet epsilon for every (prompt, seed, timestep) with the adapters as currently set."""
    base = engine.base
    ctx = encode_prompts(
        base.text_encoder, base.tokenizer, prompts, engine.table, engine.num_layers
    )
    size = base.unet.config.sample_size
    gen = torch.Generator().manual_seed(1234)
    n = len(prompts) * seeds * len(TIMESTEPS)
    x0 = torch.randn(n, base.unet.config.in_channels, size, size, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor(TIMESTEPS).repeat(len(prompts) * seeds)
    xt = base.noise_scheduler.add_noise(x0, noise, t).to(base.device, base.unet.dtype)
    ctx = ctx.repeat_interleave(seeds * len(TIMESTEPS), dim=0).to(base.unet.dtype)
    from ..common.attention import layerwise_cross_attention

    with layerwise_cross_attention(base.unet):
        return base.unet(xt, t.to(base.device), encoder_hidden_states=ctx).sample.double()


@torch.no_grad()
def _text_at_concept(engine: FusionEngine, name: str) -> torch.Tensor:
    base = engine.base
    prompts = engine._prompts(name)
    hidden = encode_prompts(
        base.text_encoder, base.tokenizer, prompts, engine.table, engine.num_layers
    )
    ids = tokenize(base.tokenizer, [engine.table.expand(p, engine.num_layers)[0] for p in prompts])
    concept_ids = torch.tensor(
        base.tokenizer.convert_tokens_to_ids(engine.packages[name].concept.all_tokens())
    )
    positions = torch.isin(ids, concept_ids).to(hidden.device)
    return hidden.permute(0, 2, 1, 3)[positions].double()  # [positions, L, dim]


def _sq(x: torch.Tensor) -> float:
    return float((x**2).sum())


def fidelity(engine: FusionEngine, results: Sequence[FusionResult], seeds: int = 2) -> dict:
    """The drift table for every concept and strategy (see module docstring)."""
    rows = []
    for name in engine.names:
        own = engine.concept_factors(name)
        prompts = engine._prompts(name)
        engine.apply(own)
        h_own, e_own = _text_at_concept(engine, name), _noise_predictions(engine, prompts, seeds)
        engine.apply(None)
        e_base = _noise_predictions(engine, prompts, seeds)
        row = {"concept": engine.packages[name].concept.token, "source": engine.sources[name]}
        for res in results:
            engine.apply(res.factors)
            h_f, e_f = _text_at_concept(engine, name), _noise_predictions(engine, prompts, seeds)
            row[res.strategy] = {
                "text_drift": _sq(h_f - h_own) / max(_sq(h_own), 1e-30),
                "unet_drift": _sq(e_f - e_own) / max(_sq(e_own - e_base), 1e-30),
            }
        rows.append(row)
    engine.apply(None)
    e_plain = _noise_predictions(engine, PLAIN_PROMPTS, seeds)
    prior = {}
    for res in results:
        engine.apply(res.factors)
        prior[res.strategy] = _sq(_noise_predictions(engine, PLAIN_PROMPTS, seeds) - e_plain) / _sq(
            e_plain
        )
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
    pipe = MixOfShowPipeline(engine.base, engine.table)
    rows, labels = [], []
    for name in engine.names:
        token = engine.packages[name].concept.token
        prompt = engine.config.sample_prompt.format(token)
        row = []
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


__all__ = ["fidelity", "sample_grid", "markdown", "write_report", "PARTS"]
