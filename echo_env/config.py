"""``key=value`` command lines into frozen dataclass configs (the recipe's chz style).

Every entry point has one config dataclass; this module turns ``batch_size=32
api=chat`` into it, checking each key and value with an error that names the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from echo_env.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", ""}


def _convert(key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in _NONE:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, raw, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot read {raw!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ConfigError(f"{key}={raw} is not a choice: use one of {', '.join(map(str, args))}")
    if annotation is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={raw} is not a boolean: use {key}=true or {key}=false")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw} is not a whole number: e.g. {key}=8") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw} is not a number: e.g. {key}=0.5") from None
    if annotation is str:
        return raw
    if origin in (tuple, list) and args:
        item = args[0]
        parts = [p for p in raw.split(",") if p.strip()]
        values = [_convert(key, p.strip(), item) for p in parts]
        return tuple(values) if origin is tuple else values
    raise ConfigError(f"{key}: values of type {annotation} cannot be set from the command line")


def parse_overrides(cls: type[T], args: Sequence[str], base: T | None = None) -> T:
    """Build a ``cls`` config from ``key=value`` strings.

    Args:
        cls: A dataclass whose fields are the accepted keys.
        args: Strings such as ``"batch_size=32"``; lists are comma-separated.
        base: Start from this instance instead of the defaults.

    Returns:
        The config, validated by its own ``__post_init__``.

    Raises:
        ConfigError: For a malformed argument, an unknown key (with the closest known
            one), or a value of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep:
            raise ConfigError(f"arguments are key=value pairs, got {arg!r}: e.g. batch_size=16")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}: known keys are {', '.join(sorted(fields))}")
        values[key] = _convert(key, raw, hints[key])
    if base is not None:
        return dataclasses.replace(base, **values)  # type: ignore[type-var]
    return cls(**values)


def field_docs(cls: type[Any]) -> dict[str, str]:
    """The one-line docstring written under each field of a dataclass (empty if none)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type[Any]) -> str:
    """Two lines per key of a config dataclass: ``name=default``, then what it does (for ``--help``)."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        shown = "" if default is None else default
        lines.append(f"  {f.name}={shown}")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
