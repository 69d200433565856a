"""Command-line flags generated from configuration dataclasses: one --flag-name per field, with its help."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The type a flag parses, and whether the field is a list."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_dataclass_arguments(
    parser: argparse._ActionsContainer, cls: type[DataclassInstance], exclude: tuple[str, ...] = ()
) -> None:
    """One flag per field of the dataclass `cls` (but those in `exclude`) on a parser or argument group:
    --field-name, its type, default and metadata['help']."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, is_list = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata["help"] + ("" if default in (None, []) else f" (default: {default})")
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            parser.add_argument(
                _flag(f.name), dest=f.name, type=type(choices[0]), choices=choices, default=default, help=help_text
            )
        elif kind is bool:
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif is_list:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, nargs="*", default=default, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=default, help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of `cls` from the parsed flags that add_dataclass_arguments made, and `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)
