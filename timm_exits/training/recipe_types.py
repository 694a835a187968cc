"""Recipe values checked and converted against their fields' annotations.

The annotations recipe fields may use: ``bool``, ``int``, ``float``, ``str``, ``list[T]``, ``dict[str, Any]``,
``typing.Literal`` choices, unions of these (``X | None``), and ``Annotated[T, post]`` where ``post`` turns
the converted value into its final form. Conversion accepts what YAML and ``key=value`` overrides produce
(``"1e-3"`` for a float, ``"true"`` for a bool, ``"none"`` for None where the type has no ``str``), and
nothing that would lose information (``2.5`` is not an int, ``True`` not a number). `in_range` is the sections'
range check of a converted value.
"""

from __future__ import annotations

import math
import os
import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

__all__ = [
    "RecipeError",
    "RecipeYamlLoader",
    "RecipeYamlDumper",
    "convert_key",
    "in_range",
    "type_name",
    "choices_of",
    "load_yaml",
]


class RecipeError(ValueError):
    """A recipe key or value is invalid."""


class RecipeYamlLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading ``1e-3`` as a float as YAML 1.2 does (1.1 wants ``1.0e-3``)."""


class RecipeYamlDumper(yaml.SafeDumper):
    """YAML 1.1's safe dumper, quoting strings that `RecipeYamlLoader` would read as floats (``'1e-3'``)."""


for _cls in (RecipeYamlLoader, RecipeYamlDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (a file or an override's value); raise a `RecipeError` quoting what is not YAML.

    Args:
        text: The YAML text.

    Returns:
        The parsed value.
    """
    try:
        return yaml.load(text, Loader=RecipeYamlLoader)  # noqa: S506  (a safe loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{text[:80]!r} is not valid YAML ({problem}).") from e


class _Mismatch(Exception):
    """A value does not fit a type (internal: turned into a `RecipeError` naming the key)."""


_NONE_WORDS = ("none", "null", "~")


def type_name(tp: Any) -> str:
    """A readable name of an annotation (``int | None``, ``list[float]``, ``'bf16' | 'fp16'``)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a Literal, or of a union of Literals and None; None for other types."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        parts = [choices_of(a) if a is not type(None) else (None,) for a in get_args(tp)]
        if all(p is not None for p in parts):
            return tuple(c for p in parts for c in p)  # type: ignore[union-attr]
    return None


def _fits(value: Any, tp: Any) -> bool:
    """Whether `value` already is of type `tp` (no conversion needed)."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _fits(value, get_args(tp)[0])
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (float, str):
        return isinstance(value, tp)
    if origin is list:
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, Mapping)
    return False


def _convert(tp: Any, value: Any) -> Any:
    """`value` converted to type `tp`; raises `_Mismatch`."""
    origin, args = get_origin(tp), get_args(tp)
    choices = choices_of(tp)
    if choices is not None:
        if isinstance(value, str) and value not in choices:
            word = value.strip().lower()
            if word in _NONE_WORDS and None in choices:
                value = None
            elif word in ("true", "false") and any(c is True or c is False for c in choices):
                value = word == "true"
        for c in choices:
            if c is value or (type(c) is type(value) and c == value):
                return c
        raise _Mismatch(choices)
    if origin is Annotated:
        value = _convert(args[0], value)
        for post in args[1:]:
            value = post(value) if callable(post) else value
        return value
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS and str not in members):
            if len(members) < len(args):
                return None
            raise _Mismatch()
        for m in members:  # a member the value already is keeps it (1 stays an int in int | float)
            if _fits(value, m):
                return _convert(m, value)
        for m in members:
            try:
                return _convert(m, value)
            except _Mismatch:
                pass
        raise _Mismatch()
    return _convert_plain(tp, value)


def _convert_plain(tp: Any, value: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if value is None:
        raise _Mismatch()
    try:
        if tp is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            if not isinstance(value, bool):
                raise _Mismatch()
            return value
        if tp is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise _Mismatch()
            return int(float(value))
        if tp is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise _Mismatch()
            return float(value)
        if tp is str:
            if not isinstance(value, (str, os.PathLike)):
                raise _Mismatch()
            return str(value)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise _Mismatch()
            return [_convert(args[0], v) for v in value]
        if origin is dict:
            if not isinstance(value, Mapping):
                raise _Mismatch()
            return dict(value)
    except (TypeError, ValueError, OverflowError):
        raise _Mismatch() from None
    raise TypeError(f"recipe fields cannot be annotated {tp!r}")  # a programming error in a section


def convert_key(key: str, hint: Any, value: Any) -> Any:
    """Convert one recipe value to its field's annotation.

    Args:
        key: The recipe key (named in errors).
        hint: The field's annotation, as `typing.get_type_hints` resolves it (with extras).
        value: The value given.

    Returns:
        The converted value.

    Raises:
        RecipeError: The value does not fit: the message names the key, the value and the type, or lists the
            choices of a Literal.
    """
    try:
        return _convert(hint, value)
    except _Mismatch:
        choices = choices_of(hint)
        if choices is not None:
            raise RecipeError(f"recipe key {key!r}: {value!r} is not one of {list(choices)}.") from None
        raise RecipeError(f"recipe key {key!r}: {value!r} is not a valid {type_name(hint)} value.") from None


def in_range(
    section: Any, key: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise a `RecipeError` naming `key` unless the value of ``section.key`` lies in the interval (None passes)."""
    value = getattr(section, key)
    if value is None:
        return
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:  # NaN never gets here: converting the key refuses it
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise RecipeError(f"recipe key {key!r} must lie in {interval}, got {value}.")
