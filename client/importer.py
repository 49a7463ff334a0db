"""``mos-import``: a LoRA someone already trained becomes a concept package for this base.

    mos-import my_dog_lora.safetensors --concept '<rex>' --trigger 'sks dog'
    mos-import pikachu.safetensors --concept '<pika>' --embedding pika-ti.safetensors

kohya / AUTOMATIC1111 files (``lora_unet_*``, ``lora_te_*``, with ``alpha``; LoCon
convolutions where this project adapts them) and diffusers / PEFT LoRAs
(``save_lora_weights``) are read (``common/lora_formats.py``). The package is a vanilla-LoRA
concept: ``<rex>`` in a prompt stands for its trigger words (no new token, no layer-wise
embedding), or, with a textual-inversion ``--embedding``, for one new token carrying it.
Gradient fusion then fuses it with ED-LoRA packages like any other.

A concept package trained on another checkpoint of the same architecture (a sibling
fine-tune of the same SD 1.x) is moved onto this base with ``--allow-other-base``: the
shapes are checked, and the package records the base it was trained on
(``training.trained_on``) beside its new fingerprint.

    mos-import dog1.safetensors --base-model ./my-finetune --allow-other-base

What the file has that a package cannot hold is refused by name: layers this project does
not adapt (``--skip-unmapped`` drops them and reports the share of the update dropped), a
shape for another base, other adapter kinds (LoHa, LoKr, DoRA). Ranks that differ per layer
are zero-padded to the largest (exact), and ``alpha / r`` is folded into the up factors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..common.base import BaseModel, BaseModelError, load_base_model
from ..common.checksum import digest
from ..common.cli import UsageError, default_class_word, run_command
from ..common.concepts import Concept, ConceptError, parse_concept_name
from ..common.lora_formats import (
    DIFFUSERS_PAIRS,
    Imported,
    LoraFormatError,
    base_layers,
    parse_lora,
    read_lora_file,
)
from ..common.package import ConceptPackage, PackageError

log = logging.getLogger("mos.import")


@dataclass
class ImportReport:
    """What an import kept and dropped (recorded in the package's ``training``)."""

    source: str
    format: str
    layers: int
    rank: int
    conv_rank: int
    padded: int  # layers whose rank was padded up to ``rank`` / ``conv_rank``
    zero_layers: int  # layers of the base the file does not adapt (zero update)
    skipped: list[str]
    skipped_share: float  # squared norm of the dropped updates over the file's total
    alpha_scales: list[float]

    def to_dict(self) -> dict:
        return {
            "imported_from": self.source,
            "format": self.format,
            "layers": self.layers,
            "padded_layers": self.padded,
            "zero_layers": self.zero_layers,
            "skipped_layers": self.skipped,
            "skipped_update_share": self.skipped_share,
            "alpha_scales": sorted(set(self.alpha_scales)),
        }


def _norm2(up: torch.Tensor, down: torch.Tensor) -> float:
    """``||up @ down||_F^2`` without forming the product."""
    u, d = up.reshape(up.shape[0], -1).double(), down.reshape(down.shape[0], -1).double()
    return float(((u.T @ u) * (d @ d.T)).sum())


def _skipped_share(tensors: dict[str, torch.Tensor], imported: Imported, names: list[str]) -> float:
    """The dropped layers' share of the file's squared update norm (kohya alphas applied;
    a diffusers file's dropped layers at scale 1)."""
    kept = sum(_norm2(up, down) for up, down in imported.factors.values())
    dropped = 0.0
    for name in names:
        suffixes = [(".lora_down.weight", ".lora_up.weight"), *DIFFUSERS_PAIRS]
        for down_key, up_key in ((name + d, name + u) for d, u in suffixes):
            if down_key in tensors and up_key in tensors:
                down = tensors[down_key].float()
                alpha = tensors.get(f"{name}.alpha")
                scale = (
                    float(alpha.float().reshape(-1)[0]) / down.shape[0]
                    if alpha is not None
                    else 1.0
                )
                dropped += scale**2 * _norm2(tensors[up_key].float(), down)
    total = kept + dropped
    return dropped / total if total > 0 else 0.0


def read_embedding(path: str | Path, dim: int) -> torch.Tensor:
    """A one-vector textual-inversion embedding ``[dim]`` from a safetensors file (A1111's
    ``emb_params``, or diffusers' ``{token: vector}``; SDXL's ``clip_l`` and ``clip_g``,
    joined as this project's SDXL embeddings are)."""
    path = Path(path)
    if path.suffix.lower() in (".pt", ".bin", ".ckpt"):
        raise UsageError(f"--embedding {path}: a pickled file; give a .safetensors embedding")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"--embedding {path}: not a readable safetensors file ({err})") from err
    if set(tensors) == {"clip_l", "clip_g"}:
        tensors = {"clip_l+clip_g": torch.cat([tensors["clip_l"], tensors["clip_g"]], dim=-1)}
    if len(tensors) != 1:
        raise UsageError(
            f"--embedding {path}: expected one embedding tensor, found {sorted(tensors)[:4]}"
        )
    ((key, vec),) = tensors.items()
    vec = vec.float()
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1:
        raise UsageError(
            f"--embedding {path}: {key} has {vec.shape[0] if vec.ndim == 2 else '?'} vectors "
            f"(shape {tuple(vec.shape)}); a concept here has one vector per word, so only "
            "one-vector embeddings are imported"
        )
    if vec.shape[0] != dim:
        raise UsageError(
            f"--embedding {path}: a {vec.shape[0]}-dim vector; this base's text encoder is "
            f"{dim}-dim (an embedding for another base model?)"
        )
    if not bool(torch.isfinite(vec).all()):
        raise UsageError(f"--embedding {path}: has NaN or infinite values")
    return vec


def import_lora(
    base: BaseModel,
    path: str | Path,
    name: str,
    trigger: str = "",
    class_word: str = "",
    embedding: torch.Tensor | None = None,
    skip_unmapped: bool = False,
) -> tuple[ConceptPackage, ImportReport]:
    """The concept package of the LoRA file at ``path`` on ``base``."""
    path = Path(path)
    tensors, meta = read_lora_file(path)
    imported = parse_lora(tensors, meta, base)
    if imported.unmapped and not skip_unmapped:
        shown = ", ".join(imported.unmapped[:3])
        raise LoraFormatError(
            f"{path}: {len(imported.unmapped)} layer(s) are not layers this project adapts "
            f"(e.g. {shown}); gradient fusion cannot fuse them. Pass --skip-unmapped to "
            "import the rest (the share of the update dropped is reported)"
        )
    if not imported.factors:
        raise LoraFormatError(f"{path}: none of its layers is a layer this project adapts")
    share = _skipped_share(tensors, imported, imported.unmapped)
    layers = base_layers(base, conv=True)
    conv_keys = [k for k in imported.factors if layers[k].conv]
    lin_keys = [k for k in imported.factors if not layers[k].conv]
    rank = max((imported.factors[k][1].shape[0] for k in lin_keys), default=1)
    conv_rank = max((imported.factors[k][1].shape[0] for k in conv_keys), default=0)
    lora: dict[str, torch.Tensor] = {}
    padded = zero = 0
    for key, layer in layers.items():
        if layer.conv and not conv_rank:
            continue
        r = conv_rank if layer.conv else rank
        up = torch.zeros(layer.out_features, r)
        down = torch.zeros(r, layer.in_flat)
        if key in imported.factors:
            u, d = imported.factors[key]
            up[:, : u.shape[1]], down[: d.shape[0]] = u, d
            padded += int(d.shape[0] != r)
        else:
            zero += 1
        if layer.conv:
            lora[f"{key}.lora_A.weight"] = down.reshape(r, *layer.down_shape)
            lora[f"{key}.lora_B.weight"] = up.reshape(layer.out_features, r, 1, 1)
        else:
            lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"] = down, up
    trigger = " ".join(trigger.split())
    if embedding is not None:
        if trigger:
            raise UsageError("give --trigger or --embedding, not both")
        concept = Concept(name, class_word or default_class_word(name), "lora", 1)
        emb = embedding.reshape(1, 1, -1).float()
    else:
        if not trigger:
            raise UsageError(
                "--trigger: the words that call up this LoRA (e.g. 'sks dog') are needed, "
                "or a textual-inversion --embedding"
            )
        words = trigger.split()
        concept = Concept(name, class_word or words[-1], "trigger", 1, trigger)
        emb = torch.zeros(0, 1, base.text_dim)
    report = ImportReport(
        source=path.name,
        format=imported.format,
        layers=len(imported.factors),
        rank=rank,
        conv_rank=conv_rank,
        padded=padded,
        zero_layers=zero,
        skipped=imported.unmapped,
        skipped_share=share,
        alpha_scales=list(imported.scales.values()),
    )
    training = {**report.to_dict(), "file_sha256": digest(tensors)}
    package = ConceptPackage(
        concept,
        rank,
        emb,
        lora,
        base.fingerprint,
        base.source,
        training,
        {},
        conv_rank,
        base.architecture,
    )
    package.check_against(base)
    return package, report


def rebase_package(
    package: ConceptPackage, base: BaseModel, allow_other_base: bool, origin: str
) -> ConceptPackage:
    """``package`` (trained on another checkpoint) as a package for ``base``."""
    if package.base_fingerprint == base.fingerprint:
        raise UsageError(f"{origin}: already a concept package for this base; nothing to import")
    if not allow_other_base:
        raise UsageError(
            f"{origin}: a concept package trained on another base "
            f"({package.base_source or package.base_fingerprint[:12]}); pass "
            "--allow-other-base to use it on this one (same architecture; the package records "
            "the base it was trained on)"
        )
    package.check_against(base, check_fingerprint=False)
    trained_on = {"fingerprint": package.base_fingerprint, "source": package.base_source}
    return ConceptPackage(
        package.concept,
        package.rank,
        package.embeddings,
        package.lora,
        base.fingerprint,
        base.source,
        {**package.training, "trained_on": trained_on},
        package.metrics,
        package.conv_rank,
        base.architecture,
    )


def _is_package(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "mix-of-show/concept"
    except (SafetensorError, OSError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-import", description=__doc__.splitlines()[0])
    p.add_argument("lora", type=Path, help="a kohya / A1111 or diffusers LoRA (.safetensors)")
    p.add_argument("--concept", help="the concept's name in prompts, e.g. '<rex>'")
    p.add_argument("--trigger", default="", help="the LoRA's trigger words, e.g. 'sks dog'")
    p.add_argument("--embedding", type=Path, help="a one-vector textual-inversion embedding")
    p.add_argument(
        "--class-word", default="", help="the class word (default: the last trigger word)"
    )
    p.add_argument("--base-model", default="tiny", help="the base the LoRA was trained for")
    p.add_argument("--base-config", default="", help="config folder for a single-file base")
    p.add_argument(
        "--skip-unmapped",
        action="store_true",
        help="drop layers this project does not adapt (reported) instead of refusing the file",
    )
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="move a concept package trained on a sibling checkpoint onto this base",
    )
    p.add_argument("--out", type=Path, help="package file (default: <name>.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def run(args: argparse.Namespace) -> Path:
    if args.lora.is_file() and _is_package(args.lora):
        package = ConceptPackage.load(args.lora)
        out = args.out or args.lora.with_name(args.lora.stem + "-rebased.safetensors")
        if out.exists() and not args.force:
            raise UsageError(f"{out} exists; pass --force to overwrite it")
        base = load_base_model(args.base_model, config=args.base_config or None)
        package = rebase_package(package, base, args.allow_other_base, str(args.lora))
        package.save(out)
        log.warning(
            "%s was trained on %s; moved onto %s (recorded in the package)",
            package.concept.token,
            package.training["trained_on"]["source"] or "another base",
            base.source,
        )
        print(json.dumps({"out": str(out), "concept": package.concept.token}))
        return out
    if not args.concept:
        raise UsageError("--concept: the name the imported LoRA gets in prompts, e.g. '<rex>'")
    name = parse_concept_name(args.concept)
    out = args.out or Path(f"{name}.safetensors")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if not args.trigger.strip() and args.embedding is None:
        raise UsageError(
            "--trigger: the words that call up this LoRA (e.g. 'sks dog') are needed, "
            "or a textual-inversion --embedding"
        )
    base = load_base_model(args.base_model, config=args.base_config or None)
    emb = read_embedding(args.embedding, base.text_dim) if args.embedding else None
    package, report = import_lora(
        base, args.lora, name, args.trigger, args.class_word, emb, args.skip_unmapped
    )
    package.save(out)
    if report.skipped:
        log.warning(
            "dropped %d layer(s) this project does not adapt, %.1f%% of the update's squared "
            "norm (e.g. %s)",
            len(report.skipped),
            100 * report.skipped_share,
            ", ".join(report.skipped[:3]),
        )
    log.info(
        "%s (%s, %d layers, rank %d%s) -> %s as %s",
        args.lora,
        report.format,
        report.layers,
        report.rank,
        f", conv rank {report.conv_rank}" if report.conv_rank else "",
        out,
        package.concept.token,
    )
    print(json.dumps({"out": str(out), "concept": package.concept.token, **report.to_dict()}))
    return out


def main(argv: list[str] | None = None) -> int:
    errors = (PackageError, BaseModelError, ConceptError)
    return run_command("mos-import", build_parser(), run, errors, argv)


if __name__ == "__main__":
    sys.exit(main())
