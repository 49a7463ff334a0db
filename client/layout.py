"""The client's model folder, and the simulation's per-client photo folder.

A client's model folder (``mos-client --model-dir``, default ``./<name>-model``)::

    package.safetensors   this client's own concept package (never its photos)
    package.json          what the package was tuned from (reused when nothing changed)
    fused/v<N>.safetensors, fused/v<N>/   fused models received or pulled
    latest.json           the fused model in use: version, file, SHA-256, concepts
    DONE                  written once the server's final round has delivered its model

A simulation client's photo folder may hold ``.mos-client.json``:
``{"concept": ..., "class_word": ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..common.files import atomic_write
from ..common.fused import FusedModel

PACKAGE_FILE = "package.safetensors"
PACKAGE_INFO = "package.json"
FUSED_DIR = "fused"
LATEST = "latest.json"
DONE = "DONE"
CLIENT_FILE = ".mos-client.json"


def write_latest(model_dir: Path, version: int, path: Path, sha256: str, fused: FusedModel) -> None:
    """Point ``model_dir/latest.json`` at a stored fused model (atomically)."""
    text = json.dumps(
        {
            "version": version,
            "file": str(path),
            "sha256": sha256,
            "strategy": fused.strategy,
            "concepts": [c.token for c in fused.concepts],
            "base_fingerprint": fused.base_fingerprint,
        },
        indent=2,
    )
    atomic_write(model_dir / LATEST, lambda tmp: Path(tmp).write_text(text))
