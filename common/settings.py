"""Settings are pydantic fields, each defined once with its default, range and help text;
command-line options and Flower run-config keys are derived from them here.

- ``add_options(parser, Model)`` adds ``--field-name`` for every field of ``Model`` (type,
  choices and help from the field; the default shown is the model's). An option left out
  stays ``None`` in the namespace, so the model's default applies.
- ``given(args, Model)`` collects the options a user gave, ``build(Model, values)`` makes
  the model and turns a validation error into one message that names the option.
- ``run_config_keys(Model, prefix)`` / ``to_run_config`` / ``from_run_config`` map the same
  fields to the flat ``[tool.flwr.app.config]`` table (``prefix`` + ``field-name``).

Adding a setting is one field on its model: every command and the run config follow.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

Model = TypeVar("Model", bound=BaseModel)
RunConfigValue = str | int | float | bool


class SettingsError(ValueError):
    """A setting has a bad value; the message names the option or key."""


def option(field: str, prefix: str = "") -> str:
    """``lr_text`` -> ``--lr-text`` (with ``prefix`` ``fusion-``: ``--fusion-lr-text``)."""
    return "--" + key(field, prefix)


def key(field: str, prefix: str = "") -> str:
    """A field's name in the run config and on the command line, without the dashes."""
    return prefix + field.replace("_", "-")


def dest(field: str, prefix: str = "") -> str:
    return key(field, prefix).replace("-", "_")


def validation_message(err: ValidationError, name: Callable[[str], str] = option) -> str:
    """One line for every problem: ``--steps: Input should be greater than or equal to 1``."""
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        where = name(loc[0]) + "".join(f"[{x}]" for x in loc[1:]) if loc else "settings"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def build(
    model: type[Model], values: Mapping[str, Any], name: Callable[[str], str] = option
) -> Model:
    """``model(**values)``; a bad value raises ``SettingsError`` naming it with ``name``."""
    try:
        return model(**values)
    except ValidationError as err:
        raise SettingsError(validation_message(err, name)) from err


def _unwrap(annotation: Any) -> Any:
    """The type without ``None`` (``int | None`` -> ``int``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _scalar(annotation: Any) -> bool:
    kind = _unwrap(annotation)
    return typing.get_origin(kind) is Literal or kind in (str, int, float, bool)


def scalar_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields a TOML scalar can hold (the run config has no lists or tables)."""
    return {n: f for n, f in model.model_fields.items() if _scalar(f.annotation)}


def _default(f: FieldInfo) -> Any:
    return None if f.is_required() else f.get_default(call_default_factory=True)


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    prefix: str = "",
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> None:
    """One option per field of ``model`` (see the module docstring), or per field in
    ``only`` less those in ``exclude``."""
    skip, keep = set(exclude), None if only is None else set(only)
    for name, f in model.model_fields.items():
        if name in skip or (keep is not None and name not in keep):
            continue
        kind = _unwrap(f.annotation)
        default = _default(f)
        text = f.description or ""
        shown = " ".join(map(repr, default)) if isinstance(default, tuple) else default
        shown = "none" if shown == "" else shown
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
        kwargs: dict[str, Any] = {"dest": dest(name, prefix), "default": None, "help": text}
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="TEXT")
        elif kind in (int, float, str):
            kwargs["type"] = kind
        else:
            raise TypeError(f"{model.__name__}.{name}: no command-line form for {kind!r}")
        parser.add_argument(option(name, prefix), **kwargs)


def given(
    args: argparse.Namespace,
    model: type[BaseModel],
    prefix: str = "",
    exclude: Iterable[str] = (),
) -> dict[str, Any]:
    """The fields of ``model`` that were given on the command line (``add_options``), less
    those in ``exclude`` (options of the same name that are not the setting)."""
    out = {}
    for name in model.model_fields:
        if name in exclude:
            continue
        value = getattr(args, dest(name, prefix), None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def run_config_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """``{run-config key: field name}`` for the scalar fields of ``model``."""
    return {key(name, prefix): name for name in scalar_fields(model)}


def to_run_config(settings: BaseModel, prefix: str = "") -> dict[str, RunConfigValue]:
    """The scalar fields of ``settings`` as run-config values."""
    out: dict[str, RunConfigValue] = {}
    for name in scalar_fields(type(settings)):
        value = getattr(settings, name)
        if value is None:
            raise SettingsError(f"{key(name, prefix)}: None has no run-config form")
        out[key(name, prefix)] = value
    return out
