"""What the ServerApp and the ClientApp agree on: the run config, record names, and the
Flower app definition (``[tool.flwr.app]``) that ``mos-server`` and ``mos-simulate`` submit.

The run config is flat (Flower's ``[tool.flwr.app.config]`` holds scalars): the server's
own settings (``ServerSettings``), every training setting under its ``TrainConfig`` name
(``steps``, ``lr-text``, ...) and every fusion setting with a ``fusion-`` prefix
(``fusion-mode``, ...). ``RUN_CONFIG_DEFAULTS`` is derived from the three models;
``pyproject.toml``'s table must equal it (a test checks it), so ``flwr run .`` from a
clone and ``mos-server`` behave the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel as _Model
from pydantic import ConfigDict, Field

from .config import FusionConfig, TrainConfig
from .settings import SettingsError, build, key, run_config_keys, to_run_config

FUSION_PREFIX = "fusion-"

# Message contents (RecordDict keys)
TRAIN_CONFIG = "config"  # ConfigRecord, server -> client
PACKAGE = "package"  # ArrayRecord, client -> server
MANIFEST = "manifest"  # ConfigRecord, client -> server
METRICS = "metrics"  # MetricRecord, client -> server
REFUSAL = "refusal"  # ConfigRecord {"reason": ...}, client -> server
FUSED = "fused"  # ArrayRecord, server -> client
FUSED_META = "fused-meta"  # ConfigRecord, server -> client

__all__ = ["RunSettings", "ServerSettings", "SettingsError", "RUN_CONFIG_DEFAULTS"]


class ServerSettings(_Model):
    """The server's own run-config settings (``mos-server`` / ``mos-simulate`` options)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["gradient-fusion", "weight-fusion"] = Field(
        "gradient-fusion", description="how the server merges the concepts"
    )
    base_model: str = Field(
        "tiny", min_length=1, description="tiny | toy | diffusers folder | .safetensors | hub id"
    )
    base_config: str = Field(
        "", description="local diffusers folder with the configs of a single-file checkpoint"
    )
    rounds: int = Field(1, ge=1, le=1000, description="federated rounds")
    min_clients: int = Field(2, ge=1, description="clients each round waits for")
    wait_clients: float = Field(300, ge=0, description="seconds to wait for --min-clients")
    round_timeout: float = Field(3600, gt=0, description="seconds a round may take")
    state_dir: str = Field(
        "~/.mos/server-state",
        min_length=1,
        description="the registry: accepted packages, fusion statistics, fused models",
    )
    device: str = Field("auto", description="where the server fuses: auto | cpu | cuda | cuda:N")
    report: bool = Field(True, description="measure each concept's fidelity after fusion")
    compare: bool = Field(
        False, description="the report also fuses with the other strategy, for comparison"
    )
    max_package_mb: float = Field(64, gt=0, description="largest package accepted, in MiB")
    data_root: str = Field("", description="simulation: one photo folder per virtual client")
    client_root: str = Field("", description="simulation: where the clients' models go")


def _run_config_layout() -> dict[str, tuple[str, str]]:
    """``{run-config key: (section, field)}``; sections: server, train, fusion."""
    layout: dict[str, tuple[str, str]] = {}
    for section, model, prefix in (
        ("server", ServerSettings, ""),
        ("train", TrainConfig, ""),
        ("fusion", FusionConfig, FUSION_PREFIX),
    ):
        for k, name in run_config_keys(model, prefix).items():
            if k in layout:
                raise RuntimeError(f"run-config key {k!r} is defined twice")
            layout[k] = (section, name)
    return layout


RUN_CONFIG_LAYOUT = _run_config_layout()


class RunSettings(_Model):
    """The run config, read into its three models."""

    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Validate a flat run config; a bad or unknown key raises ``SettingsError``."""
        sections: dict[str, dict[str, Any]] = {"server": {}, "train": {}, "fusion": {}}
        unknown = sorted(k for k in run_config if k not in RUN_CONFIG_LAYOUT)
        if unknown:
            raise SettingsError(f"run config: unknown key(s) {', '.join(unknown)}")
        for k, v in run_config.items():
            section, name = RUN_CONFIG_LAYOUT[k]
            sections[section][name] = v
        try:
            return cls(
                server=build(ServerSettings, sections["server"], key),
                train=build(TrainConfig, sections["train"], key),
                fusion=build(FusionConfig, sections["fusion"], partial(key, prefix=FUSION_PREFIX)),
            )
        except SettingsError as err:
            raise SettingsError(f"run config: {err}") from err

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        return {
            **to_run_config(self.server),
            **to_run_config(self.train),
            **to_run_config(self.fusion, FUSION_PREFIX),
        }

    def state_path(self) -> Path:
        return Path(self.server.state_dir).expanduser().resolve()

    @property
    def max_package_bytes(self) -> int:
        return int(self.server.max_package_mb * (1 << 20))


RUN_CONFIG_DEFAULTS: dict[str, str | int | float | bool] = RunSettings().to_run_config()


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


if __name__ == "__main__":  # the [tool.flwr.app.config] table for pyproject.toml
    print("\n".join(f"{k} = {toml_value(v)}" for k, v in RUN_CONFIG_DEFAULTS.items()))
