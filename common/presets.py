"""Named presets: a set of tuning and fusion settings under one name (``--preset NAME``).

A preset is one ``Preset`` object: values for some ``TrainConfig`` and ``FusionConfig``
fields, checked against the models when it is loaded. Presets are installed under a name
in the ``mos.presets`` entry-point group (each entry point a function that returns a
``Preset``); this package installs ``paper`` and ``paper-object`` (the authors' recipes,
below) and ``toy``, ``toy-paper`` and ``toy-locon`` (``mos.toyworld.evaluate``).
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

# The authors' fusion, point by point (docs/method.md, "The paper preset"): the text stage
# on the unpadded prompt, keys/values on the concept tokens and the end token, plain least
# squares (a ridge toward the base weights of 1e-6 of the mean Gram eigenvalue: only what
# the numerics of rank-deficient Gram matrices need).
PAPER_FUSION: dict[str, Any] = {
    "mode": "sequential",
    "text_positions": "prompt",
    "kv_positions": "concept+eos",
    "ridge": 1e-6,
    "ridge_target": "base",
    "steps": 20,
}
# The authors' ED-LoRA for people and other subjects (their characters' configs): 1000
# steps at batch 4, the subject placed at random on a canvas (loss on the photo only), the
# human caption templates, no flips, no kv-drop, the linear attention regularisation.
PAPER_TRAINING: dict[str, Any] = {
    "method": "edlora",
    "steps": 1000,
    "batch_size": 4,
    "rank": 4,
    "lr_embedding": 1e-3,
    "lr_text": 1e-5,
    "lr_unet": 1e-4,
    "embedding_norm_threshold": 0.55,
    "noise_offset": 0.01,
    "augment": "canvas",
    "canvas_scale": 1.0,
    "caption_templates": "human",
    "flip_p": 0.0,
    "kv_dropout": 0.0,
    "attention_reg_form": "linear",
    "attention_reg_weight": 0.01,
    "mask_loss": True,
}
# Their objects and pets: 500 steps at batch 2, a random crop, the object templates, the
# attn2 k/v LoRA branch dropped with p = 0.2.
PAPER_OBJECT_TRAINING: dict[str, Any] = {
    **PAPER_TRAINING,
    "steps": 500,
    "batch_size": 2,
    "augment": "crop",
    "caption_templates": "object",
    "kv_dropout": 0.2,
    "kv_dropout_mode": "lora",
}


def paper_preset() -> Preset:
    """``--preset paper``: the authors' recipe for people and subjects, and their fusion."""
    return Preset(
        description="the authors' ED-LoRA for subjects (1000 x 4, canvas augmentation, "
        "templates) and their fusion (unpadded text, concept+EOS k/v, least squares)",
        train=PAPER_TRAINING,
        fusion=PAPER_FUSION,
    )


def paper_object_preset() -> Preset:
    """``--preset paper-object``: the authors' recipe for objects and pets, their fusion."""
    return Preset(
        description="the authors' ED-LoRA for objects (500 x 2, random crop, templates, "
        "kv-drop 0.2 on the k/v LoRA) and their fusion",
        train=PAPER_OBJECT_TRAINING,
        fusion=PAPER_FUSION,
    )


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
