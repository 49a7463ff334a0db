"""Measuring identity, fusion and regional placement on the toy world.

Thin helpers over the project's own pipeline and trainer, shared by the claims benchmark
(``benchmarks/bench_toyworld.py``), the tests and the demo:

- ``write_concept_folder`` draws a concept's "photos" into a folder a client can use;
- ``tune`` runs ED-LoRA (or vanilla LoRA) on them, ``tune_many`` several concepts at once
  in their own processes;
- ``identity`` samples "a photo of a <TOK>" and scores the samples with the detector;
- ``placement`` samples concepts in boxes and checks each is found in its own box and not
  in the others'.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mos.client.data import CAPTION_EXTENSION, MASK_SUFFIX, PLACEHOLDER
from mos.client.layout import CLIENT_FILE
from mos.common.adapters import AdapterCondition
from mos.common.base import TOY, BaseModel, load_base_model
from mos.common.config import TrainConfig
from mos.common.fused import FusedModel
from mos.common.package import ConceptPackage
from mos.common.pipeline import MixOfShowPipeline
from mos.common.presets import PAPER_FUSION, PAPER_TRAINING, Preset
from mos.common.regions import Box, Region

from .analyse import ConceptDetector
from .world import COLOURS, CONCEPTS, article, concept_photos_annotated, concept_sketch

# ED-LoRA on the toy base: SD's learning rates are 10x too small for a model trained from
# scratch in an hour (checker, 8 photos: detector score 0.00 after 150 steps at SD's rates,
# 0.33 after 400 steps at these; RESULTS.md, toy world). No flips: checker, halfmoon and
# flag have a handedness, and a mirrored one is another concept to the detector (checker:
# 0 of 8 samples detected with flips, 2 of 8 without).
TOY_TRAINING = {
    "steps": 400,
    "lr_embedding": 5e-3,
    "lr_text": 1e-4,
    "lr_unet": 1e-3,
    "flip_p": 0.0,
}
# LoRA on the UNet's up-block ResNet convolutions too (LoCon, beyond the paper; ``mos-client
# --conv-rank``): the toy base's ED-LoRA draws the concepts' colours but not their layout,
# these settings draw it (identity 0.48 against 0.26; RESULTS.md, convolution adapters).
# What ``mos-demo`` tunes on the toy base unless told ``--conv-rank 0``.
TOY_LOCON = {"steps": 1000, "conv_rank": 16}
# How the toy concepts' photo folders are annotated (``write_concept_folder``). Captions
# naming the background and subject masks were measured and do not help here (with a mask
# loss the background is free and fills with the concept's colours; RESULTS.md, toy world).
TOY_PHOTOS = {"captions": False, "masks": False}
DETECTED = 0.5  # detector score from which a concept counts as present (see RESULTS.md)
SAMPLE_STEPS = 25
GUIDANCE = 4.0


def write_concept_folder(
    folder: Path,
    name: str,
    count: int = 8,
    seed: int = 0,
    *,
    captions: bool = TOY_PHOTOS["captions"],
    masks: bool = TOY_PHOTOS["masks"],
) -> Path:
    """``count`` photos of toy concept ``name`` and the folder's ``.mos-client.json``; with
    ``captions`` each photo's caption names its background ("a photo of a <TOK> on a green
    background"), with ``masks`` each has its subject mask, as a user could annotate them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(concept_photos_annotated(name, count, seed)):
        photo.image.save(folder / f"{i:02d}.png")
        if captions:
            bg = photo.background
            caption = f"a photo of a {PLACEHOLDER} on {article(bg)} {bg} background"
            (folder / f"{i:02d}{CAPTION_EXTENSION}").write_text(caption + "\n")
        if masks:
            photo.mask.save(folder / f"{i:02d}{MASK_SUFFIX}")
    (folder / CLIENT_FILE).write_text(
        json.dumps({"concept": name, "class_word": CONCEPTS[name].class_word})
    )
    return folder


def toy_preset() -> Preset:
    """``--preset toy``: the paper's ED-LoRA with the toy base's learning rates."""
    return Preset(
        description="ED-LoRA on the toy base: 10x SD's learning rates, no flips",
        train=TOY_TRAINING,
    )


def toy_paper_preset() -> Preset:
    """``--preset toy-paper``: the authors' recipe and fusion (``--preset paper``) with the
    toy base's learning rates and the toy preset's length."""
    return Preset(
        description="the paper preset with the toy base's learning rates",
        train={**PAPER_TRAINING, **TOY_TRAINING, "batch_size": PAPER_TRAINING["batch_size"]},
        fusion=PAPER_FUSION,
    )


def toy_locon_preset() -> Preset:
    """``--preset toy-locon``: what ``mos-demo`` tunes on the toy base (LoCon 16, 1000
    steps, beyond the paper)."""
    return Preset(
        description="ED-LoRA + LoCon 16 on the up blocks, 1000 steps, on the toy base",
        train={**TOY_TRAINING, **TOY_LOCON},
    )


def toy_train_config(**overrides) -> TrainConfig:
    """ED-LoRA settings for the toy model (see benchmarks/RESULTS.md, toy world)."""
    settings = dict(TOY_TRAINING)
    settings.update(overrides)
    return TrainConfig(**settings)


def toy_base() -> BaseModel:
    """A fresh copy of the toy base (tuning and attaching concepts modify a base)."""
    return load_base_model(TOY)


def tune(
    name: str,
    config: TrainConfig,
    photos_seed: int = 0,
    count: int = 8,
    *,
    captions: bool = TOY_PHOTOS["captions"],
    masks: bool = TOY_PHOTOS["masks"],
) -> ConceptPackage:
    """Tune toy concept ``name`` on ``count`` generated photos, on a fresh toy base."""
    from mos.client.data import load_photo_folder
    from mos.client.trainer import train_concept

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_concept_folder(
            Path(tmp), name, count, photos_seed, captions=captions, masks=masks
        )
        photos = load_photo_folder(folder)
    base = toy_base()
    return train_concept(
        base, photos, name, CONCEPTS[name].class_word, config, progress=False
    ).package


def _tune_to_file(
    name: str,
    config: TrainConfig,
    out: str,
    photos_seed: int,
    count: int,
    captions: bool,
    masks: bool,
) -> str:
    """Worker of ``tune_many``: one torch thread, the package written to ``out``."""
    torch.set_num_threads(1)
    tune(name, config, photos_seed, count, captions=captions, masks=masks).save(out)
    return out


def tune_many(
    names: Sequence[str],
    config: TrainConfig,
    photos_seed: int = 0,
    count: int = 8,
    *,
    workers: int | None = None,
    captions: bool = TOY_PHOTOS["captions"],
    masks: bool = TOY_PHOTOS["masks"],
) -> dict[str, ConceptPackage]:
    """``tune`` for each of ``names``, ``workers`` at a time (default: one per CPU core, at
    most one per concept), each in a process of its own with one torch thread.

    On the toy model one thread per tuning uses the cores best: a tuning alone runs 1.45x
    faster with two threads than with one, but three one-thread tunings on two cores
    finish 1.5x sooner than the three one after another with two threads (181-198 s
    against about 300 s, 1000 LoCon steps each). The packages do not depend on
    ``workers`` (every tuning runs in a worker with one thread); they differ from
    ``tune``'s in this process in the last bits, as sums over threads run in another
    order. They come back as ``.safetensors`` files, loaded and validated as any package.
    Workers are spawned, so a script that calls this needs the ``if __name__ ==
    "__main__":`` guard."""
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"tune_many takes each concept once, got {names}")
    unknown = [n for n in names if n not in CONCEPTS]
    if unknown:
        raise ValueError(f"no toy concept {unknown}; the toy concepts are {list(CONCEPTS)}")
    if workers is None:
        workers = min(len(names), os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        futures = {
            n: pool.submit(
                _tune_to_file,
                n,
                config,
                str(Path(tmp) / f"{n}.safetensors"),
                photos_seed,
                count,
                captions,
                masks,
            )
            for n in names
        }
        return {n: ConceptPackage.load(f.result()) for n, f in futures.items()}


def single_concept_pipeline(package: ConceptPackage) -> MixOfShowPipeline:
    return MixOfShowPipeline.from_packages(toy_base(), [package])


def fused_pipeline(fused: FusedModel) -> MixOfShowPipeline:
    base = toy_base()
    return MixOfShowPipeline.from_base(base, fused.attach(base))


@torch.no_grad()
def samples(
    pipe: MixOfShowPipeline,
    prompt: str,
    n: int,
    seed: int = 0,
    *,
    regions: Sequence[Region] = (),
    lora_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    batch: int = 16,
    adapters: Sequence[AdapterCondition] = (),
    native_views: bool = False,
    view_overlap: float = 0.5,
) -> list[Image.Image]:
    out: list[Image.Image] = []
    gen = torch.Generator().manual_seed(seed)
    while len(out) < n:
        k = min(batch, n - len(out))
        out += pipe(
            [prompt] * k,
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=GUIDANCE,
            generator=gen,
            regions=regions,
            lora_scale=lora_scale,
            width=width,
            height=height,
            adapters=adapters,
            native_views=native_views,
            view_overlap=view_overlap,
        )
    return out


@dataclass
class Identity:
    name: str
    mean_score: float
    detected: float  # fraction of samples with score >= DETECTED
    scores: list[float]


def identity(images: Sequence[Image.Image], name: str) -> Identity:
    det = ConceptDetector(name)
    scores = [det.score(img) for img in images]
    return Identity(
        name,
        sum(scores) / len(scores),
        sum(s >= DETECTED for s in scores) / len(scores),
        scores,
    )


def concept_identity(
    pipe: MixOfShowPipeline, name: str, n: int = 16, seed: int = 0, lora_scale: float | None = None
) -> Identity:
    return identity(samples(pipe, f"a photo of a <{name}>", n, seed, lora_scale=lora_scale), name)


def background_for(names: Sequence[str]) -> str:
    """The first palette colour that none of the concepts uses (else the last colour)."""
    used = {c for n in names for c in CONCEPTS[n].colours}
    return next((c for c in COLOURS if c not in used), COLOURS[-1])


def side_by_side_boxes(k: int) -> list[Box]:
    """``k`` vertical strips, slightly inset."""
    return [(i / k, 0.1, (i + 1) / k, 0.9) for i in range(k)]


@dataclass
class Placement:
    names: list[str]
    boxes: list[Box]
    in_own_box: list[float]  # per concept: fraction of seeds where it is found in its box
    all_placed: float  # fraction of seeds where every concept is in its box and in no other
    # fraction of (seed, concept) pairs where the concept scores higher in its own box than
    # in any other (no threshold: where it is drawn, not whether it is recognisable)
    own_beats_other: float
    images: list[Image.Image]


def placement(
    pipe: MixOfShowPipeline,
    names: Sequence[str],
    n: int = 8,
    seed: int = 0,
    *,
    regional: bool = True,
    width: int | None = None,
    views: bool = False,
    photo_prompts: bool = False,
    sketch_adapter: torch.nn.Module | None = None,
    tiles: bool = False,
) -> Placement:
    """Sample ``names`` side by side (regional prompts in strips, or one plain prompt
    naming them all) and check where the detector finds each.

    Prompts name a background ("a <ring> on an orange background"), or with
    ``photo_prompts`` are the concepts' training caption ("a photo of a <ring>", the
    global prompt "a photo of a <ring> and a <swiss>"). ``views`` denoises the wide canvas
    in windows of the base's own size (the pipeline's ``native_views``), half overlapping,
    or with ``tiles`` side by side (``view_overlap=0``: one window per strip). With
    ``sketch_adapter`` (``train_adapter``) the samples are also guided by a sketch of each
    concept in its box (``world.concept_sketch``), as the paper's users sketch theirs."""
    boxes = side_by_side_boxes(len(names))
    if photo_prompts:
        prompt = "a photo of " + " and ".join(f"a <{n}>" for n in names)
        region_prompts = [f"a photo of a <{n}>" for n in names]
    else:
        bg = background_for(names)
        where = f"on {article(bg)} {bg} background"
        prompt = " and ".join(f"a <{n}>" for n in names) + f" {where}"
        region_prompts = [f"a <{n}> {where}" for n in names]
    regions = [Region(r, b) for r, b in zip(region_prompts, boxes, strict=True)]
    width = width or 32 * len(names)
    adapters: tuple[AdapterCondition, ...] = ()
    if sketch_adapter is not None:
        sketch = concept_sketch(names, boxes, width, 32)
        adapters = (AdapterCondition(sketch_adapter, sketch, name="sketch"),)
    images = samples(
        pipe,
        prompt,
        n,
        seed,
        regions=regions if regional else (),
        width=width,
        height=32,
        adapters=adapters,
        native_views=views or tiles,
        view_overlap=0.0 if tiles else 0.5,
    )
    dets = {name: ConceptDetector(name) for name in names}
    own = [0] * len(names)
    every = beats = 0
    for img in images:
        ok_all = True
        for i, name in enumerate(names):
            scores = [dets[name].score(img, box) for box in boxes]
            here = scores[i] >= DETECTED
            others = [s for j, s in enumerate(scores) if j != i]
            own[i] += here
            ok_all &= here and not any(s >= DETECTED for s in others)
            beats += not others or scores[i] > max(others)
        every += ok_all
    pairs = len(images) * len(names)
    return Placement(list(names), boxes, [o / n for o in own], every / n, beats / pairs, images)
