"""Typed parsing of YAML-like mappings onto dataclasses, with errors that name the dotted key.

The recipe (:mod:`lightning_fedprune.config.recipe`) and a FedML deployment's settings
(:mod:`lightning_fedprune.fedml_adapters.settings`) both parse with these functions: a value is
checked against its field's type hint (:func:`coerce`), a section against its dataclass
(:func:`parse_section`), and every refusal is a :class:`~lightning_fedprune.errors.ConfigError`
naming the dotted key and the valid keys or values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Any, Union, get_args, get_origin, get_type_hints

from lightning_fedprune.errors import ConfigError

__all__ = [
    "coerce",
    "parse_section",
    "unknown_key",
    "type_name",
    "suggest",
    "accepts_str",
    "hints",
    "check",
    "check_choice",
    "set_path",
]

_NONE = type(None)


def is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if is_union(hint):
        return " or ".join(type_name(a) for a in get_args(hint))
    if hint is _NONE:
        return "null"
    if get_origin(hint) is dict:
        return "a mapping"
    if get_origin(hint) is list:
        (arg,) = get_args(hint) or (Any,)
        return f"a list of {type_name(arg).removeprefix('a ').removeprefix('an ')}s"
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(type_name(a) for a in args)})"
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def type_error(key: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"`{key}` must be {type_name(hint)}, got {value!r} ({type(value).__name__})")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against ``hint`` (ints become floats where a float is expected)."""
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return parse_section(hint, value, f"{key}.")
    if is_union(hint):
        args = get_args(hint)
        if value is None:
            if _NONE in args:
                return None
            raise type_error(key, hint, value)
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise type_error(key, hint, value)
    origin = get_origin(hint)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise type_error(key, hint, value)
        k_hint, v_hint = get_args(hint) or (str, Any)
        out = {}
        for k, v in value.items():
            if k_hint is int and isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)  # keys given on the command line arrive as strings
            out[coerce(k, k_hint, f"{key} key {k!r}")] = coerce(v, v_hint, f"{key}.{k}")
        return out
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise type_error(key, hint, value)
        (arg,) = get_args(hint) or (Any,)
        return [coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # only in strategy options (checked, never stored as a tuple)
        args = get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise type_error(key, hint, value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if args and len(args) != len(value):
            raise type_error(key, hint, value)
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or (Any,) * len(value))))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, hint):
        return value
    raise type_error(key, hint, value)


def accepts_str(hint: Any) -> bool:
    return hint is str or (is_union(hint) and str in get_args(hint))


def suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" Did you mean `{close[0]}`?" if close else ""


def unknown_key(dotted: str, part: str, valid: Sequence[str], where: str) -> ConfigError:
    return ConfigError(
        f"unknown key `{dotted}`{where}; valid keys{' in `' + dotted.rpartition('.')[0] + '`' if '.' in dotted else ''}: "
        f"{', '.join(valid)}.{suggest(part, valid)}"
    )


def hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of dataclass ``cls``'s fields."""
    return get_type_hints(cls)


def parse_section(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; keys are reported as ``prefix + key``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        what = f"`{prefix[:-1]}`" if prefix else "a recipe"
        raise ConfigError(f"{what} must be a mapping of keys to values, got {data!r} ({type(data).__name__})")
    field_hints = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise unknown_key(f"{prefix}{key}", str(key), names, "")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint = field_hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = parse_section(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(data[name], hint, f"{prefix}{name}")
    return cls(**kwargs)



def check(cond: bool, key: str, requirement: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"`{key}` must be {requirement}, got {value!r}")


def check_choice(value: str, key: str, choices: Sequence[str], hint: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"`{key}` can be {', '.join(choices)}; got {value!r}.{suggest(value, choices)}{hint}")




def _accepts_type(hint: Any, t: type) -> bool:
    return hint is t or (is_union(hint) and t in get_args(hint))


def set_path(root: type, data: dict[str, Any], key: str, value: Any, raw: str) -> None:
    """Set dotted ``key`` in the dict form of dataclass ``root``, checking each level against the dataclasses.

    Keys inside free-form mappings (``options``, ``kwargs``) are created as needed; a number given
    for a text field is kept as the text ``raw``.

    Raises:
        ConfigError: an unknown key at a dataclass level (naming the valid keys), or a key below a
            value that is not a mapping.
    """
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part; use dotted keys like data.batch_size")
    cls: type | None = root
    node: dict[str, Any] = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if cls is not None:  # a dataclass level: the key must be one of its fields
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise unknown_key(dotted, part, names, f" (from --set {key}={raw})")
            hint = hints(cls)[part]
            if last:
                if accepts_str(hint) and isinstance(value, (bool, int, float)) and not _accepts_type(hint, type(value)):
                    value = raw.strip()
                node[part] = value
                return
            if dataclasses.is_dataclass(hint):
                node, cls = node[part], hint
                continue
            if get_origin(hint) is dict:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node, cls = node[part], None
                continue
            raise ConfigError(f"`{'.'.join(parts[:i + 1])}` is {type_name(hint)}, it has no key `{parts[i + 1]}`")
        # inside a free-form mapping (options, kwargs, trainer)
        if last:
            node[part] = value
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
