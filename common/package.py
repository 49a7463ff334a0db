"""The concept package: one ``.safetensors`` file, the only thing a client ever uploads.

Tensors
    ``text_encoder.<path>.lora_A.weight`` ``[rank, in]`` / ``...lora_B.weight`` ``[out, rank]``
    ``unet.<path>.lora_A.weight`` / ``unet.<path>.lora_B.weight`` (PEFT / diffusers names)
    optionally (LoCon, ``conv_rank`` > 0) the UNet up-block ResNet convolutions' adapters
    ``unet.<path>.conv1.lora_A.weight`` ``[conv_rank, in, kh, kw]`` / ``lora_B`` ``[out, conv_rank, 1, 1]``
    ``embeddings`` ``[words, layers, dim]`` (ED-LoRA: 2 x L; vanilla LoRA: 1 x 1)
Header metadata (all strings)
    ``format`` = ``mix-of-show/concept``, ``format_version``, ``concept`` (``<dog1>``),
    ``words`` (JSON list), ``class_word``, ``method``, ``rank``, ``conv_rank``, ``num_layers``,
    ``base_fingerprint``, ``base_source``, ``architecture`` (``sd1``, ``sd2``, ``sdxl``; older
    packages lack it), ``training`` (JSON), ``metrics`` (JSON)

SDXL packages also carry ``text_encoder_2.<path>...`` adapters, and their embeddings are
both encoders' rows side by side (``dim`` = the two widths added).

Files are written atomically (temporary file + rename): an interrupted write leaves nothing.
``ConceptPackage.load`` validates everything it can without a base; ``check_against``
validates against the base it will be attached to.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .base import ARCHITECTURE_NAMES, BaseModel
from .checksum import digest
from .concepts import Concept, ConceptError
from .edlora import add_concept_tokens, write_embeddings
from .files import atomic_write
from .lora import (
    EARLIER_CONV_LAYOUT,
    UNET_CONV_TARGETS,
    earlier_conv_layout,
    inject_lora,
    load_lora_state_dict,
    target_layer_names,
)
from .safecheck import HeaderError, check_header
from .text import SDXL

FORMAT = "mix-of-show/concept"
FORMAT_VERSION = 1  # packages with convolution adapters are version 2 (older builds refuse them)
CONV_FORMAT_VERSION = 2
ALLOWED_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
MAX_PACKAGE_BYTES = 1 << 30  # 1 GiB; an SD 1.x rank-4 package is ~3.5 MB


class PackageError(ValueError):
    """A concept package is malformed or does not fit the base; the message says what."""


def free_name(name: str, taken: Collection[str]) -> str:
    """The collision rule: ``name`` if free, else ``name-2``, ``name-3``, ... (the first
    that is free): two people who both called their dog ``<dog1>`` fuse as ``<dog1>`` (the
    first to arrive) and ``<dog1-2>``."""
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


@dataclass
class ConceptPackage:
    concept: Concept
    rank: int
    embeddings: torch.Tensor
    lora: dict[str, torch.Tensor]
    base_fingerprint: str
    base_source: str = ""
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    conv_rank: int = 0  # rank of the ResNet-convolution adapters (0: none, the paper's ED-LoRA)
    architecture: str = ""  # the base's (BaseModel.architecture); "" in older packages

    @property
    def tuned_for(self) -> str:
        """The architecture the package was tuned for: as recorded, else told by its
        adapters (``sdxl`` when it has a second text encoder's, else ``sd``: SD 1.x or 2.x)."""
        if self.architecture:
            return self.architecture
        return SDXL if any(k.startswith("text_encoder_2.") for k in self.lora) else "sd"

    def renamed(self, name: str) -> ConceptPackage:
        """The same concept under another name (its tokens follow the name; the tensors,
        and so the digest, are unchanged)."""
        return replace(self, concept=replace(self.concept, name=name))

    def metadata(self) -> dict[str, str]:
        c = self.concept
        return {
            "format": FORMAT,
            "format_version": str(CONV_FORMAT_VERSION if self.conv_rank else FORMAT_VERSION),
            "concept": c.token,
            "words": json.dumps(c.words),
            "class_word": c.class_word,
            "method": c.method,
            "rank": str(self.rank),
            "conv_rank": str(self.conv_rank),
            "num_layers": str(c.num_layers),
            "trigger": c.trigger,
            "base_fingerprint": self.base_fingerprint,
            "base_source": self.base_source,
            "architecture": self.architecture,
            "training": json.dumps(self.training, sort_keys=True),
            "metrics": json.dumps(self.metrics, sort_keys=True),
        }

    @cached_property
    def sha256(self) -> str:
        """The digest of ``tensors()`` as they travel (computed once; a package is not
        changed after it is built)."""
        return digest(self.tensors())

    def seed_sha256(self, value: str, tensors: dict[str, torch.Tensor]) -> None:
        """Take ``value``, the digest of ``tensors`` this package was built from, as its
        ``sha256`` when they are exactly its ``tensors()`` (same names and dtypes), so a
        received package's digest is computed once."""
        own = {k: v.dtype for k, v in self.tensors().items()}
        if own == {k: v.dtype for k, v in tensors.items()}:
            self.__dict__["sha256"] = value  # functools.cached_property's own slot

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().to("cpu").contiguous() for k, v in self.lora.items()}
        out["embeddings"] = self.embeddings.detach().to("cpu", torch.float32).contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the package atomically; returns the path."""
        tensors, meta = self.tensors(), self.metadata()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = MAX_PACKAGE_BYTES) -> ConceptPackage:
        """Read and validate a package file (format, metadata, dtypes, shapes, finite values)."""
        path = Path(path)
        if not path.is_file():
            raise PackageError(f"{path}: no such concept package")
        size = path.stat().st_size
        if size > max_bytes:
            raise PackageError(f"{path}: {size} bytes is over the {max_bytes}-byte package limit")
        try:
            check_header(path, max_bytes=max_bytes)
        except HeaderError as err:
            raise PackageError(f"{path}: not a readable safetensors file ({err})") from err
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise PackageError(f"{path}: not a readable safetensors file ({err})") from err
        return cls.from_parts(tensors, meta, origin=str(path))

    @classmethod
    def from_parts(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], origin: str = "package"
    ) -> ConceptPackage:
        """Build and validate a package from its tensors and metadata strings."""

        def fail(msg: str) -> PackageError:
            return PackageError(f"{origin}: {msg}")

        if meta.get("format") != FORMAT:
            raise fail(f"not a Mix-of-Show concept package (format={meta.get('format')!r})")
        version = meta.get("format_version", "")
        if version not in (str(FORMAT_VERSION), str(CONV_FORMAT_VERSION)):
            raise fail(
                f"package format version {version!r} is not supported (this build reads "
                f"versions {FORMAT_VERSION} and {CONV_FORMAT_VERSION}); upgrade "
                "mix-of-show-flower or re-export the package"
            )
        try:
            rank = int(meta["rank"])
            conv_rank = int(meta.get("conv_rank", "0"))
            num_layers = int(meta["num_layers"])
            words = json.loads(meta["words"])
            training = json.loads(meta.get("training", "{}"))
            metrics = json.loads(meta.get("metrics", "{}"))
            concept = Concept(
                name=meta["concept"].strip("<>"),
                class_word=meta["class_word"],
                method=meta["method"],
                num_layers=num_layers,
                trigger=meta.get("trigger", ""),
            )
        except KeyError as err:
            raise fail(f"metadata field {err} is missing") from err
        except (ValueError, TypeError, ConceptError) as err:
            raise fail(f"bad metadata: {err}") from err
        if concept.token != meta["concept"]:
            raise fail(f"bad concept token {meta['concept']!r}")
        if words != concept.words:
            raise fail(f"words {words} do not match concept {concept.token} ({concept.words})")
        if rank < 1:
            raise fail(f"rank {rank} must be >= 1")
        if conv_rank < 0:
            raise fail(f"conv_rank {conv_rank} must be >= 0")
        if conv_rank and version != str(CONV_FORMAT_VERSION):
            raise fail(f"conv_rank {conv_rank} needs format version {CONV_FORMAT_VERSION}")
        if "embeddings" not in tensors:
            raise fail("tensor 'embeddings' is missing")
        for key, t in tensors.items():
            if t.dtype not in ALLOWED_DTYPES:
                raise fail(f"tensor {key} has dtype {t.dtype}; only fp16/bf16/fp32 are allowed")
            if not bool(torch.isfinite(t).all()):
                raise fail(f"tensor {key} has NaN or infinite values")
        emb = tensors["embeddings"]
        want_layers = num_layers if concept.layerwise else 1
        if emb.ndim != 3 or emb.shape[0] != len(words) or emb.shape[1] != want_layers:
            raise fail(
                f"embeddings have shape {tuple(emb.shape)}; expected "
                f"[{len(words)} words, {want_layers} layers, dim]"
            )
        lora = {k: v for k, v in tensors.items() if k != "embeddings"}
        for key, t in lora.items():
            prefix = key.split(".", 1)[0]
            if prefix not in ("text_encoder", "text_encoder_2", "unet") or not (
                key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")
            ):
                raise fail(f"unexpected tensor {key}")
            conv = t.ndim == 4 and prefix == "unet" and conv_rank > 0
            if t.ndim != 2 and not conv:
                what = "2-D" if not conv_rank else "2-D (4-D for UNet convolution adapters)"
                raise fail(f"tensor {key} must be {what}, has shape {tuple(t.shape)}")
            r = t.shape[0] if key.endswith("lora_A.weight") else t.shape[1]
            want, label = (conv_rank, "conv_rank") if conv else (rank, "rank")
            if r != want:
                raise fail(f"tensor {key} has rank {r}, metadata says {label} {want}")
        for key in lora:
            other = (
                key.replace(".lora_A.", ".lora_B.")
                if ".lora_A." in key
                else key.replace(".lora_B.", ".lora_A.")
            )
            if other not in lora:
                raise fail(f"tensor {key} has no partner {other}")
        return cls(
            concept=concept,
            rank=rank,
            embeddings=emb.float(),
            lora=lora,
            base_fingerprint=meta.get("base_fingerprint", ""),
            base_source=meta.get("base_source", ""),
            training=training,
            metrics=metrics,
            conv_rank=conv_rank,
            architecture=meta.get("architecture", ""),
        )

    def check_against(self, base: BaseModel, *, check_fingerprint: bool = True) -> None:
        """Refuse a package that was trained on another base or does not fit its shapes."""
        tuned, arch = self.tuned_for, base.architecture
        if tuned != arch and not (tuned == "sd" and arch != SDXL):
            names = {**ARCHITECTURE_NAMES, "sd": "SD 1.x/2.x"}
            raise PackageError(
                f"concept {self.concept.token} was tuned on an {names.get(tuned, tuned)} base "
                f"({self.base_source or 'unknown'}); this base is {names[arch]} ({base.source}): "
                "a concept package only fits the architecture it was tuned on, tune it again "
                "on this base"
            )
        if check_fingerprint and self.base_fingerprint != base.fingerprint:
            raise PackageError(
                f"concept {self.concept.token} was trained on another base model "
                f"(package base {self.base_fingerprint[:12]} from "
                f"{self.base_source or 'unknown'}; this base {base.fingerprint[:12]} from "
                f"{base.source})"
            )
        c = self.concept
        layers = base.num_cross_attention_layers
        if c.layerwise and c.num_layers != layers:
            raise PackageError(
                f"concept {c.token} has embeddings for {c.num_layers} cross-attention layers; "
                f"this base has {layers}"
            )
        if self.embeddings.shape[-1] != base.text_dim:
            raise PackageError(
                f"concept {c.token} has {self.embeddings.shape[-1]}-dim embeddings; this base's "
                f"text encoder is {base.text_dim}-dim"
            )
        expected = expected_lora_shapes(base, self.rank, self.conv_rank)
        missing = sorted(set(expected) - set(self.lora))
        extra = sorted(set(self.lora) - set(expected))
        if earlier_conv_layout(extra):
            raise PackageError(f"concept {c.token} {EARLIER_CONV_LAYOUT}: tune it again")
        if missing or extra:
            raise PackageError(
                f"concept {c.token}: LoRA layers do not match this base "
                f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]})"
            )
        for key, shape in expected.items():
            if tuple(self.lora[key].shape) != shape:
                raise PackageError(
                    f"concept {c.token}: {key} has shape {tuple(self.lora[key].shape)}, "
                    f"this base needs {shape}"
                )


def expected_lora_shapes(
    base: BaseModel, rank: int, conv_rank: int = 0
) -> dict[str, tuple[int, ...]]:
    """The ``{key: shape}`` of every LoRA tensor a package for ``base`` must carry."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, model, targets in base.lora_components(conv=conv_rank > 0):
        for name in target_layer_names(model, targets):
            layer = model.get_submodule(name)
            if isinstance(layer, torch.nn.Conv2d):
                a: tuple[int, ...] = (conv_rank, layer.in_channels, *layer.kernel_size)
                b: tuple[int, ...] = (layer.out_channels, conv_rank, 1, 1)
            else:
                linear = cast(torch.nn.Linear, layer)
                a, b = (rank, linear.in_features), (linear.out_features, rank)
            shapes[f"{prefix}.{name}.lora_A.weight"] = a
            shapes[f"{prefix}.{name}.lora_B.weight"] = b
    return shapes


def attach_package(base: BaseModel, package: ConceptPackage, concepts) -> None:
    """Load a concept onto ``base``: its tokens and embeddings, and its LoRA adapters.

    ``concepts`` (a ``ConceptTable``) gets the concept. The base's UNet and text encoder
    carry the package's adapters afterwards (``lora.remove_lora`` takes them off).
    """
    package.check_against(base)
    add_concept_tokens(base, package.concept)
    write_embeddings(base, package.concept, package.embeddings)
    models: dict[int, tuple[str, torch.nn.Module]] = {}
    for prefix, model, targets in base.lora_components(conv=package.conv_rank > 0):
        conv = targets == UNET_CONV_TARGETS
        inject_lora(model, targets, rank=package.conv_rank if conv else package.rank)
        models[id(model)] = (prefix, model)
    for prefix, model in models.values():
        load_lora_state_dict(model, package.lora, prefix)
    concepts.add(package.concept)
