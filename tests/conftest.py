"""Shared fixtures: the tiny base model (fresh per test) and folders of generated photos."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mos.client.demo import draw_sprite_photo
from mos.common.base import BaseModel, build_tiny
from mos.common.concepts import Concept
from mos.common.package import ConceptPackage, expected_lora_shapes


@pytest.fixture
def tiny() -> BaseModel:
    return build_tiny()


def make_photos(folder: Path, count: int = 3, size: int = 48, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        draw_sprite_photo(rng, size).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    return make_photos(tmp_path / "photos")


def random_package(base: BaseModel, name: str, seed: int = 0, rank: int = 2) -> ConceptPackage:
    """A valid ED-LoRA package for ``base`` with random factors of a realistic small norm."""
    g = torch.Generator().manual_seed(seed)
    concept = Concept(name, "dog", "edlora", base.num_cross_attention_layers)
    lora = {
        key: torch.randn(*shape, generator=g) * (0.05 if ".lora_B." in key else 0.3)
        for key, shape in expected_lora_shapes(base, rank).items()
    }
    emb = torch.randn(2, concept.num_layers, base.text_dim, generator=g) * 0.02
    return ConceptPackage(concept, rank, emb, lora, base.fingerprint, base.source)


def random_fused(base: BaseModel, packages: list[ConceptPackage]):
    """The weight-fused model of ``packages`` (computed on a fresh tiny base, so ``base``
    stays untouched)."""
    from mos.common.fused import FusedModel
    from mos.server.fusion import FusionEngine

    result = FusionEngine(build_tiny(), packages).weight_fusion()
    return FusedModel.from_packages(result.strategy, result.factors, packages)
