"""Typed recipes and building runs from them.

* :mod:`~lightning_fedprune.config.schema`: typed parsing of YAML-like mappings onto dataclasses;
* :mod:`~lightning_fedprune.config.recipe`: the recipe (:class:`RecipeConfig` and its sections);
* :mod:`~lightning_fedprune.config.build`: a run's parts built once from a recipe, for the
  simulation, a FedML server or a FedML client (:func:`build_parts`).

>>> cfg = RecipeConfig.from_yaml("recipes/digits_fedavg.yaml").apply_overrides(["rounds=5"])
>>> parts = build_parts(cfg, role="simulation")       # or: lightning_fedprune.simulation.build_run(cfg)
"""

from __future__ import annotations

from lightning_fedprune.config.build import (
    ROLES,
    FederatedClassifier,
    FederatedLanguageModel,
    RunParts,
    build_data,
    build_devices,
    build_module,
    build_parts,
    build_strategy,
    client_callbacks_of,
    default_listeners,
    model_kwargs,
    needs_devices,
    recipe_listeners,
)
from lightning_fedprune.config.recipe import (
    RESERVED_TRAINER_KEYS,
    DataConfig,
    DevicesConfig,
    EngineConfig,
    LoggerConfig,
    ModelConfig,
    RecipeConfig,
    StrategyConfig,
    WrapperConfig,
)
from lightning_fedprune.strategies.registry import strategy_options

__all__ = [
    "DataConfig",
    "ModelConfig",
    "StrategyConfig",
    "WrapperConfig",
    "LoggerConfig",
    "DevicesConfig",
    "EngineConfig",
    "RecipeConfig",
    "RESERVED_TRAINER_KEYS",
    "FederatedClassifier",
    "FederatedLanguageModel",
    "RunParts",
    "ROLES",
    "build_parts",
    "build_data",
    "build_module",
    "build_devices",
    "build_strategy",
    "needs_devices",
    "model_kwargs",
    "client_callbacks_of",
    "default_listeners",
    "recipe_listeners",
    "strategy_options",
]

