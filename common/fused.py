"""Fused models: the compact form the federation sends, and a diffusers folder.

Compact form (``fused.safetensors``): the base fingerprint, every concept's embeddings, and
for each LoRA-target layer the fused update as an exact factorisation
``<key>.lora_B.weight`` ``[out, R]`` @ ``<key>.lora_A.weight`` ``[R, in]`` with
``R = sum of the concept ranks`` (no truncation). UNet convolution adapters (LoCon) are
stored the same way, flattened: ``lora_A`` ``[R, in * kh * kw]``; a file with them is format
version 2, which older builds refuse. ``FusedModel.attach(base)`` loads it onto the base it
was made for.

Folder form (``mos-fuse --out DIR``): an ordinary diffusers Stable Diffusion folder with the
update merged into the weights and every concept token in the tokenizer, plus
``concepts.json`` (the concept table), ``fused.safetensors`` and the fusion report.
``load_fused_folder(DIR)`` returns the model and its concept table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .base import BaseModel, load_base_model
from .concepts import Concept, ConceptError, ConceptTable
from .edlora import add_concept_tokens, write_embeddings
from .files import atomic_write
from .lora import (
    EARLIER_CONV_LAYOUT,
    UNET_CONV_TARGETS,
    earlier_conv_layout,
    inject_lora,
    remove_lora,
    target_layer_names,
)
from .package import ConceptPackage, PackageError
from .safecheck import HeaderError, check_header

FUSED_FORMAT = "mix-of-show/fused"
FUSED_VERSION = 1
FUSED_CONV_VERSION = 2  # with UNet convolution adapters
CONCEPTS_FILE = "concepts.json"
COMPACT_FILE = "fused.safetensors"
PIPELINE_FILE = "mix_of_show.py"  # diffusers' custom_pipeline="mix_of_show"
PIPELINE_SOURCE = (
    '"""Mix-of-Show\'s pipeline for diffusers\' custom_pipeline (pip install mix-of-show-flower)."""\n'
    "\n"
    "from mos.common.pipeline import MixOfShowPipeline\n"
    "\n"
    '__all__ = ["MixOfShowPipeline"]\n'
)
# exact-rank factors grow linearly with the concepts: SD 1.5 fp32 is ~4.5 MB per concept
MAX_FUSED_BYTES = 4 * 1024**3


@dataclass
class FusedModel:
    strategy: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    concepts: list[Concept]
    embeddings: dict[str, torch.Tensor]
    base_fingerprint: str
    base_source: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_packages(
        cls,
        strategy: str,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        packages: list[ConceptPackage],
        sources: dict[str, str] | None = None,
    ) -> FusedModel:
        first = packages[0]
        return cls(
            strategy=strategy,
            factors=factors,
            concepts=[p.concept for p in packages],
            embeddings={p.concept.name: p.embeddings for p in packages},
            base_fingerprint=first.base_fingerprint,
            base_source=first.base_source,
            sources=dict(sources or {}),
        )

    def has_conv(self) -> bool:
        """Whether the fused update touches the UNet's up-block ResNet convolutions (LoCon)."""
        return any(
            ".resnets." in k and k.rsplit(".", 1)[-1] in UNET_CONV_TARGETS for k in self.factors
        )

    def version(self) -> int:
        return FUSED_CONV_VERSION if self.has_conv() else FUSED_VERSION

    def table_json(self) -> dict:
        return {
            "format": FUSED_FORMAT,
            "format_version": self.version(),
            "strategy": self.strategy,
            "base_fingerprint": self.base_fingerprint,
            "base_source": self.base_source,
            "concepts": [
                {**c.to_dict(), "source": self.sources.get(c.name, "")} for c in self.concepts
            ],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The compact form's tensors: fp32 factors and embeddings, on the CPU."""
        tensors: dict[str, torch.Tensor] = {}
        for key, (up, down) in self.factors.items():
            tensors[f"{key}.lora_B.weight"] = up.detach().float().cpu().contiguous()
            tensors[f"{key}.lora_A.weight"] = down.detach().float().cpu().contiguous()
        for name, emb in self.embeddings.items():
            tensors[f"embeddings.{name}"] = emb.detach().float().cpu().contiguous()
        return tensors

    def save_compact(self, path: str | Path) -> Path:
        """Write the compact form atomically (fp32 factors and embeddings)."""
        path = Path(path)
        tensors = self.tensors()
        meta = {
            "format": FUSED_FORMAT,
            "format_version": str(self.version()),
            "table": json.dumps(self.table_json()),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    @classmethod
    def load_compact(cls, path: str | Path, max_bytes: int = MAX_FUSED_BYTES) -> FusedModel:
        path = Path(path)
        try:
            check_header(path, max_bytes=max_bytes)
        except (HeaderError, OSError) as err:
            raise PackageError(f"{path}: not a readable fused model ({err})") from err
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise PackageError(f"{path}: not a readable fused model ({err})") from err
        versions = (str(FUSED_VERSION), str(FUSED_CONV_VERSION))
        if meta.get("format") != FUSED_FORMAT or meta.get("format_version") not in versions:
            raise PackageError(
                f"{path}: not a fused model of a version this build reads ({', '.join(versions)})"
            )
        try:
            table = json.loads(meta["table"])
        except (KeyError, ValueError) as err:
            raise PackageError(f"{path}: bad concept table ({err})") from err
        return cls.from_tensors(tensors, table, origin=str(path))

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], table: dict, origin: str = "fused model"
    ) -> FusedModel:
        """Rebuild from the compact tensors and the concept table, checking that they agree."""
        if table.get("format") != FUSED_FORMAT or table.get("format_version") not in (
            FUSED_VERSION,
            FUSED_CONV_VERSION,
        ):
            raise PackageError(f"{origin}: not a fused model of a version this build reads")
        for key, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise PackageError(f"{origin}: tensor {key} has NaN or infinite values")
        try:
            concepts = [Concept.from_dict(d) for d in table["concepts"]]
            embeddings = {c.name: tensors[f"embeddings.{c.name}"] for c in concepts}
            factors = {}
            for key in tensors:
                if key.endswith(".lora_A.weight"):
                    layer = key[: -len(".lora_A.weight")]
                    up, down = tensors[f"{layer}.lora_B.weight"], tensors[key]
                    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
                        raise PackageError(f"{origin}: {layer} factors do not multiply")
                    factors[layer] = (up, down)
            base_fingerprint = table["base_fingerprint"]
        except (KeyError, ValueError, TypeError, ConceptError) as err:
            raise PackageError(f"{origin}: bad fused model ({err!r})") from err
        return cls(
            strategy=table["strategy"],
            factors=factors,
            concepts=concepts,
            embeddings=embeddings,
            base_fingerprint=base_fingerprint,
            base_source=table.get("base_source", ""),
            sources={d["name"]: d.get("source", "") for d in table["concepts"]},
        )

    def attach(self, base: BaseModel) -> ConceptTable:
        """Put the concepts and the fused update (as LoRA adapters) on ``base``."""
        if base.fingerprint != self.base_fingerprint:
            raise PackageError(
                f"this fused model was made for base {self.base_fingerprint[:12]} "
                f"({self.base_source}); the given base is {base.fingerprint[:12]} ({base.source})"
            )
        components = base.lora_components(conv=self.has_conv())
        layers = {
            f"{prefix}.{name}"
            for prefix, model, targets in components
            for name in target_layer_names(model, targets)
        }
        missing = sorted(layers - set(self.factors))
        if missing:
            raise PackageError(
                f"this fused model lacks {len(missing)} layers of the base, e.g. {missing[:2]}"
            )
        unknown = sorted(set(self.factors) - layers)
        if earlier_conv_layout(unknown):
            raise PackageError(f"this fused model {EARLIER_CONV_LAYOUT}: fuse its concepts again")
        if unknown:
            raise PackageError(
                f"this fused model has {len(unknown)} layers the base lacks, e.g. {unknown[:2]}"
            )
        table = ConceptTable()
        for c in self.concepts:
            add_concept_tokens(base, c)
            write_embeddings(base, c, self.embeddings[c.name])
            table.add(c)
        for prefix, model, targets in components:
            for name, layer in inject_lora(model, targets, rank=1).items():
                up, down = self.factors[f"{prefix}.{name}"]
                layer.requires_grad_(False)
                layer.set_factors(
                    up.to(layer.weight.device).float(), down.to(layer.weight.device).float()
                )
        return table


def merge_into(base: BaseModel) -> None:
    """Fold every LoRA adapter of ``base`` into its weights (the adapters disappear)."""
    with torch.no_grad():
        for model in (*base.text_encoders(), base.unet):
            remove_lora(model, merge=True)


def save_fused_folder(base: BaseModel, fused: FusedModel, out_dir: str | Path) -> Path:
    """Write the diffusers folder of ``base`` carrying ``fused`` (adapters merged)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merge_into(base)
    base.save_pretrained(out_dir)
    fused.save_compact(out_dir / COMPACT_FILE)
    atomic_write(
        out_dir / CONCEPTS_FILE,
        lambda tmp: Path(tmp).write_text(json.dumps(fused.table_json(), indent=2)),
    )
    write_pipeline_entry(out_dir, [c.to_dict() for c in fused.concepts])
    return out_dir


def write_pipeline_entry(folder: Path, concept_table: list[dict]) -> None:
    """Let stock diffusers build a ``MixOfShowPipeline`` from ``folder``:
    ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="mix_of_show",
    trust_remote_code=True)`` (the file imports this package's pipeline; the concepts ride in
    ``model_index.json``). Without ``custom_pipeline`` the folder stays an ordinary
    ``StableDiffusionPipeline`` with the merged weights."""
    atomic_write(folder / PIPELINE_FILE, lambda tmp: Path(tmp).write_text(PIPELINE_SOURCE))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["concept_table"] = concept_table
    text = json.dumps(index, indent=2, sort_keys=True)
    atomic_write(index_path, lambda tmp: Path(tmp).write_text(text))


def load_fused_folder(folder: str | Path) -> tuple[BaseModel, ConceptTable]:
    """A fused folder's model (weights already fused) and its concept table."""
    folder = Path(folder)
    table_path = folder / CONCEPTS_FILE
    if not table_path.is_file():
        raise PackageError(f"{folder}: no {CONCEPTS_FILE}; not a fused model folder")
    data = json.loads(table_path.read_text())
    base = load_base_model(folder)
    table = ConceptTable(Concept.from_dict(d) for d in data["concepts"])
    vocab = base.tokenizer.get_vocab()
    missing = [t for c in table for t in c.all_tokens() if t not in vocab]
    if missing:
        raise PackageError(f"{folder}: the tokenizer lacks concept tokens {missing[:3]}")
    return base, table
