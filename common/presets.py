"""Named presets: a set of tuning and fusion settings under one name (``--preset NAME``).

A preset is one ``Preset`` object: values for some ``TrainConfig`` and ``FusionConfig``
fields, checked against the models when it is loaded. Presets are installed under a name
in the ``mos.presets`` entry-point group (each entry point a function that returns a
``Preset``); this package installs ``toy`` and ``toy-locon`` (``mos.toyworld.evaluate``).
On every command a preset's values sit beneath the options given: ``--preset toy-locon
--steps 50`` tunes 50 steps with the rest of ``toy-locon``. ``mos-server`` and
``mos-simulate`` resolve a preset into run-config values before submitting the run, so a
client never needs the preset installed.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel as _Model
from pydantic import ConfigDict, Field, model_validator

from .config import FusionConfig, TrainConfig
from .settings import SettingsError, build

PRESETS_GROUP = "mos.presets"


class Preset(_Model):
    """Values for some tuning (``train``) and fusion (``fusion``) settings, by field name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1)
    train: dict[str, Any] = Field(default_factory=dict)
    fusion: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_settings(self) -> Preset:
        build(TrainConfig, self.train, lambda f: f"train.{f}")
        build(FusionConfig, self.fusion, lambda f: f"fusion.{f}")
        return self

    def train_config(self, **given: Any) -> TrainConfig:
        """The preset's tuning settings under ``given`` ones."""
        return build(TrainConfig, {**self.train, **given})

    def fusion_config(self, **given: Any) -> FusionConfig:
        """The preset's fusion settings under ``given`` ones."""
        return build(FusionConfig, {**self.fusion, **given})


NO_PRESET = Preset(description="the project's defaults (docs/method.md)")


def named_presets() -> dict[str, Any]:
    """The installed presets' entry points, by name."""
    return {ep.name: ep for ep in entry_points(group=PRESETS_GROUP)}


def load_preset(name: str | None) -> Preset:
    """The preset installed as ``name`` (``None`` or ``""``: no preset, the defaults)."""
    if not name:
        return NO_PRESET
    presets = named_presets()
    if name not in presets:
        known = ", ".join(sorted(presets)) or "none"
        raise SettingsError(f"--preset {name}: no such preset (installed: {known})")
    preset = presets[name].load()()
    if not isinstance(preset, Preset):
        raise SettingsError(f"--preset {name}: the installed entry point gives no Preset")
    return preset
