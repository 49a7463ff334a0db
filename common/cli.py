"""What every ``mos-*`` command shares: logging set-up and turning known errors into
one-line messages with exit status 2 (130 on Ctrl-C), never a traceback."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from pydantic import BaseModel

from .settings import SettingsError, build

Config = TypeVar("Config", bound=BaseModel)


class UsageError(Exception):
    """A problem with the command line or its inputs; printed without a traceback."""


def config_from(cls: type[Config], **fields: object) -> Config:
    """Build a settings model; a bad value becomes a ``UsageError`` naming the option."""
    try:
        return build(cls, fields)
    except SettingsError as err:
        raise UsageError(str(err)) from err


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    errors: tuple[type[BaseException], ...],
    argv: list[str] | None = None,
    interrupted: str = "interrupted",
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM (systemd, kill) both unwind through `finally`, which ends every
    # child process. SIGINT is set explicitly: a process started in the background of a
    # shell script inherits it ignored, and Python then never raises KeyboardInterrupt.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    known: tuple[type[BaseException], ...] = (UsageError, *errors)
    try:
        run(args)
    except known as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    finally:
        if in_main:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU; checks explicit ones."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"--device {spec!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA GPU is available here (use --device cpu)")
    return device


def default_class_word(name: str) -> str:
    """``dog1`` -> ``dog``: the concept name without its trailing digits."""
    return re.sub(r"[\d_-]+$", "", name)


def setup_logging() -> None:
    """Our log lines on stderr inside Flower's app processes (which configure only theirs)."""
    root = logging.getLogger("mos")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO)
