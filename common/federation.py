"""What the ServerApp and the ClientApp agree on: the run config, record names, and the
Flower app definition (``[tool.flwr.app]``) that ``mos-server`` and ``mos-simulate`` submit.

The run-config defaults live here once; ``pyproject.toml``'s ``[tool.flwr.app.config]``
must equal ``RUN_CONFIG_DEFAULTS`` (a test checks it), so ``flwr run .`` from a clone and
``mos-server`` behave the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel as _Model
from pydantic import ConfigDict, Field, ValidationError

from .config import TrainConfig

# Message contents (RecordDict keys)
TRAIN_CONFIG = "config"  # ConfigRecord, server -> client
PACKAGE = "package"  # ArrayRecord, client -> server
MANIFEST = "manifest"  # ConfigRecord, client -> server
METRICS = "metrics"  # MetricRecord, client -> server
REFUSAL = "refusal"  # ConfigRecord {"reason": ...}, client -> server
FUSED = "fused"  # ArrayRecord, server -> client
FUSED_META = "fused-meta"  # ConfigRecord, server -> client

RUN_CONFIG_DEFAULTS: dict[str, str | int | float | bool] = {
    "strategy": "gradient-fusion",
    "base-model": "tiny",
    "base-config": "",
    "rounds": 1,
    "min-clients": 2,
    "wait-clients-s": 300,
    "round-timeout-s": 3600,
    "state-dir": "",
    "device": "auto",
    "steps": 200,
    "batch-size": 2,
    "resolution": 0,
    "rank": 4,
    "conv-rank": 0,
    "lr-embedding": 1e-3,
    "lr-text": 1e-5,
    "lr-unet": 1e-4,
    "flip-p": 0.5,
    "seed": 0,
    "fusion-mode": "independent",
    "fusion-steps": 20,
    "fusion-resolution": 0,
    "report": True,
    "max-package-mb": 64,
    "data-root": "",
    "client-root": "",
}

DEFAULT_STATE_DIR = "~/.mos/server-state"


class SettingsError(ValueError):
    """A run or node config value is wrong; the message names the key."""


class RunSettings(_Model):
    """The run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    strategy: Literal["gradient-fusion", "weight-fusion"] = "gradient-fusion"
    base_model: str = Field("tiny", alias="base-model", min_length=1)
    base_config: str = Field("", alias="base-config")
    rounds: int = Field(1, ge=1, le=1000)
    min_clients: int = Field(2, ge=1, alias="min-clients")
    wait_clients_s: float = Field(300, ge=0, alias="wait-clients-s")
    round_timeout_s: float = Field(3600, gt=0, alias="round-timeout-s")
    state_dir: str = Field("", alias="state-dir")
    device: str = "auto"
    steps: int = Field(200, ge=1)
    batch_size: int = Field(2, ge=1, alias="batch-size")
    resolution: int = Field(0, ge=0, description="0: the base's native")
    rank: int = Field(4, ge=1, le=256)
    conv_rank: int = Field(0, ge=0, le=256, alias="conv-rank")
    lr_embedding: float = Field(1e-3, ge=0, alias="lr-embedding")
    lr_text: float = Field(1e-5, ge=0, alias="lr-text")
    lr_unet: float = Field(1e-4, ge=0, alias="lr-unet")
    flip_p: float = Field(0.5, ge=0, le=1, alias="flip-p")
    seed: int = Field(0, ge=0)
    fusion_mode: Literal["sequential", "independent"] = Field("independent", alias="fusion-mode")
    fusion_steps: int = Field(20, ge=1, alias="fusion-steps")
    fusion_resolution: int = Field(0, ge=0, alias="fusion-resolution")
    report: bool = True
    max_package_mb: float = Field(64, gt=0, alias="max-package-mb")
    data_root: str = Field("", alias="data-root")
    client_root: str = Field("", alias="client-root")

    @classmethod
    def from_run_config(cls, run_config: dict) -> RunSettings:
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise SettingsError(_errors(err, "run config")) from err

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            resolution=self.resolution or None,
            rank=self.rank,
            conv_rank=self.conv_rank,
            lr_embedding=self.lr_embedding,
            lr_text_lora=self.lr_text,
            lr_unet_lora=self.lr_unet,
            flip_p=self.flip_p,
            seed=self.seed,
        )

    def state_path(self) -> Path:
        return Path(self.state_dir or DEFAULT_STATE_DIR).expanduser().resolve()

    @property
    def max_package_bytes(self) -> int:
        return int(self.max_package_mb * (1 << 20))


def _errors(err: ValidationError, what: str) -> str:
    return f"{what}: " + "; ".join(
        f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()
    )


def toml_value(v: str | int | float | bool) -> str:
    """A TOML literal (JSON strings are valid TOML basic strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def render_app_pyproject(
    overrides: dict[str, str | int | float | bool] | None = None,
) -> str:
    """The ``pyproject.toml`` of the Flower app bundle that ``mos-server`` submits.

    The bundle holds only this file and a README: the ServerApp and ClientApp are the
    installed ``mos`` package on each machine, never code the server ships (so a SuperNode
    runs the code its operator installed). No weights or images ever go in it.
    """
    config = {**RUN_CONFIG_DEFAULTS, **(overrides or {})}
    lines = [
        "[project]",
        'name = "mix-of-show-flower"',
        'version = "0.1.0"',
        'description = "Mix-of-Show on Flower (app bundle written by mos-server)"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "mix-of-show"',
        'fab-include = ["/README.md"]',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "mos.server.server_app:app"',
        'clientapp = "mos.client.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml_value(v)}" for k, v in config.items()),
        "",
    ]
    return "\n".join(lines)


def write_app_dir(folder: Path, overrides: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(render_app_pyproject(overrides))
    (folder / "README.md").write_text(
        "Flower app bundle of mix-of-show-flower, written by mos-server / mos-simulate.\n"
        "Its ServerApp and ClientApp are the installed `mos` package.\n"
    )
    return folder
