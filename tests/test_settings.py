"""Each setting is one pydantic field; the CLIs and the run config are derived from it."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from mos.client.cli import build_parser as client_parser
from mos.common import federation as fed
from mos.common.config import FusionConfig, TrainConfig
from mos.common.settings import (
    SettingsError,
    add_options,
    build,
    given,
    option,
    run_config_keys,
    scalar_fields,
)
from mos.server.cli import SERVER_OPTIONS
from mos.server.cli import build_parser as fuse_parser
from mos.server.launch import server_parser, simulate_parser


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10, ge=1, description="how many")
    lr: float = Field(0.5, gt=0)
    mode: Literal["a", "b"] = "a"
    on: bool = True
    words: tuple[str, ...] = ("x", "y")
    name: str = ""


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_options(p, Example, prefix="ex-")
    return p.parse_args(argv)


def test_options_left_out_take_the_models_defaults_and_given_ones_are_typed():
    assert build(Example, given(_parse([]), Example, "ex-")) == Example()
    args = _parse(["--ex-steps", "3", "--ex-lr", "0.1", "--ex-mode", "b", "--no-ex-on"]
                  + ["--ex-words", "p", "q", "r", "--ex-name", "n"])  # fmt: skip
    got = build(Example, given(args, Example, "ex-"))
    assert got == Example(steps=3, lr=0.1, mode="b", on=False, words=("p", "q", "r"), name="n")


def test_help_shows_each_fields_description_and_default():
    p = argparse.ArgumentParser()
    add_options(p, Example)
    text = p.format_help()
    assert "how many (default: 10)" in text
    assert "{a,b}" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_a_bad_value_is_one_message_naming_the_option():
    with pytest.raises(
        SettingsError, match=r"^--steps: Input should be greater than or equal to 1"
    ):
        build(Example, {"steps": 0})
    with pytest.raises(SettingsError, match=r"--ex-lr: .*; --ex-mode: "):
        build(Example, {"lr": 0, "mode": "c"}, name=lambda f: option(f, "ex-"))


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


def test_every_training_setting_is_an_option_of_each_command_and_a_run_config_key():
    for parser in (client_parser(), server_parser(), simulate_parser()):
        assert set(TrainConfig.model_fields) <= _dests(parser)
    assert set(run_config_keys(TrainConfig)) <= set(fed.RUN_CONFIG_DEFAULTS)
    # the run config's value is the field's default (one default per setting)
    for key, name in run_config_keys(TrainConfig).items():
        assert fed.RUN_CONFIG_DEFAULTS[key] == TrainConfig.model_fields[name].default


def test_every_fusion_setting_is_an_option_of_mos_fuse_and_the_servers():
    assert set(FusionConfig.model_fields) <= _dests(fuse_parser())
    scalars = set(scalar_fields(FusionConfig))
    for parser in (server_parser(), simulate_parser()):
        assert {f"fusion_{n}" for n in scalars} <= _dests(parser)
    for key, name in run_config_keys(FusionConfig, fed.FUSION_PREFIX).items():
        assert fed.RUN_CONFIG_DEFAULTS[key] == FusionConfig.model_fields[name].default
    assert set(SERVER_OPTIONS) <= _dests(fuse_parser())


def test_run_config_is_exactly_the_three_models_scalar_fields():
    keys = (
        set(run_config_keys(fed.ServerSettings))
        | set(run_config_keys(TrainConfig))
        | set(run_config_keys(FusionConfig, fed.FUSION_PREFIX))
    )
    assert keys == set(fed.RUN_CONFIG_DEFAULTS)
    s = fed.RunSettings.from_run_config({"lr-text": 3e-4, "fusion-mode": "independent"})
    assert s.train.lr_text == 3e-4 and s.fusion.mode == "independent"
    assert s.to_run_config() == {**fed.RUN_CONFIG_DEFAULTS, "lr-text": 3e-4,
                                 "fusion-mode": "independent"}  # fmt: skip


def test_mos_client_builds_its_train_config_from_the_fields(tmp_path):
    args = client_parser().parse_args(
        ["--data", str(tmp_path), "--concept", "dog1", "--lr-text", "2e-4", "--no-mask-loss"]
    )
    config = build(TrainConfig, given(args, TrainConfig))
    assert config == TrainConfig(lr_text=2e-4, mask_loss=False)


# --- presets ---------------------------------------------------------------------------
def test_a_preset_is_one_object_beneath_the_options_given(tmp_path):
    from mos.common.presets import Preset, load_preset
    from mos.toyworld.evaluate import TOY_LOCON, TOY_TRAINING

    preset = load_preset("toy-locon")
    assert preset.train_config() == TrainConfig(**{**TOY_TRAINING, **TOY_LOCON})
    assert preset.train_config(steps=5).steps == 5
    assert load_preset("") == load_preset(None) and load_preset("").train_config() == TrainConfig()
    with pytest.raises(SettingsError, match="no such preset.*toy-locon"):
        load_preset("nope")
    with pytest.raises(ValueError, match="stepz"):
        Preset(description="a typo", train={"stepz": 1})
    with pytest.raises(ValueError, match="fusion.ridge"):
        Preset(description="out of range", fusion={"ridge": -1})


def test_every_command_takes_a_preset_and_the_servers_resolve_it_into_the_run_config(tmp_path):
    from mos.common.cli import UsageError
    from mos.server.launch import _overrides

    args = client_parser().parse_args(
        ["--data", str(tmp_path), "--concept", "dog1", "--preset", "toy", "--lr-unet", "2e-3"]
    )
    from mos.common.presets import load_preset

    config = load_preset(args.preset).train_config(**given(args, TrainConfig))
    assert (config.lr_text, config.lr_unet, config.flip_p) == (1e-4, 2e-3, 0.0)
    values = _overrides(server_parser().parse_args(["--preset", "toy-locon", "--conv-rank", "4"]))
    s = fed.RunSettings.from_run_config(values)
    assert (s.train.steps, s.train.conv_rank, s.train.lr_text) == (1000, 4, 1e-4)
    with pytest.raises(UsageError, match="no such preset"):
        _overrides(server_parser().parse_args(["--preset", "nope"]))
    assert "preset" in _dests(fuse_parser())


def test_the_deployment_kits_commands_use_options_that_exist():
    import shlex
    from pathlib import Path

    import yaml

    from mos.client.cli import build_parser as mos_client_parser

    root = Path(__file__).resolve().parents[1]
    service = (root / "deploy/systemd/mos-server.service").read_text().replace("\\\n", " ")
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    commands = [shlex.split(exec_start.partition("=")[2])]
    compose = yaml.safe_load((root / "deploy/compose.yaml").read_text())
    commands += [shlex.split(s["command"]) for s in compose["services"].values() if "command" in s]
    parsers = {"mos-server": server_parser, "mos-client": mos_client_parser}
    checked = 0
    for cmd in commands:
        name = Path(cmd[0]).name
        if name in parsers:
            parsers[name]().parse_args(cmd[1:])  # exits (fails the test) on an unknown option
            checked += 1
    assert checked >= 2
