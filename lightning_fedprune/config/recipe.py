"""The recipe: one YAML file, typed and validated, mirroring the objects a run is built from.

A recipe's sections mirror the objects of a run::

    name: digits_fedavg            # default: the file name without .yaml
    seed: 0
    rounds: 30
    run_dir: null                  # default: runs/<name>
    target_accuracy: 0.95
    eval_every: 1
    checkpoint_every: 1
    data: {name: digits, num_clients: 10, partition: iid, batch_size: 20}      # DataConfig
    model: {name: mlp, lr: 0.05}                                               # ModelConfig
    strategy: {name: fedavg, local_epochs: 1, options: {}, wrappers: []}       # StrategyConfig
    devices: {compute_gflops: [1.0, 10.0]}                                     # DevicesConfig
    engine: {mode: sync}                                                       # EngineConfig
    trainer: {}                                                                # extra Trainer kwargs

Every key is checked when the recipe is loaded: an unknown key, a value of the wrong type or an
unknown dataset / model / strategy / wrapper / option raises
:class:`~lightning_fedprune.errors.ConfigError` naming the dotted key and the valid choices. Ints
are accepted where a float is expected. Strategy and wrapper options are read from the registered
classes' signatures (:mod:`lightning_fedprune.strategies.registry`).

Relative paths (``run_dir``, ``data.root``) are relative to the current working directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_fedprune.config.schema import (
    check,
    check_choice,
    coerce,
    parse_section,
    set_path,
    suggest,
)
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.trainer_utils import ACCELERATORS

__all__ = [
    "DataConfig",
    "ModelConfig",
    "WrapperConfig",
    "LoggerConfig",
    "StrategyConfig",
    "DevicesConfig",
    "EngineConfig",
    "RecipeConfig",
    "RESERVED_TRAINER_KEYS",
    "STRATEGY_FIELDS",
    "validate",
    "validate_strategy",
]

#: Trainer arguments the client runtime sets itself (local work comes from each task).
RESERVED_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "callbacks", "max_time")
#: Strategy constructor arguments that have their own key in ``strategy:`` (or the recipe's ``seed``).
STRATEGY_FIELDS = ("fraction_fit", "min_fit_clients", "local_epochs", "local_steps")

log = logging.getLogger(__name__)


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
        lr_schedule: the learning rate over each round's local epochs, for any strategy:
            ``constant`` (default) or ``cosine`` (``lr * (1 + cos(pi * e / E)) / 2`` in local
            epoch ``e`` of ``E``, restarting every round: FedDP's per-epoch cosine decay; see
            :mod:`lightning_fedprune.core.schedules`). Needs ``strategy.local_epochs`` (a round
            of ``local_steps`` is one local epoch).
    """

    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    lr_schedule: str = "constant"


@dataclass
class WrapperConfig:
    """One strategy wrapper: ``WRAPPERS[name](inner, **options)``.

    Attributes:
        name: a registered wrapper (``lightning_fedprune.strategies.WRAPPERS``).
        options: the wrapper's keyword arguments.
    """

    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    """One Lightning logger that receives the round metrics (step = round).

    Attributes:
        name: ``csv``, ``tensorboard``, ``mlflow`` or ``wandb``
            (:data:`lightning_fedprune.reporting.LOGGERS`).
        options: the logger's keyword arguments (by default it writes under the run folder, see
            :func:`lightning_fedprune.reporting.make_logger`), e.g. ``{offline: true}`` for wandb.
    """

    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyConfig:
    """Feeds the strategy constructor ``STRATEGIES[name](...)`` (and its wrappers).

    Attributes:
        name: a registered strategy (``lightning_fedprune.strategies.STRATEGIES``): ``fedavg``
            (Syn-FL), ``fedprox``, ``fednova``, ``scaffold``, ``fedmp``, ``upfl``, ``flexcom``,
            ``prunefl``, ...
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
        wrappers: strategy wrappers applied around the strategy, innermost first, e.g.
            ``[{name: fedprox, options: {mu: 0.01}}]`` (``lightning_fedprune.strategies.WRAPPERS``).
    """

    name: str = "fedavg"
    fraction_fit: float = 1.0
    min_fit_clients: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    local_work_by_capability: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    wrappers: list[WrapperConfig] = field(default_factory=list)


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
        memory_mb: training memory of every device in MiB (a number, or ``[lo, hi]`` log-uniform);
            ``null``: not limited. Strategies that fit sub-models to devices (NestFL) read it.
    """

    scenario: str | None = None
    clusters: dict[str, int] = field(default_factory=dict)
    compute_gflops: float | list[float] = field(default_factory=lambda: [1.0, 10.0])
    uplink_mbps: float | list[float] = field(default_factory=lambda: [1.0, 10.0])
    downlink_mbps: float | list[float] = field(default_factory=lambda: [5.0, 50.0])
    availability: float = 1.0
    failure_prob: float = 0.0
    memory_mb: float | list[float] | None = None


@dataclass
class EngineConfig:
    """How rounds end: the round rules (:class:`~lightning_fedprune.core.rounds.RoundRules`) of either transport.

    Attributes:
        mode: ``sync`` (the slowest participant ends the round), ``deadline`` (FedMP's 1.5 x the
            time 85% arrived; late clients dropped for the round) or ``async`` (aggregate the first
            ``async_m`` arrivals; the others keep training).
        async_m: results per round in ``async`` mode.
        deadline_fraction: ``deadline`` mode: the fraction whose arrival sets ``d``.
        deadline_factor: ``deadline`` mode: deadline = factor x ``d``.
        deadline_backoff: ``deadline`` mode: rounds a late client sits out.
        join_rounds: client id -> first round it takes part in (clients joining mid-training).
        workers: simulation: worker processes that train a round's clients side by side (results
            bit-identical to 1 worker), or ``auto`` (the usable cores). On the 2-core machines
            measured, 2 workers bring the CNN workload of ``benchmarks/parallel_clients.py`` to a
            critical path (CPU seconds per round of the engine's process plus its busiest worker)
            of 0.62-0.68x the plain sequential loop's CPU seconds, 0.56-0.63x with ``overlap_eval``
            (counted as that script's docstring says), and the default digits MLP to
            0.68x of 1 worker's (its local training is so short that the engine's own work
            weighs: 1.5x the plain loop's). On a machine whose cores are busy with other work,
            more workers only compete for them, so the default is 1.
        accelerator: simulation: where clients train: ``cpu`` (the default), ``cuda`` (every
            worker on a GPU; an error without one) or ``auto`` (CUDA when a GPU is visible, else
            the CPU). The CUDA path is written but not yet measured on a GPU machine.
        workers_per_gpu: simulation, on CUDA: worker processes that share each GPU (``workers:
            auto`` starts this many per GPU).
        client_memory_mb: simulation: MiB of clients' persistent states (SCAFFOLD's ``c_i``,
            personalized layers) kept in memory; the least recently used beyond it are spilled
            to disk (``null``: no limit).
        overlap_eval: simulation, with ``workers`` > 1 in ``sync`` and ``deadline`` mode: send
            round ``t+1``'s tasks to the workers right after aggregating round ``t``, then
            evaluate round ``t``'s global model, write its record and its checkpoint while they
            train (``true``, the default). Records (but wall/CPU times), checkpoints and results
            are the same as with ``false`` (one round after the other); a run that stops after
            round ``t`` (target accuracy, Ctrl-C) drops round ``t+1`` unseen. Ignored in ``async``
            mode and with 1 worker.
    """

    mode: str = "sync"
    async_m: int | None = None
    deadline_fraction: float = 0.85
    deadline_factor: float = 1.5
    deadline_backoff: int = 1
    join_rounds: dict[int, int] = field(default_factory=dict)
    workers: int | str = 1
    accelerator: str = "cpu"
    workers_per_gpu: int = 1
    client_memory_mb: float | None = None
    overlap_eval: bool = True


# --------------------------------------------------------------------------------------------
# semantic checks
# --------------------------------------------------------------------------------------------


def _check_options(given: Mapping[str, Any], valid: Mapping[str, Any], prefix: str, owner: str, reserved: Sequence[str] = ()) -> None:
    choices = sorted(k for k in valid if k not in (*reserved, "seed"))
    for key in given:
        if key in reserved:
            raise ConfigError(f"`{prefix}.{key}`: set it as `strategy.{key}` instead")
        if key == "seed":
            raise ConfigError(f"`{prefix}.seed`: the strategy is seeded with the recipe's top-level `seed`; set that instead")
        if key not in valid:
            raise ConfigError(
                f"unknown key `{prefix}.{key}` for {owner}; valid options: "
                f"{', '.join(choices) or 'none'}.{suggest(key, choices)}"
            )
    for key, value in given.items():
        coerce(value, valid[key][1], f"{prefix}.{key}")  # type check only; the value is kept as given


def validate_strategy(cfg: RecipeConfig) -> None:
    """Check the ``strategy`` section: the strategy and wrapper names and their options."""
    from lightning_fedprune.strategies import STRATEGIES, WRAPPERS, strategy_options, wrapper_options

    s, m = cfg.strategy, cfg.model
    check_choice(s.name, "strategy.name", sorted(STRATEGIES))
    valid = strategy_options(s.name)
    check(0.0 < s.fraction_fit <= 1.0, "strategy.fraction_fit", "a number in (0, 1]", s.fraction_fit)
    check(s.min_fit_clients >= 1, "strategy.min_fit_clients", "an integer >= 1", s.min_fit_clients)
    check(s.local_epochs >= 1, "strategy.local_epochs", "an integer >= 1", s.local_epochs)
    if s.local_steps is not None:
        check(s.local_steps >= 1, "strategy.local_steps", "null or an integer >= 1", s.local_steps)
    _check_options(s.options, valid, "strategy.options", f"strategy {s.name!r}", STRATEGY_FIELDS)
    if "momentum" in valid and "momentum" in s.options and s.options["momentum"] != m.momentum:
        raise ConfigError(
            f"`strategy.options.momentum` ({s.options['momentum']!r}) differs from `model.momentum` ({m.momentum!r}); "
            f"{s.name} needs the clients' momentum: drop the option (it defaults to model.momentum) or make them equal"
        )
    takes_steps = "client_local_steps" in valid
    for i, w in enumerate(s.wrappers):
        check_choice(w.name, f"strategy.wrappers[{i}].name", sorted(WRAPPERS))
        w_valid = wrapper_options(w.name)
        _check_options(w.options, w_valid, f"strategy.wrappers[{i}].options", f"wrapper {w.name!r}")
        takes_steps = takes_steps or "client_local_steps" in w_valid
    if s.local_work_by_capability:
        check(
            takes_steps, "strategy.local_work_by_capability",
            "false for a strategy without `client_local_steps` (use fedprox, or wrap with fedprox)", s.local_work_by_capability,
        )


def _check_span(value: float | list[float], key: str) -> None:
    if isinstance(value, list):
        check(len(value) == 2 and 0 < value[0] <= value[1] and math.isfinite(value[1]), key, "a number > 0 or [lo, hi] with 0 < lo <= hi", value)
    else:
        check(value > 0 and math.isfinite(value), key, "a number > 0 or [lo, hi] with 0 < lo <= hi", value)


def validate(cfg: RecipeConfig) -> None:
    """Check every value of a parsed recipe (:class:`ConfigError` naming the dotted key)."""
    from lightning_fedprune.core.schedules import LR_SCHEDULES
    from lightning_fedprune.data import PARTITION_SCHEMES, available_datasets
    from lightning_fedprune.models import list_models
    from lightning_fedprune.models.modules import OPTIMIZERS
    from lightning_fedprune.models.registry import TIMM_PREFIX

    check(bool(cfg.name.strip()) and "/" not in cfg.name, "name", "a non-empty name without '/'", cfg.name)
    check(cfg.seed >= 0, "seed", "an integer >= 0", cfg.seed)
    check(cfg.rounds >= 1, "rounds", "an integer >= 1", cfg.rounds)
    check(cfg.eval_every >= 1, "eval_every", "an integer >= 1", cfg.eval_every)
    check(cfg.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1", cfg.checkpoint_every)
    if cfg.target_accuracy is not None:
        check(0.0 < cfg.target_accuracy <= 1.0, "target_accuracy", "null or a number in (0, 1]", cfg.target_accuracy)

    d = cfg.data
    name = d.name.strip().lower().replace("-", "_")
    check_choice(name, "data.name", available_datasets())
    check(d.num_clients >= 1, "data.num_clients", "an integer >= 1", d.num_clients)
    check_choice(d.partition, "data.partition", list(PARTITION_SCHEMES))
    check(0.0 <= d.local_test_fraction < 1.0, "data.local_test_fraction", "a number in [0, 1)", d.local_test_fraction)
    check(d.batch_size >= 1, "data.batch_size", "an integer >= 1", d.batch_size)
    check(d.eval_batch_size >= 1, "data.eval_batch_size", "an integer >= 1", d.eval_batch_size)

    m = cfg.model
    if not m.name.startswith(TIMM_PREFIX):
        check_choice(m.name, "model.name", list_models(), f" Any timm architecture works as '{TIMM_PREFIX}<name>'.")
    check_choice(m.optimizer, "model.optimizer", list(OPTIMIZERS))
    check(m.lr > 0 and math.isfinite(m.lr), "model.lr", "a number > 0", m.lr)
    check(0.0 <= m.momentum < 1.0, "model.momentum", "a number in [0, 1)", m.momentum)
    check(m.weight_decay >= 0, "model.weight_decay", "a number >= 0", m.weight_decay)
    check_choice(m.lr_schedule, "model.lr_schedule", list(LR_SCHEDULES))
    if m.lr_schedule != "constant" and cfg.strategy.local_steps is not None:
        raise ConfigError(
            f"`model.lr_schedule: {m.lr_schedule}` changes the learning rate per local epoch, but `strategy.local_steps` "
            f"({cfg.strategy.local_steps}) makes each round one local epoch. HINT: set `strategy.local_epochs` and "
            "`strategy.local_steps: null`"
        )

    validate_strategy(cfg)

    v = cfg.devices
    if v.scenario is not None or v.clusters:
        from lightning_fedprune.core.devices import fedmp_device_specs

        check(v.scenario is None or not v.clusters, "devices.clusters", "empty when `devices.scenario` is set", v.clusters)
        specs = fedmp_device_specs(v.scenario if v.scenario is not None else v.clusters, seed=cfg.seed)
        check(
            len(specs) == d.num_clients, "data.num_clients",
            f"{len(specs)} to match devices.{'scenario' if v.scenario is not None else 'clusters'}", d.num_clients,
        )
    for key in ("compute_gflops", "uplink_mbps", "downlink_mbps"):
        _check_span(getattr(v, key), f"devices.{key}")
    if v.memory_mb is not None:
        _check_span(v.memory_mb, "devices.memory_mb")
    check(0.0 < v.availability <= 1.0, "devices.availability", "a number in (0, 1]", v.availability)
    check(0.0 <= v.failure_prob < 1.0, "devices.failure_prob", "a number in [0, 1)", v.failure_prob)

    e = cfg.engine
    check_choice(e.mode, "engine.mode", ["sync", "deadline", "async"])
    if e.mode == "async":
        check(e.async_m is not None and e.async_m >= 1, "engine.async_m", "an integer >= 1 in async mode", e.async_m)
    check(0.0 < e.deadline_fraction <= 1.0, "engine.deadline_fraction", "a number in (0, 1]", e.deadline_fraction)
    check(e.deadline_factor >= 1.0, "engine.deadline_factor", "a number >= 1", e.deadline_factor)
    check(e.deadline_backoff >= 0, "engine.deadline_backoff", "an integer >= 0", e.deadline_backoff)
    check(
        e.workers == "auto" or (isinstance(e.workers, int) and e.workers >= 1), "engine.workers",
        "an integer >= 1 or auto", e.workers,
    )
    check_choice(e.accelerator, "engine.accelerator", ACCELERATORS)
    check(isinstance(e.workers_per_gpu, int) and e.workers_per_gpu >= 1, "engine.workers_per_gpu", "an integer >= 1", e.workers_per_gpu)
    check(isinstance(e.overlap_eval, bool), "engine.overlap_eval", "true or false", e.overlap_eval)
    if e.client_memory_mb is not None:
        check(e.client_memory_mb >= 0, "engine.client_memory_mb", "null or a number >= 0", e.client_memory_mb)
    for c, r in e.join_rounds.items():
        check(0 <= c < d.num_clients and r >= 0, f"engine.join_rounds.{c}", "a client id below data.num_clients -> round >= 0", r)

    reserved = [k for k in cfg.trainer if k in RESERVED_TRAINER_KEYS]
    if reserved:
        raise ConfigError(
            f"`trainer.{reserved[0]}` cannot be set: the client runtime sets local work from each round's task; "
            "use `strategy.local_epochs` / `strategy.local_steps`"
        )
    _validate_loggers(cfg)
    trainer_params = _trainer_params()
    for key in cfg.trainer:
        if key not in trainer_params:
            raise ConfigError(
                f"unknown key `trainer.{key}`: not an argument of lightning.pytorch.Trainer.{suggest(key, trainer_params)} "
                f"Valid keys: {', '.join(k for k in trainer_params if k not in RESERVED_TRAINER_KEYS)}"
            )


def _validate_loggers(cfg: RecipeConfig) -> None:
    from lightning_fedprune.reporting import LOGGERS, logger_options

    for i, lg in enumerate(cfg.loggers):
        check_choice(lg.name, f"loggers[{i}].name", list(LOGGERS))
        valid = logger_options(lg.name)
        for key in lg.options:
            if key not in valid:
                raise ConfigError(
                    f"unknown key `loggers[{i}].options.{key}` for the {lg.name} logger; valid options: "
                    f"{', '.join(valid)}.{suggest(key, valid)}"
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
        loggers: Lightning loggers that receive every round's metrics with step = round, e.g.
            ``[{name: csv}, {name: tensorboard}]`` (:class:`LoggerConfig`).
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
    loggers: list[LoggerConfig] = field(default_factory=list)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecipeConfig:
        """Build and validate a recipe from a (YAML-like) mapping.

        Raises:
            ConfigError: on an unknown key, a wrongly typed value or an invalid choice; the
                message names the dotted key and the valid keys or values.
        """
        cfg = parse_section(cls, data, "")
        validate(cfg)
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
        Changing ``model.name`` resets ``model.kwargs`` (the old model's arguments) unless the same
        overrides set ``model.kwargs`` too.

        Raises:
            ConfigError: on a malformed override or an unknown key (naming the valid keys at
                that level), or as :meth:`from_dict`.
        """
        data = self.to_dict()
        keys = [str(item).partition("=")[0].strip() for item in overrides]
        kwargs_given = any(k == "model.kwargs" or k.startswith("model.kwargs.") for k in keys)
        for item in overrides:
            key, sep, raw = str(item).partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. strategy.name=fedprox")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                raise ConfigError(f"cannot parse the value of `{key}` ({raw!r}) as YAML: {err}") from err
            old_model = data["model"]["name"]
            set_path(RecipeConfig, data, key, value, raw)
            if key == "model.name" and data["model"]["name"] != old_model and data["model"]["kwargs"] and not kwargs_given:
                # another architecture: the recipe's arguments were for the old one
                log.info(
                    "`model.name` changed from %r to %r: `model.kwargs` %s reset to {} (set model.kwargs too to give arguments)",
                    old_model, data["model"]["name"], data["model"]["kwargs"],
                )
                data["model"]["kwargs"] = {}
        return type(self).from_dict(data)

    # -------------------------------------------------------------- derived
    def resolved_run_dir(self) -> Path:
        """``run_dir``, or ``runs/<name>`` when it is null."""
        return Path(self.run_dir) if self.run_dir is not None else Path("runs") / self.name
