"""Client callbacks by name, registered by decorator (like the model and strategy registries).

A strategy lists the client callbacks it needs by name (``strategy.client_callbacks``: plain data,
so the list crosses process boundaries); the client runtime instantiates them::

    @register_client_callback("fedprox")
    class FedProxCallback(FederatedCallback): ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lightning_fedprune.errors import ConfigError

__all__ = ["CLIENT_CALLBACKS", "register_client_callback", "make_client_callbacks"]

T = TypeVar("T", bound=type)

#: names a strategy lists in ``client_callbacks`` -> factory of the client callback
CLIENT_CALLBACKS: dict[str, Callable[[], Any]] = {}


def register_client_callback(name: str) -> Callable[[T], T]:
    """Register a client callback class (constructible without arguments) under ``name``."""

    def deco(cls: T) -> T:
        if name in CLIENT_CALLBACKS and CLIENT_CALLBACKS[name] is not cls:
            raise ValueError(f"client callback {name!r} is already registered to {CLIENT_CALLBACKS[name]!r}")
        CLIENT_CALLBACKS[name] = cls
        return cls

    return deco


def make_client_callbacks(names: Sequence[str]) -> list[Any]:
    """Instantiate the client callbacks a strategy asks for, by name.

    Raises:
        ConfigError: an unknown name (listing the registered ones).
    """
    unknown = [n for n in names if n not in CLIENT_CALLBACKS]
    if unknown:
        raise ConfigError(f"unknown client callback(s) {unknown}; valid: {', '.join(sorted(CLIENT_CALLBACKS))}")
    return [CLIENT_CALLBACKS[n]() for n in names]
