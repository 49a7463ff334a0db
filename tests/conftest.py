"""Shared fixtures: the tiny base model (fresh per test) and folders of generated photos."""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mos.common.base import BaseModel, build_tiny
from mos.common.concepts import Concept
from mos.common.package import ConceptPackage, expected_lora_shapes
from mos.toyworld.demo import draw_sprite_photo


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


def sample_tensor(base: BaseModel, table, prompt: str, steps: int = 3) -> torch.Tensor:
    """One seed-0 sample of ``prompt`` as a tensor (to compare two ways of loading a model)."""
    from mos.common.pipeline import MixOfShowPipeline

    return MixOfShowPipeline.from_base(base, table)(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )


def shape_photos(folder: Path, kind: str, seed: int, count: int = 4) -> Path:
    """Visibly different small 'concepts' at random places on random backgrounds (48 px):
    ``disc`` (yellow), ``framed`` (a blue square with a white centre), ``stripes`` (red,
    across the photo), ``checker`` (a red checkerboard patch: texture a convolution sees)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img = Image.new("RGB", (48, 48), tuple(rng.randint(0, 255) for _ in range(3)))
        d = ImageDraw.Draw(img)
        x, y = rng.randint(4, 20), rng.randint(4, 20)
        if kind == "disc":
            d.ellipse((x, y, x + 24, y + 24), fill=(255, 220, 0))
        elif kind == "framed":
            d.rectangle((x, y, x + 24, y + 24), fill=(20, 20, 220))
            d.rectangle((x + 8, y + 8, x + 16, y + 16), fill=(255, 255, 255))
        elif kind == "stripes":
            for k in range(0, 48, 8):
                d.rectangle((k, 0, k + 3, 47), fill=(200, 0, 0))
        elif kind == "checker":
            for k in range(0, 24, 6):
                for j in range(0, 24, 6):
                    if (k + j) // 6 % 2 == 0:
                        d.rectangle((x + k, y + j, x + k + 5, y + j + 5), fill=(240, 0, 0))
        else:
            raise ValueError(f"unknown photo kind {kind!r}")
        img.save(folder / f"{i}.png")
    return folder


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


@dataclass
class DemoRun:
    out: Path  # mos-demo --out: server/ (state dir), clients/, composed.png
    log: str  # everything the demo printed


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """One real ``mos-demo`` run (simulation on the toy base, few steps), shared by the tests
    that check the demo and the studio's view of it."""
    pytest.importorskip("ray")
    from mos.common.processes import Managed

    bin_dir = Path(sys.executable).parent
    tmp = tmp_path_factory.mktemp("demo")
    out, log = tmp / "demo", tmp / "log"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH="/usr/bin:/bin", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env["OMP_NUM_THREADS"] = "1"  # the simulation's processes share two cores in CI
    cmd = [str(bin_dir / "mos-demo"), "--out", str(out), "--steps", "3", "--fusion-steps", "2"]
    proc = Managed(cmd, env, log)
    try:
        deadline = time.monotonic() + 400
        while proc.alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"mos-demo still running after 400 s:{proc._tail()}")
            time.sleep(0.3)
        assert proc.proc.returncode == 0, proc._tail()
    finally:
        proc.stop()
    return DemoRun(out, log.read_text())
