"""Command-line flags derived from a method's options dataclass, so each option and its default live once.

A field with ``metadata={"help": …}`` becomes ``--name`` (and ``--name-with-dashes``); ``choices``,
``required`` and ``aliases`` in the metadata pass through to argparse; ``type`` reads a value the field's type
alone does not say how to (``--resolution W,H``); a whole number is at least ``min`` (1 unless the metadata says
otherwise). Flags default to None, so the dataclass's
own default applies whenever a flag is not given. argparse and the standard library have no such bridge
(``simple-parsing`` and ``HfArgumentParser`` do, but take over the whole parser and its flag names).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from studio.errors import StudioError


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (steps, ranks, sizes, counts)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number ≥ 0 (0 = off, or none)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
    return value


def _value_type(annotation: Any) -> tuple[Any, bool]:
    """(the type one flag value is read as, whether the field holds several values)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _value_type(inner[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default(field: Field) -> Any:
    if field.default is not MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not MISSING else None


def option_fields(config_class: type) -> list[Field]:
    """The fields of ``config_class`` that are command-line flags."""
    return [f for f in fields(config_class) if "help" in f.metadata]


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per option field of ``config_class`` (fields whose flag the parser already has are shared)."""
    hints = typing.get_type_hints(config_class)
    taken = {action.dest for action in parser._actions}
    for field in option_fields(config_class):
        if field.name in taken:
            continue
        names = list(dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}",
                                    *field.metadata.get("aliases", ())]))
        default = _default(field)
        text = field.metadata["help"]
        kind, several = _value_type(hints[field.name])
        if kind is bool:
            if default:
                names = [f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}"]
            parser.add_argument(*names, dest=field.name, action="store_false" if default else "store_true",
                                default=None, help=text)
            continue
        if default not in (None, [], ()):
            text += f" (default: {', '.join(map(str, default)) if several else default})"
        read = {int: non_negative_int if field.metadata.get("min", 1) == 0 else positive_int, float: float,
                Path: Path}.get(kind, str)
        if "type" in field.metadata:
            read = _argparse_type(field.metadata["type"])
        parser.add_argument(*names, dest=field.name, type=read,
                            action="append" if several else "store", default=None,
                            choices=field.metadata.get("choices"), required=field.metadata.get("required", False),
                            help=text)


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its StudioError becomes argparse's usage error."""
    def read(text: str) -> Any:
        try:
            return parse(text)
        except StudioError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return read


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """``config_class`` with every field the command line set (shared flags of the same name included)."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for field in fields(config_class):
        value = getattr(args, field.name, None)
        if value is None or value == []:
            continue
        if typing.get_origin(_strip_optional(hints[field.name])) is tuple:
            value = tuple(value)
        values[field.name] = value
    return config_class(**values)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(annotation) if arg is not type(None)][0]
    return annotation
