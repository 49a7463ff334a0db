"""``mos-export``: a concept package or a fused model, for the tools people draw in.

    mos-export dog1.safetensors --format diffusers --out dog1-diffusers/
    mos-export fused/ --format kohya --out fused-kohya/
    mos-export fused/ --format single-file --out fused.safetensors

``diffusers``: ``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights`` reads
(PEFT keys, scale 1). ``kohya``: ``lora.safetensors`` with A1111 / ComfyUI key names and
``alpha`` = rank. ``single-file``: the whole model with the update merged, in the original
LDM layout (``from_single_file``, A1111, ComfyUI). A fused model's LoRA is its update over
the base: one LoRA for all its concepts, of rank the sum of theirs.

Concept tokens live in the embedding table, which none of those formats carries: each
concept that has its own token gets a textual-inversion file ``embeddings/<name>.safetensors``
(A1111's ``emb_params``; diffusers' ``load_textual_inversion(file, token='<name>')``). An
ED-LoRA concept's embeddings are per cross-attention layer, which no other tool has: the
file holds each word's mean over the layers (two vectors), and ``export_report.json`` says
so and gives the layers' spread around that mean. Imported (trigger-word) concepts need no
file: their prompt is their trigger words.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base import BaseModel, BaseModelError, load_base_model
from .cli import UsageError, run_command
from .concepts import Concept, ConceptError
from .files import atomic_write
from .fused import COMPACT_FILE, CONCEPTS_FILE, FusedModel, merge_into
from .lora import inject_lora
from .lora_formats import Factors, base_layers, package_factors, to_diffusers, to_kohya
from .package import ConceptPackage, PackageError
from .single_file import ldm_state_dict

log = logging.getLogger("mos.export")
FORMATS = ("diffusers", "kohya", "single-file")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora.safetensors"
REPORT_FILE = "export_report.json"


@dataclass
class ExportReport:
    files: list[str] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)  # concept token -> what to write
    lost: list[str] = field(default_factory=list)
    layer_spread: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "prompts": self.prompts,
            "lost": self.lost,
            "layer_spread": self.layer_spread,
        }


def collapsed_embedding(concept: Concept, embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``[words, dim]``: each word's mean over the cross-attention layers, and the layers'
    relative spread around it (``||E_l - mean|| / ||E_l||`` averaged; 0 for one layer)."""
    emb = embeddings.float()
    mean = emb.mean(dim=1)
    if emb.shape[1] == 1:
        return mean, 0.0
    spread = (emb - mean[:, None]).norm(dim=-1) / emb.norm(dim=-1).clamp_min(1e-12)
    return mean, float(spread.mean())


def write_embeddings_files(
    concepts: Sequence[Concept],
    embeddings: dict[str, torch.Tensor],
    out_dir: Path,
    report: ExportReport,
    widths: Sequence[int] = (),
) -> None:
    """One textual-inversion file per concept with its own token (see the module docstring).
    With two ``widths`` (SDXL) the file holds ``clip_l`` and ``clip_g``, each encoder's
    share of the vectors, as SDXL textual-inversion files do."""
    for c in concepts:
        if c.method == "trigger":
            report.prompts[c.token] = c.trigger
            continue
        vectors, spread = collapsed_embedding(c, embeddings[c.name])
        path = out_dir / "embeddings" / f"{c.name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(widths) == 2:
            tensors = {
                "clip_l": vectors[:, : widths[0]].contiguous(),
                "clip_g": vectors[:, widths[0] :].contiguous(),
            }
            how = (
                f"pipe.load_textual_inversion(state['clip_l'], token='{c.token}', "
                "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) and the same with "
                "state['clip_g'], pipe.text_encoder_2, pipe.tokenizer_2"
            )
        else:
            tensors = {"emb_params": vectors.contiguous()}
            how = f"pipe.load_textual_inversion('{path.name}', token='{c.token}')"
        atomic_write(path, partial(save_file, tensors))
        report.files.append(str(path))
        report.prompts[c.token] = f"{c.name} (A1111: the embedding's file name); diffusers: {how}"
        if c.layerwise:
            report.layer_spread[c.token] = spread
            report.lost.append(
                f"{c.token}: per-layer embeddings ({c.num_layers} layers x 2 words) collapsed to "
                f"each word's mean over the layers (layers' spread around it {spread:.3f}); "
                "on the toy model this loses most of a concept's identity (benchmarks/RESULTS.md): "
                "for ED-LoRA concepts the fused folder with diffusers' custom_pipeline is exact"
            )


def export_lora(
    base: BaseModel,
    factors: Factors,
    concepts: Sequence[Concept],
    embeddings: dict[str, torch.Tensor],
    out_dir: str | Path,
    fmt: str,
    dtype: torch.dtype = torch.float16,
) -> ExportReport:
    """Write ``factors`` as a LoRA file of ``fmt`` (``diffusers`` | ``kohya``) and the
    concepts' textual-inversion files into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = base_layers(base, conv=True)
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise PackageError(f"layers {unknown[:2]} are not layers of this base")
    if fmt == "diffusers":
        tensors, name = to_diffusers(factors, layers, dtype), DIFFUSERS_FILE
    elif fmt == "kohya":
        tensors, name = to_kohya(factors, layers, dtype), KOHYA_FILE
    else:
        raise UsageError(f"--format {fmt!r}: a LoRA export is diffusers or kohya")
    meta = {"format": "pt", "mix_of_show_concepts": json.dumps([c.token for c in concepts])}
    path = out_dir / name
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    report = ExportReport(files=[str(path)])
    if dtype != torch.float32:
        report.lost.append(f"factors rounded to {str(dtype).removeprefix('torch.')}")
    widths = [int(m.config.hidden_size) for m in base.text_encoders()]
    write_embeddings_files(concepts, embeddings, out_dir, report, widths)
    _write_report(out_dir / REPORT_FILE, report)
    return report


def base_vocab_size(base: BaseModel, concepts: Sequence[Concept]) -> int:
    """The tokenizer's size without the concepts' tokens (appended last)."""
    return len(base.tokenizer) - sum(len(c.all_tokens()) for c in concepts)


def export_single_file(
    merged: BaseModel,
    concepts: Sequence[Concept],
    embeddings: dict[str, torch.Tensor],
    path: str | Path,
) -> ExportReport:
    """``merged`` (update already in the weights) as one LDM-layout checkpoint at ``path``;
    the concept tokens' rows leave the embedding table for textual-inversion files beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: a single-file checkpoint is written as .safetensors")
    xl = merged.architecture == "sdxl"
    if not xl and merged.unet.config.get("use_linear_projection"):
        raise UsageError(
            "this base is SD 2.x-shaped (linear projections, OpenCLIP text encoder): its "
            "single-file layout (cond_stage_model.model.*) is not written here; use the "
            "diffusers folder or a LoRA export (--format diffusers / kohya)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = base_vocab_size(merged, concepts)
    state = ldm_state_dict(merged)
    keys = (
        [
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.token_embedding.weight",
        ]
        if xl
        else ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    )
    for key in keys:
        state[key] = state[key][:vocab]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    report = ExportReport(files=[str(path)])
    side = path.with_name(path.stem + "-embeddings")
    widths = [int(m.config.hidden_size) for m in merged.text_encoders()]
    write_embeddings_files(concepts, embeddings, side, report, widths)
    _write_report(path.with_name(path.stem + "-" + REPORT_FILE), report)
    return report


def _write_report(path: Path, report: ExportReport) -> None:
    text = json.dumps(report.to_dict(), indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# --- the command ------------------------------------------------------------------------


def _open(
    source: Path, base_model: str, base_config: str
) -> tuple[BaseModel, Factors, list[Concept], dict[str, torch.Tensor], bool]:
    """``(base, factors, concepts, embeddings, merged)`` of a package, a fused folder or a
    compact fused file; ``merged``: the base's weights already carry the update."""
    if source.is_dir():
        if not (source / CONCEPTS_FILE).is_file() or not (source / COMPACT_FILE).is_file():
            raise UsageError(
                f"{source}: not a fused model folder (no {CONCEPTS_FILE} / {COMPACT_FILE})"
            )
        fused = FusedModel.load_compact(source / COMPACT_FILE)
        base = load_base_model(source)
        return base, fused.factors, fused.concepts, fused.embeddings, True
    if not source.is_file():
        raise UsageError(f"{source}: no such package, fused folder or fused file")
    base = load_base_model(base_model, config=base_config or None)
    try:
        package = ConceptPackage.load(source)
    except PackageError as package_error:
        try:
            fused = FusedModel.load_compact(source)
        except PackageError:
            raise package_error from None
        return base, fused.factors, fused.concepts, fused.embeddings, False
    package.check_against(base)
    factors = package_factors(package.lora)
    return base, factors, [package.concept], {package.concept.name: package.embeddings}, False


def _merge(base: BaseModel, factors: Factors) -> None:
    """Put ``factors`` into ``base``'s weights."""
    for prefix, model, targets in base.lora_components(conv=True):
        for name, layer in inject_lora(model, targets, rank=1).items():
            key = f"{prefix}.{name}"
            if key in factors:
                up, down = factors[key]
                layer.set_factors(up.float(), down.float())
            else:
                layer.set_factors(None, None)
    merge_into(base)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-export", description=__doc__.splitlines()[0])
    p.add_argument(
        "source", type=Path, help="a concept package, a fused folder or fused.safetensors"
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="folder (LoRA) or .safetensors file")
    p.add_argument("--base-model", default="tiny", help="the base of a package / compact file")
    p.add_argument("--base-config", default="", help="config folder for a single-file base")
    p.add_argument("--fp32", action="store_true", help="LoRA factors in fp32 (default fp16)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    return p


def run(args: argparse.Namespace) -> ExportReport:
    out: Path = args.out
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    base, factors, concepts, embeddings, merged = _open(
        args.source, args.base_model, args.base_config
    )
    if args.format == "single-file":
        if not merged:
            from .edlora import add_concept_tokens

            for c in concepts:
                add_concept_tokens(base, c)
            _merge(base, factors)
        report = export_single_file(base, concepts, embeddings, out)
    else:
        dtype = torch.float32 if args.fp32 else torch.float16
        report = export_lora(base, factors, concepts, embeddings, out, args.format, dtype)
    for line in report.lost:
        log.warning("not carried over: %s", line)
    log.info("wrote %s", ", ".join(report.files))
    print(json.dumps(report.to_dict(), indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    errors = (PackageError, BaseModelError, ConceptError)
    return run_command("mos-export", build_parser(), run, errors, argv)


if __name__ == "__main__":
    sys.exit(main())
