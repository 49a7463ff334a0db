"""``mos-sample``: compose fused concepts in one image, each in its own box.

    mos-sample --model fused/ --prompt "two pets on the grass" \\
        --region "a <dog1> in a red hat@0,0.2,0.5,1" --region "a <cat2>@0.5,0.2,1,1" \\
        --out pets.png
    mos-sample --model fused/ --scene scene.json --grid 4 --out pets.png

``--model`` is a fused diffusers folder (``mos-fuse --out``), or a compact fused model
(``fused.safetensors``, a client's ``fused/v<N>.safetensors``, or a server's
``models/v<N>`` folder) attached to ``--base-model``. A box is ``x0,y0,x1,y1`` in fractions
of the image (all values <= 1) or in pixels. The PNG carries the scene (JSON) in its
``mos-scene`` text chunk, so an image can be reproduced with ``--scene image.png``.

T2I-Adapters guide the layout with a keypose or sketch: ``--adapter DIR_OR_HUB_ID
--adapter-image pose.png [--adapter-weight 1.0]``, or in a scene several adapters
(``adapters: [{name, model, image, weight}]``) and per-region weights
(``regions: [{..., adapter_weights: {keypose: 0.0}}]``) that scale an adapter inside a box;
``--adapter-steps F`` keeps the guidance to the first fraction F of the steps.
``--native-views`` denoises a canvas wider or taller than the base's own resolution in
overlapping windows of that resolution, each with the regions inside it (MultiDiffusion):
on the toy base, which draws one object per canvas, it is what puts concepts in their boxes,
and ``--view-overlap 0`` (side-by-side tiles) what keeps each of them whole.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from pydantic import BaseModel as _Model
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from ..common.adapters import AdapterCondition, AdapterError, load_adapter, read_condition_image
from ..common.base import TINY, TOY, BaseModelError, load_base_model
from ..common.cli import UsageError, resolve_device, run_command
from ..common.concepts import ConceptError, ConceptTable
from ..common.fused import COMPACT_FILE, FusedModel, load_fused_folder
from ..common.images import image_grid
from ..common.package import PackageError
from ..common.pipeline import MixOfShowPipeline
from ..common.regions import Region, RegionError, box_from_pixels
from ..common.settings import validation_message
from .layout import LATEST

log = logging.getLogger("mos.sample")
SCENE_KEY = "mos-scene"


class RegionSpec(_Model):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    box: tuple[float, float, float, float]
    negative_prompt: str = ""
    adapter_weights: dict[str, float] = Field(
        default_factory=dict, description="adapter name -> its weight inside this box"
    )


class AdapterSpec(_Model):
    """A T2I-Adapter (keypose, sketch, ...) and its condition image."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("adapter", min_length=1)
    model: str = Field(min_length=1, description="a T2IAdapter folder or hub id")
    image: str = Field(min_length=1, description="the condition image (keypose, sketch)")
    weight: float = Field(1.0, ge=0, le=10, description="weight outside the regions' boxes")


class Scene(_Model):
    """Everything that decides an image; saved in the PNG and readable back."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    regions: list[RegionSpec] = []
    adapters: list[AdapterSpec] = []
    seed: int = Field(0, ge=0)
    steps: int = Field(25, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    native_views: bool = Field(
        False, description="denoise a canvas larger than the base's own in windows of its size"
    )
    view_overlap: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="with native_views: the fraction of a window its neighbour shares "
        "(0: side-by-side tiles)",
    )
    adapter_steps: float = Field(
        1.0, ge=0, le=1, description="fraction of the steps (the first ones) with adapter guidance"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _adapter_names(self) -> Scene:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must differ: {names}")
        for i, r in enumerate(self.regions):
            unknown = sorted(set(r.adapter_weights) - set(names))
            if unknown:
                raise ValueError(
                    f"region {i + 1} sets a weight for adapter {unknown[0]!r}; the scene's "
                    f"adapters are: {', '.join(names) or 'none'}"
                )
        return self

    def to_regions(self, width: int, height: int) -> list[Region]:
        return [
            Region(r.prompt, box_from_pixels(r.box, width, height), r.negative_prompt)
            for r in self.regions
        ]


def read_scene(path: Path) -> Scene:
    """A scene from ``.json``, ``.yaml``/``.yml``, or a PNG written by ``mos-sample``."""
    if not path.is_file():
        raise UsageError(f"--scene {path}: no such file")
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as img:
                if not isinstance(img, PngImagePlugin.PngImageFile):
                    raise UsageError(f"--scene {path}: not a PNG file")
                text = img.text.get(SCENE_KEY)
            if text is None:
                raise UsageError(f"{path} carries no {SCENE_KEY} scene")
            data = json.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
        scene = Scene.model_validate(data)
    except (ValueError, OSError) as err:  # ValidationError is a ValueError
        raise UsageError(f"--scene {path}: {err}") from err
    for a in scene.adapters:  # relative paths are relative to the scene file
        a.image = str(_near(path, a.image))
        if _near(path, a.model).exists():  # else a hub id
            a.model = str(_near(path, a.model))
    return scene


def _near(scene_path: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else (scene_path.parent / p).resolve()


def parse_region(text: str) -> RegionSpec:
    """``PROMPT@x0,y0,x1,y1`` or ``PROMPT@x0,y0,x1,y1@NEGATIVE``."""
    parts = text.split("@")
    if len(parts) not in (2, 3):
        raise UsageError(f"--region {text!r}: expected 'PROMPT@x0,y0,x1,y1[@NEGATIVE]'")
    try:
        box = tuple(float(v) for v in parts[1].split(","))
        return RegionSpec(
            prompt=parts[0], box=box, negative_prompt=parts[2] if len(parts) == 3 else ""
        )
    except (ValueError, ValidationError) as err:
        raise UsageError(f"--region {text!r}: {err}") from err


def load_model(spec: Path, base_model: str | None, base_config: str | None):
    """``(base, concepts)`` from a fused folder or a compact fused model on a base."""
    if spec.is_dir() and (spec / LATEST).is_file():  # a client's model folder: its latest model
        try:
            spec = spec / str(json.loads((spec / LATEST).read_text())["file"])
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--model {spec}: unreadable {LATEST} ({err})") from err
    if spec.is_dir() and (spec / "model_index.json").is_file():
        return load_fused_folder(spec)
    compact = spec / COMPACT_FILE if spec.is_dir() else spec
    if not compact.is_file():
        raise UsageError(
            f"--model {spec}: neither a fused diffusers folder nor a compact fused model "
            f"({COMPACT_FILE}, a client's fused/v<N>.safetensors or its model folder)"
        )
    fused = FusedModel.load_compact(compact)
    if base_model is None:  # the base the model was fused on, when it is built in
        source = fused.base_source
        if not (source in (TINY, TOY) or source.startswith(TINY + ":")):
            raise UsageError(
                f"--model {spec} was fused on base '{source}'; pass --base-model with that "
                "model (a diffusers folder, a single-file checkpoint or a hub id)"
            )
        base_model = source
    base = load_base_model(base_model, config=base_config)
    return base, fused.attach(base)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-sample", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="fused folder, compact model, or a client's model folder (its latest)",
    )
    p.add_argument(
        "--base-model",
        help="the base of a compact model (default: the built-in base it was fused on)",
    )
    p.add_argument("--base-config", help="configs of a single-file checkpoint (offline)")
    p.add_argument("--prompt", help="the global prompt")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--region", action="append", default=[], help="'PROMPT@x0,y0,x1,y1[@NEGATIVE]'")
    p.add_argument("--scene", type=Path, help="scene file (.json, .yaml) or a mos-sample PNG")
    p.add_argument(
        "--adapter",
        help="an installed adapter name (toy-sketch), a T2I-Adapter folder or a hub id "
        "(keypose, sketch)",
    )
    p.add_argument("--adapter-image", type=Path, help="the adapter's condition image")
    p.add_argument("--adapter-weight", type=float, default=1.0, help="its global weight (1.0)")
    p.add_argument(
        "--adapter-steps",
        type=float,
        help="fraction of the steps, the first ones, with adapter guidance (1.0)",
    )
    p.add_argument(
        "--native-views",
        action="store_true",
        default=None,
        help="denoise a canvas larger than the base's own resolution in overlapping windows "
        "of that size (MultiDiffusion): for bases that draw one object per canvas",
    )
    p.add_argument(
        "--view-overlap",
        type=float,
        help="with --native-views: the fraction of a window its neighbour shares (0.5; 0: "
        "side-by-side tiles, which keep each box's concept whole on the toy base)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--grid", type=int, default=1, help="render this many seeds side by side")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def scene_from_args(args: argparse.Namespace) -> Scene:
    data = read_scene(args.scene).model_dump() if args.scene else {}
    if args.prompt is not None:
        data["prompt"] = args.prompt
    if args.negative_prompt:
        data["negative_prompt"] = args.negative_prompt
    if args.region:
        data["regions"] = [parse_region(r).model_dump() for r in args.region]
    if args.adapter or args.adapter_image:
        if not (args.adapter and args.adapter_image):
            raise UsageError("--adapter and --adapter-image go together")
        data["adapters"] = [
            {
                "name": "adapter",
                "model": _absolute_if_local(args.adapter),
                "image": str(args.adapter_image.expanduser().resolve()),
                "weight": args.adapter_weight,
            }
        ]
    keys = ("seed", "steps", "guidance", "width", "height", "native_views", "view_overlap")
    for key in (*keys, "adapter_steps"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if "prompt" not in data:
        raise UsageError("give --prompt (or a --scene with a prompt)")
    if args.view_overlap is not None and not data.get("native_views"):
        raise UsageError(
            "--view-overlap sets how the --native-views windows overlap; add --native-views"
        )
    try:
        return Scene.model_validate(data)
    except ValidationError as err:
        raise UsageError(validation_message(err, name=str)) from err


def _absolute_if_local(name: str) -> str:
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def load_conditions(scene: Scene) -> list[AdapterCondition]:
    """Load each adapter and its image; per-region weights by the regions' order."""
    return [
        AdapterCondition(
            adapter=load_adapter(a.model),
            image=read_condition_image(a.image),
            weight=a.weight,
            region_weights=tuple(r.adapter_weights.get(a.name) for r in scene.regions),
            name=a.name,
        )
        for a in scene.adapters
    ]


def run(args: argparse.Namespace) -> Path:
    scene = scene_from_args(args)
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out}: write a .png")
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to overwrite it")
    if args.grid < 1:
        raise UsageError("--grid must be at least 1")
    base, concepts = load_model(args.model, args.base_model, args.base_config)
    base.to(resolve_device(args.device))
    pipe = MixOfShowPipeline.from_base(base, concepts)
    out = render(pipe, scene, grid=args.grid, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out, pnginfo=scene_pnginfo(scene))
    n = len(scene.regions)
    log.info("wrote %s (%d region%s)", args.out, n, "" if n == 1 else "s")
    return args.out


def render(
    pipe: MixOfShowPipeline,
    scene: Scene,
    *,
    grid: int = 1,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """The image of a scene (``grid`` seeds side by side from ``scene.seed`` on), as
    ``mos-sample`` writes it. ``callback(done, total)`` counts steps over all seeds."""
    width = scene.width or pipe.default_resolution
    height = scene.height or pipe.default_resolution
    regions = scene.to_regions(width, height)
    _check_tokens(pipe.concepts, [scene.prompt, *(r.prompt for r in regions)])
    adapters = load_conditions(scene)
    for cond in adapters:
        cond.adapter.to(pipe.device)
    images: list[Image.Image] = []
    for k in range(grid):
        gen = torch.Generator().manual_seed(scene.seed + k)
        step = None
        if callback is not None:
            step = functools.partial(_overall, callback, k, grid)
        images += pipe(
            scene.prompt,
            scene.negative_prompt,
            num_inference_steps=scene.steps,
            guidance_scale=scene.guidance,
            width=width,
            height=height,
            generator=gen,
            regions=regions,
            adapters=adapters,
            adapter_conditioning_factor=scene.adapter_steps,
            native_views=scene.native_views,
            view_overlap=scene.view_overlap,
            progress=progress,
            callback=step,
        )
    if grid == 1:
        return images[0]
    return image_grid([images], (), [f"seed {scene.seed + k}" for k in range(grid)])


def _overall(callback: Callable[[int, int], None], k: int, grid: int, i: int, n: int) -> None:
    callback(k * n + i, grid * n)


def scene_pnginfo(scene: Scene) -> PngImagePlugin.PngInfo:
    """The PNG text chunk that makes an image its own scene file (``--scene image.png``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(SCENE_KEY, scene.model_dump_json())
    return info


def scene_command(
    model: Path,
    scene: Scene,
    out: str,
    *,
    grid: int = 1,
    base_model: str | None = None,
    scene_file: str | None = None,
) -> str:
    """The ``mos-sample`` command line that renders ``scene`` from ``model``. A scene the
    options cannot spell (several adapters, per-region adapter weights, an ``@`` in a prompt)
    is given as ``--scene scene_file`` instead (which the caller writes)."""
    words = ["mos-sample", "--model", str(model)]
    if base_model:
        words += ["--base-model", base_model]
    if not _spellable(scene):
        if scene_file is None:
            raise UsageError("this scene needs a scene file: save the scene and use --scene")
        words += ["--scene", scene_file]
    else:
        default = Scene(prompt=scene.prompt)
        words += ["--prompt", scene.prompt]
        if scene.negative_prompt:
            words += ["--negative-prompt", scene.negative_prompt]
        for r in scene.regions:
            box = ",".join(_number(v) for v in r.box)
            neg = f"@{r.negative_prompt}" if r.negative_prompt else ""
            words += ["--region", f"{r.prompt}@{box}{neg}"]
        for a in scene.adapters:
            words += ["--adapter", a.model, "--adapter-image", a.image]
            if a.weight != 1.0:
                words += ["--adapter-weight", _number(a.weight)]
        for key in ("seed", "steps", "guidance", "width", "height", "adapter_steps"):
            value = getattr(scene, key)
            if value is not None and value != getattr(default, key):
                words += [f"--{key.replace('_', '-')}", _number(value)]
        if scene.native_views:
            words += ["--native-views"]
            if scene.view_overlap != default.view_overlap:
                words += ["--view-overlap", _number(scene.view_overlap)]
    if grid != 1:
        words += ["--grid", str(grid)]
    words += ["--out", out]
    return shlex.join(words)


def _spellable(scene: Scene) -> bool:
    texts = [scene.prompt, scene.negative_prompt]
    texts += [t for r in scene.regions for t in (r.prompt, r.negative_prompt)]
    return (
        len(scene.adapters) <= 1
        and all(a.name == "adapter" for a in scene.adapters)
        and not any(r.adapter_weights for r in scene.regions)
        and not any("@" in t for t in texts)
        and not scene.negative_prompt.startswith("-")
    )


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and not isinstance(v, bool) else repr(float(v))


def _check_tokens(concepts: ConceptTable, prompts: list[str]) -> None:
    """An unknown ``<token>`` fails before sampling, naming the known ones."""
    for prompt in prompts:
        concepts.expand(prompt, 1)


def main(argv: list[str] | None = None) -> int:
    errors = (AdapterError, BaseModelError, ConceptError, PackageError, RegionError, ValueError)
    return run_command("mos-sample", build_parser(), run, errors, argv)


if __name__ == "__main__":
    sys.exit(main())
