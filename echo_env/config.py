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

MAX_AGENTS = 65_536
"""The most agents (``batch_size x group_size``) of one burst or episode, and the most prompts the
prefix-cache test builds for its TTFT repeats.

Why 65,536 (2**16): every prompt is built and tokenized before the first request and kept with
its request record, about 25 KiB an agent (2.3 KiB of prompt text, 20 KiB of token ids for a
520-token prompt as Python ints, the record): 65,536 agents are about 1.6 GiB and ten seconds of
building on a 2-core machine (8,192 agents: 1.3 s), before a server sees anything. The burst is
then 34 million prompt tokens queued at once, minutes of a large GPU server's time against
``timeout_s``. And more agents add nothing to the evidence: the one cold request is under 0.1%
of the burst from 1,024 agents on. ``batch_size=10000000`` (80 million agents, about 2 TB and
hours of building) fails here, before any engine starts, instead of after.
"""

MAX_TOKENS = 65_536
"""The most tokens one request may generate (``max_tokens``), the same for every command.

A bound against typos (``max_tokens=1000000``), checked before a server starts: 65,536
(2**16) is past the context length of most served models, so a larger value could never
run anyway; each server still refuses what exceeds its own ``max_model_len``.
"""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", ""}


def check_agents(batch_size: int, group_size: int) -> None:
    """Refuse more agents than :data:`MAX_AGENTS`, saying why and what to lower.

    Raises:
        ConfigError: ``batch_size x group_size`` is over the limit.
    """
    agents = batch_size * group_size
    if agents > MAX_AGENTS:
        raise ConfigError(
            f"batch_size={batch_size} x group_size={group_size} is {agents:,} agents, over the limit of "
            f"{MAX_AGENTS:,}: every agent's prompt, token ids and request record are built and held before the "
            "first request (about 25 KiB each) and sent as one burst; lower batch_size or group_size"
        )


def check_max_tokens(max_tokens: int) -> None:
    """Refuse a generation limit outside 1 to :data:`MAX_TOKENS`.

    Raises:
        ConfigError: ``max_tokens`` is out of range.
    """
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise ConfigError(f"max_tokens={max_tokens} is out of range: use 1 to {MAX_TOKENS}")


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


def _nested(cls: type[Any]) -> dict[str, type[Any]]:
    """Fields of ``cls`` that are themselves config dataclasses (their keys are ``cls``'s keys too)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if f.init and isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def known_keys(cls: type[Any]) -> dict[str, tuple[str | None, Any]]:
    """Every ``key=value`` key of a config: ``{key: (sub-config field or None, type)}``.

    A field whose type is itself a config dataclass (the server target every command
    shares) contributes its own keys, so ``base_url=`` works as well as ``server.base_url=``.
    """
    hints = typing.get_type_hints(cls)
    nested = _nested(cls)
    keys: dict[str, tuple[str | None, Any]] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in nested:
            sub_hints = typing.get_type_hints(nested[f.name])
            for sub in dataclasses.fields(nested[f.name]):
                if sub.init:
                    keys.setdefault(sub.name, (f.name, sub_hints[sub.name]))
                    keys[f"{f.name}.{sub.name}"] = (f.name, sub_hints[sub.name])
        else:
            keys[f.name] = (None, hints[f.name])
    return keys


def parse_overrides(cls: type[T], args: Sequence[str], base: T | None = None) -> T:
    """Build a ``cls`` config from ``key=value`` strings.

    Args:
        cls: A dataclass whose fields are the accepted keys; fields that are config
            dataclasses themselves take their keys bare or dotted (``base_url=`` or
            ``server.base_url=``).
        args: Strings such as ``"batch_size=32"``; lists are comma-separated.
        base: Start from this instance instead of the defaults.

    Returns:
        The config, validated by its own ``__post_init__`` (and its parts' own).

    Raises:
        ConfigError: For a malformed argument, an unknown key (with the closest known
            one), or a value of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    keys = known_keys(cls)
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep:
            raise ConfigError(f"arguments are key=value pairs, got {arg!r}: e.g. batch_size=16")
        if key not in keys:
            plain = [k for k in keys if "." not in k]
            close = difflib.get_close_matches(key, plain, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}: known keys are {', '.join(sorted(plain))}")
        owner, annotation = keys[key]
        value = _convert(key, raw, annotation)
        if owner is None:
            top[key] = value
        else:
            parts.setdefault(owner, {})[key.rsplit(".", 1)[-1]] = value
    for owner, values in parts.items():
        current = getattr(base, owner) if base is not None else _nested(cls)[owner]()
        top[owner] = dataclasses.replace(current, **values)
    if base is not None:
        return dataclasses.replace(base, **top)  # type: ignore[type-var]
    return cls(**top)


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


def _leaves(cls: type[Any]) -> list[tuple[str, str | None, dataclasses.Field[Any], Any, str]]:
    """Every settable value of a config: ``(key, sub-config field or None, field, default, doc)``.

    The key is the one a user types: bare, or dotted where another part owns the bare name
    (``fleet.ceiling_tolerance`` beside the verdict's ``ceiling_tolerance``).
    """
    keys = known_keys(cls)
    nested = _nested(cls)
    docs = field_docs(cls)
    out: list[tuple[str, str | None, dataclasses.Field[Any], Any, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name not in nested:
            out.append((f.name, None, f, _default(f), docs.get(f.name, "")))
            continue
        part = _default(f)
        part_docs = field_docs(nested[f.name])
        for sub in dataclasses.fields(nested[f.name]):
            if sub.init:
                key = sub.name if keys[sub.name][0] == f.name else f"{f.name}.{sub.name}"
                default = getattr(part, sub.name) if dataclasses.is_dataclass(part) else _default(sub)
                out.append((key, f.name, sub, default, part_docs.get(sub.name, "")))
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def describe(cls: type[Any]) -> str:
    """Two lines per key of a config dataclass: ``name=default``, then what it does (for ``--help``).

    Keys of a nested config (the server target, the verdict's rules) are listed as they are
    typed: bare, dotted where two parts share a name.
    """
    lines: list[str] = []
    for key, _, _, default, doc in _leaves(cls):
        lines.append(f"  {key}={'' if default is None else default}")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def flat_values(config: Any) -> dict[str, Any]:
    """A config's values under the keys a user types (as :func:`describe` lists them), one level deep."""
    out: dict[str, Any] = {}
    for key, owner, f, _, _ in _leaves(type(config)):
        holder = config if owner is None else getattr(config, owner)
        out[key] = getattr(holder, f.name)
    return out


def build(cls: type[T], **values: Any) -> T:
    """A ``cls`` config from flat keyword values, as the command line gives them.

    ``build(PrefixTestConfig, base_url=..., batch_size=4)`` puts ``base_url`` into the
    nested server target and ``batch_size`` at the top, like ``base_url=... batch_size=4``.

    Raises:
        ConfigError: An unknown key (with the closest known one).
    """
    keys = known_keys(cls)
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key not in keys:
            close = difflib.get_close_matches(key, [k for k in keys if "." not in k], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}")
        owner, _ = keys[key]
        if owner is None:
            top[key] = value
        else:
            parts.setdefault(owner, {})[key.rsplit(".", 1)[-1]] = value
    nested = _nested(cls)
    for owner, sub in parts.items():
        top[owner] = nested[owner](**sub)
    return cls(**top)
