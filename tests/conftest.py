"""Shared fixtures: the tiny base model (fresh per test) and folders of generated photos."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mos.client.demo import draw_sprite_photo
from mos.common.base import BaseModel, build_tiny


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
