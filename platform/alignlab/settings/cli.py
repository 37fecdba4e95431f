"""Command-line flags derived from a pydantic settings model, so a command and the spec step that runs the same
operation cannot drift apart: the model is the one definition of names, types, defaults and help.

`add_settings_arguments(parser, FilterSettings)` adds `--min-complexity` (int), `--stages` (comma-separated
list), `--format` (choices), ... with the model's description and default in the help; a flag left out stays
out of the parsed values, so the model fills its own default. A nested model (`concepts`) gets flags with a
prefix (`--concepts-epochs`) unless `flags` renames them. `settings_from_args` builds the model and turns a
validation error into one line naming the flag.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from alignlab.config import ConfigError


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"img_size\": 64}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"img_size\": 64}'")
    return value


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _argument(annotation) -> dict[str, Any]:
    """argparse keyword arguments (type, choices, action) for a field's annotation."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        values = typing.get_args(annotation)
        return {"type": type(values[0]), "choices": values}
    if origin is list:
        return {"type": _comma_list, "metavar": "A,B,..."}
    if origin is dict or annotation is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line flag for a field of type {annotation!r}")


def _fields(model: type[BaseModel], prefix: str = ""):
    """(dotted name, field info) of every leaf field; nested models are walked."""
    for name, info in model.model_fields.items():
        inner = _unwrap_optional(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield from _fields(inner, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *,
                           flags: dict[str, str] | None = None, positional: tuple[str, ...] = (),
                           skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Add one flag per field of `model` (`data_root` -> `--data-root`; `flags` renames, e.g.
    {"concepts.epochs": "--concept-epochs"}); fields in `positional` become positional arguments, fields in
    `skip` get no flag (the command sets them itself)."""
    flags = flags or {}
    for dotted, info in _fields(model):
        if dotted in skip:
            continue
        kwargs = _argument(info.annotation)
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = (info.description or "") + ("" if required or default is None else f" (default: {shown})")
        if dotted in positional:
            parser.add_argument(dotted, help=help_text or None, **kwargs)
            continue
        flag = flags.get(dotted) or "--" + dotted.replace(".", "-").replace("_", "-")
        kwargs.setdefault("metavar", None if "choices" in kwargs or "action" in kwargs else
                          flag.lstrip("-").replace("-", "_").upper())
        parser.add_argument(flag, dest=dotted, required=required, default=argparse.SUPPRESS,
                            help=help_text or None, **kwargs)
    return parser


def settings_from_args(model: type[BaseModel], args: argparse.Namespace, *, flags: dict[str, str] | None = None,
                       **fixed: Any) -> BaseModel:
    """The validated `model` from the parsed flags (those given; the model fills the rest) plus `fixed`
    values; a bad value raises ConfigError naming its flag."""
    flags = flags or {}

    def flag_of(dotted: str) -> str:
        return flags.get(dotted) or "--" + dotted.replace(".", "-").replace("_", "-")

    tree: dict[str, Any] = {}
    for dotted, _ in _fields(model):
        if hasattr(args, dotted):
            node = tree
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = getattr(args, dotted)
    tree |= fixed
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        names = {dotted for dotted, _ in _fields(model)}
        problems = []
        for error in err.errors():
            dotted = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "literal_error":
                message = f"{error['input']!r} is not a choice; choose from {error['ctx']['expected']}"
            field, _, rest = message.partition(": ")
            if not dotted and field in names:  # a model-level check that names its field first
                dotted, message = field, rest
            problems.append(f"{flag_of(dotted)}: {message}" if dotted else message)
        raise ConfigError("; ".join(problems)) from None
