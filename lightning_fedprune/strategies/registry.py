"""Strategies and strategy wrappers by name, registered by decorator (like the model registry)::

    @register_strategy("fedavg")
    class FedAvg(Strategy): ...

    @register_wrapper("fedprox")
    class Proximal(StrategyWrapper): ...

A recipe names a base strategy (``strategy.name``) and, optionally, wrappers applied around it in
order (``strategy.wrappers``). The options a recipe may give are read from the registered class's
own signature (:func:`strategy_options`, :func:`wrapper_options`): a strategy's keyword-only
arguments, plus :class:`~lightning_fedprune.strategies.FedAvg`'s when it forwards ``**kwargs``
(every strategy built on FedAvg does, and only there).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, get_type_hints

from lightning_fedprune.errors import ConfigError

__all__ = [
    "STRATEGIES",
    "WRAPPERS",
    "register_strategy",
    "register_wrapper",
    "strategy_options",
    "wrapper_options",
    "Option",
    "strategy_class",
    "wrapper_class",
    "combine_callbacks",
    "declared_client_callbacks",
]

T = TypeVar("T", bound=type)

#: strategy name (as used in recipes) -> class
STRATEGIES: dict[str, type] = {}
#: wrapper name (as used in recipes' ``strategy.wrappers``) -> class
WRAPPERS: dict[str, type] = {}

#: ``(parameter, resolved type hint)``
Option = tuple[inspect.Parameter, Any]


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is already registered to {table[name].__name__}")
        table[name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def register_strategy(name: str) -> Callable[[T], T]:
    """Register a strategy class under ``name`` (a class decorator)."""
    return _register(STRATEGIES, "strategy", name)


def register_wrapper(name: str) -> Callable[[T], T]:
    """Register a strategy wrapper class under ``name`` (a class decorator)."""
    return _register(WRAPPERS, "wrapper", name)


def _own_options(fn: Callable[..., Any], skip: tuple[str, ...]) -> tuple[dict[str, Option], bool]:
    try:
        hints = get_type_hints(fn)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    out: dict[str, Option] = {}
    forwards = False
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            forwards = True
            continue
        out[p.name] = (p, hints.get(p.name, Any))
    return out, forwards


def _lookup(table: dict[str, type], kind: str, name: str) -> type:
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}.{hint}")
    return table[name]


def strategy_options(name: str) -> dict[str, Option]:
    """Keyword arguments of the registered strategy ``name``: name -> (parameter, type hint).

    Raises:
        ConfigError: ``name`` is not registered (listing the valid names).
    """
    cls = _lookup(STRATEGIES, "strategy", name)
    own, forwards = _own_options(cls.__init__, ("self",))
    if forwards:
        from lightning_fedprune.strategies.fedavg import FedAvg

        base, _ = _own_options(FedAvg.__init__, ("self",))
        for k, v in base.items():
            own.setdefault(k, v)
    return own


def wrapper_options(name: str) -> dict[str, Option]:
    """Keyword arguments of the registered wrapper ``name`` (without the wrapped strategy).

    Raises:
        ConfigError: ``name`` is not registered (listing the valid names).
    """
    cls = _lookup(WRAPPERS, "wrapper", name)
    own, _ = _own_options(cls.__init__, ("self", "inner"))
    return own


def strategy_class(name: str) -> type:
    """The registered strategy class ``name`` (:class:`ConfigError` listing the valid names)."""
    return _lookup(STRATEGIES, "strategy", name)


def wrapper_class(name: str) -> type:
    """The registered wrapper class ``name`` (:class:`ConfigError` listing the valid names)."""
    return _lookup(WRAPPERS, "wrapper", name)


def combine_callbacks(inner: Sequence[str], added: Sequence[str]) -> tuple[str, ...]:
    """The client callbacks of a wrapped strategy: the inner ones first, then the wrapper's new ones."""
    return tuple(dict.fromkeys((*inner, *added)))


def declared_client_callbacks(name: str, wrappers: Sequence[str] = ()) -> tuple[str, ...]:
    """The client callbacks that strategy ``name`` wrapped by ``wrappers`` (innermost first) declares.

    What a client process needs to build its runtime, without building the strategy (which may
    need server-only knowledge).
    """
    out = tuple(strategy_class(name).client_callbacks)
    for w in wrappers:
        out = combine_callbacks(out, wrapper_class(w).client_callbacks)
    return out
