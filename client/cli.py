"""``mos-client``: tune one concept on a folder of photos and write its concept package.

    mos-client --data ./my_photos --concept '<dog1>'                  # local mode
    mos-client --data ./my_photos --concept '<dog1>' --base-model ./sd15 --steps 800

Local mode writes ``<out>.safetensors`` (the concept package: LoRA + embeddings, never the
photos), ``<out>.samples.png`` (validation samples at LoRA scale 0, 0.7 and 1.0 for three
prompts: the paper's sanity view) and ``<out>.loss.png``. Every input is checked before
any work starts; on an error nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from PIL import Image

from ..common.base import TINY, BaseModel, BaseModelError, load_base_model
from ..common.cli import UsageError, default_class_word, resolve_device, run_command
from ..common.concepts import ConceptError, parse_concept_name
from ..common.config import TrainConfig
from ..common.edlora import class_word_id
from ..common.images import image_grid, loss_curve
from ..common.package import PackageError
from ..common.pipeline import MixOfShowPipeline
from ..common.presets import load_preset
from ..common.settings import SettingsError, add_options, given
from .data import PhotoFolderError, load_photo_folder
from .trainer import train_concept

log = logging.getLogger("mos.client")

VALIDATION_PROMPTS = ("a photo of a {}", "a {} on the beach", "a {} in the snow")
VALIDATION_SCALES = (0.0, 0.7, 1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mos-client",
        description="Tune an ED-LoRA concept on your photos and write a concept package "
        "(only LoRA weights and embeddings; your photos never leave this machine).",
        epilog="Fetch the server's latest fused model at any time: mos-client pull --hub "
        "HOST:PORT (see mos-client pull --help).",
    )
    p.add_argument("--data", type=Path, help="folder of photos (jpg/png/webp)")
    p.add_argument(
        "--package",
        type=Path,
        help="with --superlink: send this ready concept package (e.g. from mos-import) "
        "instead of tuning on photos",
    )
    p.add_argument("--concept", help="concept name, e.g. '<dog1>' or dog1")
    p.add_argument("--class-word", help="one-token class word (default: the name without digits)")
    p.add_argument(
        "--base-model",
        help="tiny | diffusers folder | .safetensors | hub id (local default: tiny; with "
        "--superlink: the server's)",
    )
    p.add_argument(
        "--base-config", help="local diffusers folder with the configs of a single-file checkpoint"
    )
    tuning = p.add_argument_group(
        "tuning (with --superlink the server sets these; see the run config)"
    )
    tuning.add_argument(
        "--preset", help="a named set of tuning settings beneath the options given (e.g. toy)"
    )
    add_options(tuning, TrainConfig)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", type=Path, help="package file (default: ./<name>.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing package file")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad photos with a warning")
    p.add_argument("--no-samples", action="store_true", help="skip the validation sample grid")
    p.add_argument("--sample-steps", type=int, default=25, help="sampler steps for the grid")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    fed = p.add_argument_group("federation")
    fed.add_argument("--superlink", metavar="HOST:PORT", help="join this server's federation")
    fed.add_argument("--root-certificates", type=Path, help="CA certificate of a TLS SuperLink")
    fed.add_argument("--insecure", action="store_true", help="the SuperLink has no TLS")
    fed.add_argument(
        "--auth-private-key", type=Path, help="this SuperNode's private key (authentication)"
    )
    fed.add_argument(
        "--trusted-entities",
        type=Path,
        help="YAML of Ed25519 publisher keys: run only app bundles signed by one of them "
        "(Flower's --trusted-entities; see deploy/README.md)",
    )
    fed.add_argument(
        "--model-dir", type=Path, help="where fused models are stored (default ./<name>-model)"
    )
    fed.add_argument(
        "--max-wait", type=float, default=600, help="seconds to keep retrying the SuperLink"
    )
    fed.add_argument("--stay", action="store_true", help="keep serving after the final round")
    fed.add_argument(
        "--rejoin",
        type=int,
        default=3,
        help="start a new SuperNode this many times if one ends before the final round "
        "(e.g. the server restarted) and the SuperLink is back within a minute",
    )
    fed.add_argument(
        "--threads",
        type=int,
        help="CPU threads for tuning (default: half the cores, so that a server and "
        "clients sharing a machine do not oversubscribe it)",
    )
    fed.add_argument("--clientappio-port", type=int, help="local port for Flower (default: free)")
    fed.add_argument("--test-fault", help=argparse.SUPPRESS)  # fault injection for tests
    return p


def resolve_class_word(base: BaseModel, name: str, given: str | None) -> str:
    word = given if given is not None else default_class_word(name)
    if not word:
        raise UsageError(f"cannot guess a class word from {name!r}: pass --class-word (e.g. dog)")
    try:
        class_word_id(base, word)
    except ConceptError as err:
        hint = "" if given else f" (guessed from the concept name {name!r}); pass --class-word"
        raise UsageError(f"{err}{hint}") from err
    return word


def run(args: argparse.Namespace) -> Path:
    if args.package is not None and args.data is not None:
        raise UsageError("give --data (photos to tune on) or --package (a ready package), not both")
    if args.package is not None and not args.superlink:
        raise UsageError(
            "--package is sent to a federation: add --superlink HOST:PORT (to fuse packages "
            "offline, use mos-fuse --concepts)"
        )
    if args.data is None and args.package is None:
        raise UsageError("--data: the folder of photos to tune on is needed")
    if args.concept is None and args.package is None:
        raise UsageError("--concept: the concept's name is needed, e.g. '<dog1>'")
    if args.superlink:
        from .join import run_supernode

        args.base_model_for_node = args.base_model
        return run_supernode(args)
    args.base_model = args.base_model or TINY
    try:
        name = parse_concept_name(args.concept)
    except ConceptError as err:
        raise UsageError(str(err)) from err
    try:
        config = load_preset(args.preset).train_config(**given(args, TrainConfig))
    except SettingsError as err:
        raise UsageError(str(err)) from err
    out = args.out or Path(f"{name}.safetensors")
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: a concept package file must end in .safetensors")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it or choose another --out")
    device = resolve_device(args.device)

    photos = load_photo_folder(args.data, skip_bad=args.skip_bad)
    log.info("%d photo(s) from %s", len(photos), args.data)
    base = load_base_model(args.base_model, config=args.base_config)
    class_word = resolve_class_word(base, name, args.class_word)
    base.to(device)
    log.info(
        "tuning <%s> (class word %r, %s, %d steps, batch %d, %d px) on %s",
        name,
        class_word,
        config.method,
        config.steps,
        config.batch_size,
        config.resolution or base.default_resolution,
        device,
    )
    result = train_concept(base, photos, name, class_word, config, progress=not args.quiet)
    package = result.package
    package.save(out)
    log.info(
        "wrote %s (%.1f s, final loss %.4f)", out, result.seconds, package.metrics["final_loss"]
    )
    stem = out.with_suffix("")
    loss_curve(result.losses, f"{package.concept.token} training loss").save(f"{stem}.loss.png")
    if not args.no_samples:
        grid = validation_grid(
            base, result.concepts, package.concept.token, args.sample_steps, config.seed
        )
        grid.save(f"{stem}.samples.png")
        log.info("wrote %s.samples.png (rows: prompts; columns: LoRA scale 0, 0.7, 1.0)", stem)
    return out


def validation_grid(base, concepts, token: str, steps: int, seed: int):
    """Samples for three prompts at LoRA scale 0 (embedding only), 0.7 and 1.0."""
    pipe = MixOfShowPipeline.from_base(base, concepts)
    prompts = [p.format(token) for p in VALIDATION_PROMPTS]
    rows = []
    for prompt in prompts:
        row: list[Image.Image] = []
        for scale in VALIDATION_SCALES:
            gen = torch.Generator().manual_seed(seed)
            row += pipe(prompt, num_inference_steps=steps, generator=gen, lora_scale=scale)
        rows.append(row)
    return image_grid(rows, prompts, [f"LoRA scale {s}" for s in VALIDATION_SCALES])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["pull"]:  # mos-client pull --hub HOST:PORT ...
        from .pull import main as pull_main

        return pull_main(args[1:])
    return run_command(
        "mos-client",
        build_parser(),
        run,
        (PhotoFolderError, BaseModelError, ConceptError, PackageError),
        argv,
        interrupted="interrupted (a package is only ever written whole)",
    )


if __name__ == "__main__":
    sys.exit(main())
