"""Typed recipe configs: YAML mapped one-to-one onto the constructors a run is built from.

A recipe is a YAML file whose sections mirror the objects of a run::

    name: digits_fedavg            # default: the file name without .yaml
    seed: 0
    rounds: 30
    run_dir: null                  # default: runs/<name>
    target_accuracy: 0.95
    eval_every: 1
    checkpoint_every: 1
    data: {name: digits, num_clients: 10, partition: iid, batch_size: 20}      # DataConfig
    model: {name: mlp, lr: 0.05}                                               # ModelConfig
    strategy: {name: fedavg, local_epochs: 1, options: {}}                     # StrategyConfig
    devices: {compute_gflops: [1.0, 10.0]}                                     # DevicesConfig
    engine: {mode: sync}                                                       # EngineConfig
    trainer: {}                                                                # extra Trainer kwargs

Every key is checked when the recipe is loaded: an unknown key, a value of the wrong type or an
unknown dataset / model / strategy / option raises :class:`~lightning_fedprune.errors.ConfigError`
naming the dotted key and the valid choices. Ints are accepted where a float is expected.

>>> cfg = RecipeConfig.from_yaml("recipes/digits_fedavg.yaml").apply_overrides(["rounds=5"])
>>> engine, rounds = build_run(cfg)
>>> summary = engine.run(rounds)

Relative paths (``run_dir``, ``data.root``) are relative to the current working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml
from torch import nn

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.models.modules import ClassifierModule, LanguageModelModule
from lightning_fedprune.module import FederatedModuleMixin

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "ModelConfig",
    "StrategyConfig",
    "DevicesConfig",
    "EngineConfig",
    "RecipeConfig",
    "FederatedClassifier",
    "FederatedLanguageModel",
    "build_run",
    "default_listeners",
    "strategy_options",
]

#: Trainer arguments the client runtime sets itself (local work comes from each task).
RESERVED_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "callbacks", "max_time")
#: Strategy constructor arguments that have their own key in ``strategy:`` (or the recipe's ``seed``).
_STRATEGY_FIELDS = ("fraction_fit", "min_fit_clients", "local_epochs", "local_steps")


# --------------------------------------------------------------------------------------------
# federated modules built by recipes
# --------------------------------------------------------------------------------------------


class FederatedClassifier(FederatedModuleMixin, ClassifierModule):
    """:class:`~lightning_fedprune.models.ClassifierModule` that takes part in federated training."""


class FederatedLanguageModel(FederatedModuleMixin, LanguageModelModule):
    """:class:`~lightning_fedprune.models.LanguageModelModule` that takes part in federated training.

    The embedding and the output layer are never pruned. FLOPs are counted by
    :func:`lightning_fedprune.core.flops.forward_flops`, which counts LSTMs analytically.
    """

    federated_unprunable = ("classifier", "embedding")


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Feeds ``load_dataset``, ``make_partition`` and ``FederatedDataset.from_partition``.

    Attributes:
        name: dataset name (``lightning_fedprune.data.available_datasets()``).
        root: data folder; ``null`` uses the library's default root (``$LIGHTNING_FEDPRUNE_DATA``
            or a ``shared/data`` folder next to the repository).
        num_clients: number of clients.
        partition: partition scheme (``iid``, ``shards``, ``dirichlet``, ``dominant_label``,
            ``missing_classes``).
        partition_options: the scheme's options, e.g. ``{beta: 0.5}`` for ``dirichlet``.
        local_test_fraction: fraction of each client's samples held out as its local test set.
        batch_size: local training batch size.
        eval_batch_size: evaluation batch size.
        options: dataset options, e.g. ``{seq_len: 35}`` for ``ptb``.
    """

    name: str = "digits"
    root: str | None = None
    num_clients: int = 10
    partition: str = "iid"
    partition_options: dict[str, Any] = field(default_factory=dict)
    local_test_fraction: float = 0.0
    batch_size: int = 20
    eval_batch_size: int = 512
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Feeds ``create_model(name, **kwargs)`` and the module's optimizer arguments.

    ``num_classes``, ``in_features``, ``in_channels`` and ``vocab_size`` are filled in from the
    dataset when the model accepts them and ``kwargs`` does not set them.

    Attributes:
        name: registered model name (``lightning_fedprune.models.list_models()``) or ``timm:<name>``.
        kwargs: further model arguments, e.g. ``{hidden: [300, 100]}``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        optimizer: ``sgd`` or ``adam``.
    """

    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"


@dataclass
class StrategyConfig:
    """Feeds the strategy constructor ``STRATEGIES[name](...)``.

    Attributes:
        name: a key of ``lightning_fedprune.strategies.STRATEGIES``: ``fedavg`` (Syn-FL),
            ``fedprox``, ``fednova``, ``scaffold``, ``fedmp``, ``upfl``, ``flexcom``, ``prunefl``
        fraction_fit: fraction of clients sampled per round.
        min_fit_clients: at least this many clients per round.
        local_epochs: local epochs per round (ignored when ``local_steps`` is set).
        local_steps: local optimizer steps per round instead of epochs.
        local_work_by_capability: each client's local iterations are scaled by its device speed
            (the fastest does ``local_steps``, or ``local_epochs`` over its data): FedProx as the
            FedMP paper runs it. Needs a strategy with ``client_local_steps`` (``fedprox``).
        options: further keyword arguments of the strategy, e.g. ``{mu: 0.01}`` for ``fedprox``
            or ``{local_epochs_range: [1, 3]}``. A strategy taking ``momentum`` (``fednova``)
            gets ``model.momentum`` unless it is set here. The strategy's seed is the recipe's.
    """

    name: str = "fedavg"
    fraction_fit: float = 1.0
    min_fit_clients: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    local_work_by_capability: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DevicesConfig:
    """Feeds ``make_devices``: a number is a constant, ``[lo, hi]`` a log-uniform range.

    Attributes:
        scenario: instead of the ranges below, FedMP's heterogeneity scenarios built from the
            paper's Jetson TX2 clusters: ``low`` (10 from cluster A), ``medium`` (5 A + 5 B) or
            ``high`` (3 A + 3 B + 4 C); ``data.num_clients`` must match.
        clusters: instead of ``scenario``, cluster counts, e.g. ``{A: 10, B: 10}``.
        compute_gflops: device speed in GFLOP/s.
        uplink_mbps: upload bandwidth in megabit/s.
        downlink_mbps: download bandwidth in megabit/s.
        availability: probability a device can be selected in a round.
        failure_prob: probability a selected device drops out of the round.
    """

    scenario: str | None = None
    clusters: dict[str, int] = field(default_factory=dict)
    compute_gflops: float | list[float] = field(default_factory=lambda: [1.0, 10.0])
    uplink_mbps: float | list[float] = field(default_factory=lambda: [1.0, 10.0])
    downlink_mbps: float | list[float] = field(default_factory=lambda: [5.0, 50.0])
    availability: float = 1.0
    failure_prob: float = 0.0


@dataclass
class EngineConfig:
    """How rounds end (feeds :class:`~lightning_fedprune.simulation.SimulationEngine`).

    Attributes:
        mode: ``sync`` (the slowest participant ends the round), ``deadline`` (FedMP's 1.5 x the
            time 85% arrived; late clients dropped for the round) or ``async`` (aggregate the first
            ``async_m`` arrivals; the others keep training).
        async_m: results per round in ``async`` mode.
        deadline_fraction: ``deadline`` mode: the fraction whose arrival sets ``d``.
        deadline_factor: ``deadline`` mode: deadline = factor x ``d``.
        deadline_backoff: ``deadline`` mode: rounds a late client sits out.
        join_rounds: client id -> first round it takes part in (clients joining mid-training).
    """

    mode: str = "sync"
    async_m: int | None = None
    deadline_fraction: float = 0.85
    deadline_factor: float = 1.5
    deadline_backoff: int = 1
    join_rounds: dict[int, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# parsing and type checking
# --------------------------------------------------------------------------------------------

_NONE = type(None)


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if _is_union(hint):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if hint is _NONE:
        return "null"
    if get_origin(hint) is dict:
        return "a mapping"
    if get_origin(hint) is list:
        (arg,) = get_args(hint) or (Any,)
        return f"a list of {_type_name(arg).removeprefix('a ').removeprefix('an ')}s"
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _type_error(key: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"`{key}` must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against ``hint`` (ints become floats where a float is expected)."""
    if hint is Any:
        return value
    if _is_union(hint):
        args = get_args(hint)
        if value is None:
            if _NONE in args:
                return None
            raise _type_error(key, hint, value)
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise _type_error(key, hint, value)
    origin = get_origin(hint)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(key, hint, value)
        k_hint, v_hint = get_args(hint) or (str, Any)
        out = {}
        for k, v in value.items():
            if k_hint is int and isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)  # keys given on the command line arrive as strings
            out[_coerce(k, k_hint, f"{key} key {k!r}")] = _coerce(v, v_hint, f"{key}.{k}")
        return out
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, hint, value)
        (arg,) = get_args(hint) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # only in strategy options (checked, never stored as a tuple)
        args = get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, hint, value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if args and len(args) != len(value):
            raise _type_error(key, hint, value)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or (Any,) * len(value))))
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
    raise _type_error(key, hint, value)


def _accepts_str(hint: Any) -> bool:
    return hint is str or (_is_union(hint) and str in get_args(hint))


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" Did you mean `{close[0]}`?" if close else ""


def _unknown_key(dotted: str, part: str, valid: Sequence[str], where: str) -> ConfigError:
    return ConfigError(
        f"unknown key `{dotted}`{where}; valid keys{' in `' + dotted.rpartition('.')[0] + '`' if '.' in dotted else ''}: "
        f"{', '.join(valid)}.{_suggest(part, valid)}"
    )


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _parse_section(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; keys are reported as ``prefix + key``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        what = f"`{prefix[:-1]}`" if prefix else "a recipe"
        raise ConfigError(f"{what} must be a mapping of keys to values, got {data!r} ({type(data).__name__})")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", str(key), names, "")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _parse_section(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], hint, f"{prefix}{name}")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# semantic checks
# --------------------------------------------------------------------------------------------


def _check(cond: bool, key: str, requirement: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"`{key}` must be {requirement}, got {value!r}")


def _check_choice(value: str, key: str, choices: Sequence[str], hint: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"`{key}` can be {', '.join(choices)}; got {value!r}.{_suggest(value, choices)}{hint}")


def strategy_options(name: str) -> dict[str, inspect.Parameter]:
    """Keyword arguments the strategy ``name`` accepts, collected along its ``**kwargs`` chain.

    Raises:
        ConfigError: if ``name`` is not in :data:`~lightning_fedprune.strategies.STRATEGIES`.
    """
    from lightning_fedprune.strategies import STRATEGIES

    _check_choice(name, "strategy.name", sorted(STRATEGIES))
    return {k: p for k, (p, _) in _strategy_params(STRATEGIES[name]).items()}


def _strategy_params(strategy_cls: type) -> dict[str, tuple[inspect.Parameter, Any]]:
    """name -> (parameter, resolved type hint or Any) along the ``**kwargs`` chain of the MRO."""
    params: dict[str, tuple[inspect.Parameter, Any]] = {}
    for klass in strategy_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = get_type_hints(init)
        except Exception:  # unresolvable annotations: check names only
            hints = {}
        forwards = False
        for p in inspect.signature(init).parameters.values():
            if p.name == "self" or p.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
                continue
            params.setdefault(p.name, (p, hints.get(p.name, Any)))
        if not forwards:
            break
    return params


def _strategy_class(name: str) -> type:
    from lightning_fedprune.strategies import STRATEGIES

    return STRATEGIES[name]


def _check_span(value: float | list[float], key: str) -> None:
    if isinstance(value, list):
        _check(len(value) == 2 and 0 < value[0] <= value[1] and math.isfinite(value[1]), key, "a number > 0 or [lo, hi] with 0 < lo <= hi", value)
    else:
        _check(value > 0 and math.isfinite(value), key, "a number > 0 or [lo, hi] with 0 < lo <= hi", value)


def _validate(cfg: RecipeConfig) -> None:
    from lightning_fedprune.data import PARTITION_SCHEMES, available_datasets
    from lightning_fedprune.models import list_models
    from lightning_fedprune.models.modules import OPTIMIZERS
    from lightning_fedprune.models.registry import TIMM_PREFIX

    _check(bool(cfg.name.strip()) and "/" not in cfg.name, "name", "a non-empty name without '/'", cfg.name)
    _check(cfg.seed >= 0, "seed", "an integer >= 0", cfg.seed)
    _check(cfg.rounds >= 1, "rounds", "an integer >= 1", cfg.rounds)
    _check(cfg.eval_every >= 1, "eval_every", "an integer >= 1", cfg.eval_every)
    _check(cfg.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1", cfg.checkpoint_every)
    if cfg.target_accuracy is not None:
        _check(0.0 < cfg.target_accuracy <= 1.0, "target_accuracy", "null or a number in (0, 1]", cfg.target_accuracy)

    d = cfg.data
    name = d.name.strip().lower().replace("-", "_")
    _check_choice(name, "data.name", available_datasets())
    _check(d.num_clients >= 1, "data.num_clients", "an integer >= 1", d.num_clients)
    _check_choice(d.partition, "data.partition", list(PARTITION_SCHEMES))
    _check(0.0 <= d.local_test_fraction < 1.0, "data.local_test_fraction", "a number in [0, 1)", d.local_test_fraction)
    _check(d.batch_size >= 1, "data.batch_size", "an integer >= 1", d.batch_size)
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", "an integer >= 1", d.eval_batch_size)

    m = cfg.model
    if not m.name.startswith(TIMM_PREFIX):
        _check_choice(m.name, "model.name", list_models(), f" Any timm architecture works as '{TIMM_PREFIX}<name>'.")
    _check_choice(m.optimizer, "model.optimizer", list(OPTIMIZERS))
    _check(m.lr > 0 and math.isfinite(m.lr), "model.lr", "a number > 0", m.lr)
    _check(0.0 <= m.momentum < 1.0, "model.momentum", "a number in [0, 1)", m.momentum)
    _check(m.weight_decay >= 0, "model.weight_decay", "a number >= 0", m.weight_decay)

    s = cfg.strategy
    valid = strategy_options(s.name)
    _check(0.0 < s.fraction_fit <= 1.0, "strategy.fraction_fit", "a number in (0, 1]", s.fraction_fit)
    _check(s.min_fit_clients >= 1, "strategy.min_fit_clients", "an integer >= 1", s.min_fit_clients)
    _check(s.local_epochs >= 1, "strategy.local_epochs", "an integer >= 1", s.local_epochs)
    if s.local_steps is not None:
        _check(s.local_steps >= 1, "strategy.local_steps", "null or an integer >= 1", s.local_steps)
    choices = sorted(k for k in valid if k not in (*_STRATEGY_FIELDS, "seed"))
    for key in s.options:
        if key in _STRATEGY_FIELDS:
            raise ConfigError(f"`strategy.options.{key}`: set it as `strategy.{key}` instead")
        if key == "seed":
            raise ConfigError("`strategy.options.seed`: the strategy is seeded with the recipe's top-level `seed`; set that instead")
        if key not in valid:
            raise ConfigError(
                f"unknown key `strategy.options.{key}` for strategy {s.name!r}; valid options: "
                f"{', '.join(choices) or 'none'}.{_suggest(key, choices)}"
            )
    hints = _strategy_params(_strategy_class(s.name))
    for key, value in s.options.items():
        _coerce(value, hints[key][1], f"strategy.options.{key}")  # type check only; the value is kept as given
    if "momentum" in valid and "momentum" in s.options and s.options["momentum"] != m.momentum:
        raise ConfigError(
            f"`strategy.options.momentum` ({s.options['momentum']!r}) differs from `model.momentum` ({m.momentum!r}); "
            f"{s.name} needs the clients' momentum: drop the option (it defaults to model.momentum) or make them equal"
        )

    if s.local_work_by_capability:
        _check(
            "client_local_steps" in valid, "strategy.local_work_by_capability",
            "false for a strategy without `client_local_steps` (use fedprox)", s.local_work_by_capability,
        )

    v = cfg.devices
    if v.scenario is not None or v.clusters:
        from lightning_fedprune.simulation.devices import fedmp_device_specs

        _check(v.scenario is None or not v.clusters, "devices.clusters", "empty when `devices.scenario` is set", v.clusters)
        specs = fedmp_device_specs(v.scenario if v.scenario is not None else v.clusters, seed=cfg.seed)
        _check(
            len(specs) == d.num_clients, "data.num_clients",
            f"{len(specs)} to match devices.{'scenario' if v.scenario is not None else 'clusters'}", d.num_clients,
        )
    for key in ("compute_gflops", "uplink_mbps", "downlink_mbps"):
        _check_span(getattr(v, key), f"devices.{key}")
    _check(0.0 < v.availability <= 1.0, "devices.availability", "a number in (0, 1]", v.availability)
    _check(0.0 <= v.failure_prob < 1.0, "devices.failure_prob", "a number in [0, 1)", v.failure_prob)

    e = cfg.engine
    _check_choice(e.mode, "engine.mode", ["sync", "deadline", "async"])
    if e.mode == "async":
        _check(e.async_m is not None and e.async_m >= 1, "engine.async_m", "an integer >= 1 in async mode", e.async_m)
    _check(0.0 < e.deadline_fraction <= 1.0, "engine.deadline_fraction", "a number in (0, 1]", e.deadline_fraction)
    _check(e.deadline_factor >= 1.0, "engine.deadline_factor", "a number >= 1", e.deadline_factor)
    _check(e.deadline_backoff >= 0, "engine.deadline_backoff", "an integer >= 0", e.deadline_backoff)
    for c, r in e.join_rounds.items():
        _check(0 <= c < d.num_clients and r >= 0, f"engine.join_rounds.{c}", "a client id below data.num_clients -> round >= 0", r)

    reserved = [k for k in cfg.trainer if k in RESERVED_TRAINER_KEYS]
    if reserved:
        raise ConfigError(
            f"`trainer.{reserved[0]}` cannot be set: the client runtime sets local work from each round's task; "
            "use `strategy.local_epochs` / `strategy.local_steps`"
        )
    trainer_params = _trainer_params()
    for key in cfg.trainer:
        if key not in trainer_params:
            raise ConfigError(
                f"unknown key `trainer.{key}`: not an argument of lightning.pytorch.Trainer.{_suggest(key, trainer_params)} "
                f"Valid keys: {', '.join(k for k in trainer_params if k not in RESERVED_TRAINER_KEYS)}"
            )


def _trainer_params() -> list[str]:
    import lightning.pytorch as pl

    return [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]


# --------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeConfig:
    """A whole run. Build with :meth:`from_yaml` / :meth:`from_dict`, which validate everything.

    Attributes:
        name: recipe name (default: the YAML file's stem); names the default run folder.
        seed: seeds the partition, the model's initial weights, client sampling, devices and
            data order.
        rounds: number of federated rounds.
        run_dir: folder for metrics, plots and checkpoints (default ``runs/<name>``).
        target_accuracy: stop once the global test accuracy reaches it (``null``: never).
        eval_every: evaluate the global model every this many rounds (and after the last).
        checkpoint_every: checkpoint every this many rounds.
        data, model, strategy, devices, engine: the sections above.
        trainer: extra ``lightning.pytorch.Trainer`` arguments (e.g. ``gradient_clip_val``).
    """

    name: str = "recipe"
    seed: int = 0
    rounds: int = 30
    run_dir: str | None = None
    target_accuracy: float | None = None
    eval_every: int = 1
    checkpoint_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    trainer: dict[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecipeConfig:
        """Build and validate a recipe from a (YAML-like) mapping.

        Raises:
            ConfigError: on an unknown key, a wrongly typed value or an invalid choice; the
                message names the dotted key and the valid keys or values.
        """
        cfg = _parse_section(cls, data, "")
        _validate(cfg)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RecipeConfig:
        """Load a recipe file; ``name`` defaults to the file's stem.

        Raises:
            ConfigError: if the file is missing or not valid YAML, or as :meth:`from_dict`.
        """
        path = Path(path)
        if not path.is_file():
            nearby = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
            hint = f" Recipes in {path.parent}: {', '.join(nearby)}" if nearby else ""
            raise ConfigError(f"recipe file not found: {path}.{hint}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read recipe {path}: {err}") from err
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path} must hold a mapping of keys to values at the top level, got {type(data).__name__}")
        data = dict(data)
        data.setdefault("name", path.stem)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-dumpable); ``RecipeConfig.from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The recipe as YAML text (sections in declaration order)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def apply_overrides(self, overrides: Sequence[str]) -> RecipeConfig:
        """A new recipe with ``key=value`` overrides applied, e.g. ``["strategy.name=fedprox"]``.

        Keys are dotted paths (``data.partition_options.beta=0.3`` reaches into mappings);
        values are parsed with ``yaml.safe_load`` (``[1, 3]``, ``null``, ``0.5``, ``true``). A
        number given for a text key is kept as text. The result is validated as a whole.

        Raises:
            ConfigError: on a malformed override or an unknown key (naming the valid keys at
                that level), or as :meth:`from_dict`.
        """
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = str(item).partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. strategy.name=fedprox")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                raise ConfigError(f"cannot parse the value of `{key}` ({raw!r}) as YAML: {err}") from err
            _set_path(data, key, value, raw)
        return type(self).from_dict(data)

    # -------------------------------------------------------------- derived
    def resolved_run_dir(self) -> Path:
        """``run_dir``, or ``runs/<name>`` when it is null."""
        return Path(self.run_dir) if self.run_dir is not None else Path("runs") / self.name


def _set_path(data: dict[str, Any], key: str, value: Any, raw: str) -> None:
    """Set dotted ``key`` in the dict form of a recipe, checking each level against the dataclasses."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part; use dotted keys like data.batch_size")
    cls: type | None = RecipeConfig
    node: dict[str, Any] = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if cls is not None:  # a dataclass level: the key must be one of its fields
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key(dotted, part, names, f" (from --set {key}={raw})")
            hint = _hints(cls)[part]
            if last:
                if _accepts_str(hint) and isinstance(value, (bool, int, float)):
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
            raise ConfigError(f"`{'.'.join(parts[:i + 1])}` is {_type_name(hint)}, it has no key `{parts[i + 1]}`")
        # inside a free-form mapping (options, kwargs, trainer)
        if last:
            node[part] = value
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


# --------------------------------------------------------------------------------------------
# building a run
# --------------------------------------------------------------------------------------------


def default_listeners(run_dir: str | os.PathLike[str], *, progress: bool = True) -> list[Any]:
    """``[RichProgress(), MetricsWriter(run_dir), PlotWriter(run_dir)]`` (no progress bar if ``progress`` is false)."""
    from lightning_fedprune.reporting import MetricsWriter, PlotWriter, RichProgress

    listeners: list[Any] = [RichProgress()] if progress else []
    return [*listeners, MetricsWriter(run_dir), PlotWriter(run_dir)]


def _model_kwargs(cfg: ModelConfig, splits: Any) -> dict[str, Any]:
    """``cfg.kwargs`` plus the input/output sizes the model accepts, taken from the dataset."""
    from lightning_fedprune.models import model_info
    from lightning_fedprune.models.registry import TIMM_PREFIX

    if cfg.name.startswith(TIMM_PREFIX):
        params, task = {"num_classes", "in_channels"}, "classification"
    else:
        info = model_info(cfg.name)
        params, task = set(inspect.signature(info.fn).parameters), info.task
    if task != splits.task:
        raise ConfigError(
            f"`model.name` {cfg.name!r} is a {task.replace('_', ' ')} model but dataset {splits.name!r} is a "
            f"{splits.task.replace('_', ' ')} task; pick a matching model (e.g. "
            f"{'lstm_lm' if splits.task == 'language_model' else 'mlp or cnn_mnist'})"
        )
    shape = tuple(int(s) for s in splits.input_shape)
    inferred: dict[str, Any] = {}
    if splits.task == "language_model":
        inferred["vocab_size"] = int(splits.num_classes)
    else:
        inferred["num_classes"] = int(splits.num_classes)
        inferred["in_features"] = int(math.prod(shape))
        if len(shape) == 3:
            inferred["in_channels"] = shape[0]
    out = {k: v for k, v in inferred.items() if k in params}
    out.update(cfg.kwargs)
    return out


def build_run(cfg: RecipeConfig, listeners: Sequence[Any] | None = None) -> tuple[Any, int]:
    """Compose a run from a recipe: data -> partition -> model -> strategy -> runtime -> engine.

    Args:
        cfg: the recipe.
        listeners: engine listeners (default :func:`default_listeners` of the run folder).

    Returns:
        ``(engine, cfg.rounds)``; run it with ``engine.run(rounds, resume=...)``.

    Raises:
        ConfigError, DataError, ModelError: on settings that only fail once the objects are built
            (e.g. a missing dataset file, a model argument the architecture rejects).
    """
    from lightning_fedprune.data import load_dataset, make_partition
    from lightning_fedprune.data.federated import FederatedDataset
    from lightning_fedprune.runtime import ClientRuntime
    from lightning_fedprune.simulation import SimulationEngine, make_devices
    from lightning_fedprune.simulation.devices import fedmp_devices
    from lightning_fedprune.strategies import STRATEGIES

    torch.set_num_threads(1)
    d, m, s = cfg.data, cfg.model, cfg.strategy
    run_dir = cfg.resolved_run_dir()

    splits = load_dataset(d.name, root=d.root, **d.options)
    partition = make_partition(
        d.partition,
        splits.train_targets,
        d.num_clients,
        seed=cfg.seed,
        local_test_fraction=d.local_test_fraction,
        **d.partition_options,
    )
    fed_data = FederatedDataset.from_partition(splits, partition, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size)

    language_model = splits.task == "language_model"
    torch.manual_seed(cfg.seed)  # the initial global weights depend only on the seed
    module_cls = FederatedLanguageModel if language_model else FederatedClassifier
    module = module_cls(
        m.name, lr=m.lr, momentum=m.momentum, weight_decay=m.weight_decay, optimizer=m.optimizer, **_model_kwargs(m, splits)
    )
    if language_model:
        module.example_input_array = torch.zeros((1, *splits.input_shape), dtype=torch.long)
    else:
        module.federated_example_input_shape = tuple(int(v) for v in splits.input_shape)

    v = cfg.devices
    if v.scenario is not None or v.clusters:
        devices = fedmp_devices(
            v.scenario if v.scenario is not None else dict(v.clusters),
            seed=cfg.seed,
            availability=v.availability,
            failure_prob=v.failure_prob,
        )
    else:
        devices = make_devices(
            d.num_clients,
            seed=cfg.seed,
            compute_gflops=v.compute_gflops,
            uplink_mbps=v.uplink_mbps,
            downlink_mbps=v.downlink_mbps,
            availability=v.availability,
            failure_prob=v.failure_prob,
        )

    strategy_kwargs: dict[str, Any] = {
        "fraction_fit": s.fraction_fit,
        "min_fit_clients": s.min_fit_clients,
        "local_epochs": s.local_epochs,
        "local_steps": s.local_steps,
        "seed": cfg.seed,
        **s.options,
    }
    valid = strategy_options(s.name)
    if "momentum" in valid and "momentum" not in s.options:
        strategy_kwargs["momentum"] = m.momentum
    if s.local_work_by_capability:
        strategy_kwargs["client_local_steps"] = _capability_steps(s, fed_data, devices, d.batch_size)
    if "client_uplink" in valid and "client_uplink" not in s.options and "keep_ratios" not in s.options:
        strategy_kwargs["client_uplink"] = {c: dev.uplink_bytes_per_second for c, dev in enumerate(devices)}
    if s.name == "scaffold" and m.optimizer == "sgd" and m.momentum > 0:
        log.warning(
            "strategy scaffold with model.momentum=%g: SCAFFOLD's control variates are estimated for plain SGD "
            "and momentum can make training diverge; set model.momentum: 0.0 (and raise model.lr instead)",
            m.momentum,
        )
    try:
        strategy = STRATEGIES[s.name](**strategy_kwargs)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"invalid `strategy` settings for {s.name!r}: {err}") from err

    if getattr(strategy, "needs_server_pruning", False):
        # PruneFL's initial pruning at the server (sample-based: an ordinary Lightning training)
        from lightning_fedprune.callbacks.masking import run_server_pruning

        run_server_pruning(strategy, module, splits=splits, partition=partition, batch_size=d.batch_size, seed=cfg.seed)
    runtime = ClientRuntime(
        module, data=fed_data, seed=cfg.seed, client_callbacks=strategy.client_callbacks, trainer_kwargs=dict(cfg.trainer)
    )
    e = cfg.engine
    engine = SimulationEngine(
        strategy=strategy,
        runtime=runtime,
        data=fed_data,
        devices=devices,
        seed=cfg.seed,
        eval_every=cfg.eval_every,
        target_accuracy=cfg.target_accuracy,
        run_dir=run_dir,
        checkpoint_every=cfg.checkpoint_every,
        listeners=list(listeners) if listeners is not None else default_listeners(run_dir),
        perplexity=language_model,
        mode=e.mode,
        async_m=e.async_m,
        deadline_fraction=e.deadline_fraction,
        deadline_factor=e.deadline_factor,
        deadline_backoff=e.deadline_backoff,
        join_rounds=dict(e.join_rounds),
    )
    log.info("built run %r: %s, %d clients, %s on %s", cfg.name, s.name, d.num_clients, m.name, d.name)
    return engine, cfg.rounds


def _capability_steps(s: StrategyConfig, fed_data: Any, devices: Sequence[Any], batch_size: int) -> dict[int, int]:
    """Local iterations per client scaled by device speed (the fastest does its full local work)."""
    fastest = max(dev.flops_per_second for dev in devices)
    out = {}
    for c, dev in enumerate(devices):
        full = s.local_steps if s.local_steps is not None else s.local_epochs * max(1, math.ceil(fed_data.num_train_samples(c) / batch_size))
        out[c] = max(1, int(round(full * dev.flops_per_second / fastest)))
    return out
