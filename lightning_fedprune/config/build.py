"""Building a run's parts from a recipe, once, for any transport.

:func:`build_parts` turns a :class:`~lightning_fedprune.config.RecipeConfig` into
:class:`RunParts` for one *role*:

==============  ===========================================================================
role            what is built
==============  ===========================================================================
``simulation``  data, module, devices, strategy (server-side pruning included, initialized),
                runtime, evaluator
``server``      data (for the test set and a server-side sample), module, strategy
                (initialized), evaluator; devices only when the strategy is told about them
                (:func:`needs_devices`)
``client``      module, runtime over the client's data (the whole dataset's partition, or
                an exported folder); no strategy, no devices, no server-side pruning
==============  ===========================================================================

The simulation (:func:`lightning_fedprune.simulation.build_engine`) and a FedML deployment
(:mod:`lightning_fedprune.fedml_adapters.components`) both start from it, so a deployment and a
simulation of one recipe start from the same state. Every step is also a public function
(:func:`build_data`, :func:`build_module`, :func:`build_devices`, :func:`build_strategy`), and
the strategy is initialized by :func:`lightning_fedprune.runtime.initialize_strategy`.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_fedprune.config.recipe import ModelConfig, RecipeConfig, StrategyConfig
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.models.modules import ClassifierModule, LanguageModelModule
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.trainer_utils import check_trainer_settings

log = logging.getLogger(__name__)

__all__ = [
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
]

#: what :func:`build_parts` can build for
ROLES = ("simulation", "server", "client")


class FederatedClassifier(FederatedModuleMixin, ClassifierModule):
    """:class:`~lightning_fedprune.models.ClassifierModule` that takes part in federated training."""


class FederatedLanguageModel(FederatedModuleMixin, LanguageModelModule):
    """:class:`~lightning_fedprune.models.LanguageModelModule` that takes part in federated training.

    The embedding and the output layer are never pruned. FLOPs are counted by
    :func:`lightning_fedprune.core.flops.forward_flops`, which counts LSTMs analytically.
    """

    federated_unprunable = ("classifier", "embedding")


@dataclass
class RunParts:
    """What a run is made of (see the module docstring for which role gets which part).

    Attributes:
        recipe: the recipe.
        role: ``"simulation"``, ``"server"`` or ``"client"``.
        module: the federated module (the runtime's, or the one the strategy started from).
        strategy: the strategy, initialized (``None`` for a client).
        runtime: the client runtime (``None`` for a server).
        data: the clients' data (a :class:`~lightning_fedprune.data.FederatedDataset`, or the
            exported data of a client process).
        devices: device profiles (``None`` when not built).
        evaluator: the global model's evaluator (``None`` for a client).
        splits / partition: the dataset and its partition (``None`` when not loaded).
        num_clients: clients of the run.
        perplexity: the task reports perplexity (language models).
    """

    recipe: RecipeConfig
    role: str
    module: Any
    strategy: Any = None
    runtime: Any = None
    data: Any = None
    devices: list[Any] | None = None
    evaluator: Any = None
    splits: Any = None
    partition: Any = None
    num_clients: int = 0
    perplexity: bool = False

    def make_module(self) -> Any:
        """A fresh module of the run's architecture with the run's initial weights."""
        info = self.splits if self.splits is not None else getattr(self.data, "info", None)
        if info is None:
            raise ConfigError("make_module needs the dataset's description (splits or the exported data's info)")
        return build_module(self.recipe, info)


def default_listeners(run_dir: str | os.PathLike[str], *, progress: bool = True) -> list[Any]:
    """``[RichProgress(), MetricsWriter(run_dir), PlotWriter(run_dir)]`` (no progress bar if ``progress`` is false)."""
    from lightning_fedprune.reporting import MetricsWriter, PlotWriter, RichProgress

    listeners: list[Any] = [RichProgress()] if progress else []
    return [*listeners, MetricsWriter(run_dir), PlotWriter(run_dir)]


def recipe_listeners(cfg: RecipeConfig) -> list[Any]:
    """The listeners the recipe itself asks for: its ``loggers`` (one
    :class:`~lightning_fedprune.reporting.LightningLoggers` with the recipe as hyperparameters), or none.

    Raises:
        ConfigError: a logger whose package is not installed.
    """
    from lightning_fedprune.reporting import LightningLoggers, make_logger

    if not cfg.loggers:
        return []
    run_dir = cfg.resolved_run_dir()
    return [LightningLoggers([make_logger(lg.name, lg.options, run_dir=run_dir) for lg in cfg.loggers], hparams=cfg.to_dict())]


def model_kwargs(cfg: ModelConfig, info: Any) -> dict[str, Any]:
    """``cfg.kwargs`` plus the input/output sizes the model accepts, taken from the dataset ``info``
    (``name``, ``task``, ``num_classes``, ``input_shape``).

    Raises:
        ConfigError: the model's task (classification, language model) is not the dataset's.
    """
    from lightning_fedprune.models import model_info
    from lightning_fedprune.models.registry import TIMM_PREFIX

    if cfg.name.startswith(TIMM_PREFIX):
        params, task = {"num_classes", "in_channels"}, "classification"
    else:
        minfo = model_info(cfg.name)
        params, task = set(inspect.signature(minfo.fn).parameters), minfo.task
    if task != info.task:
        raise ConfigError(
            f"`model.name` {cfg.name!r} is a {task.replace('_', ' ')} model but dataset {info.name!r} is a "
            f"{info.task.replace('_', ' ')} task; pick a matching model (e.g. "
            f"{'lstm_lm' if info.task == 'language_model' else 'mlp or cnn_mnist'})"
        )
    shape = tuple(int(s) for s in info.input_shape)
    inferred: dict[str, Any] = {}
    if info.task == "language_model":
        inferred["vocab_size"] = int(info.num_classes)
    else:
        inferred["num_classes"] = int(info.num_classes)
        inferred["in_features"] = int(math.prod(shape))
        if len(shape) == 3:
            inferred["in_channels"] = shape[0]
    out = {k: v for k, v in inferred.items() if k in params}
    out.update(cfg.kwargs)
    return out


def build_module(cfg: RecipeConfig, info: Any) -> Any:
    """The recipe's federated module; its initial weights depend only on ``cfg.seed``.

    Args:
        cfg: the recipe.
        info: the dataset's ``name``, ``task``, ``num_classes`` and ``input_shape`` (a
            :class:`~lightning_fedprune.data.DatasetSplits` or an exported folder's ``info``).
    """
    m = cfg.model
    language_model = info.task == "language_model"
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # the initial global weights depend only on the seed
    module_cls = FederatedLanguageModel if language_model else FederatedClassifier
    module = module_cls(
        m.name, lr=m.lr, momentum=m.momentum, weight_decay=m.weight_decay, optimizer=m.optimizer, **model_kwargs(m, info)
    )
    if language_model:
        module.example_input_array = torch.zeros((1, *info.input_shape), dtype=torch.long)
    else:
        module.federated_example_input_shape = tuple(int(v) for v in info.input_shape)
    return module


def build_data(cfg: RecipeConfig) -> tuple[Any, Any, Any]:
    """``(splits, partition, federated data)`` of the recipe's ``data`` section."""
    from lightning_fedprune.data import load_dataset, make_partition
    from lightning_fedprune.data.federated import FederatedDataset

    d = cfg.data
    splits = load_dataset(d.name, root=d.root, **d.options)
    partition = make_partition(
        d.partition, splits.train_targets, d.num_clients, seed=cfg.seed, local_test_fraction=d.local_test_fraction,
        groups=splits.train_groups, **d.partition_options,
    )
    fed_data = FederatedDataset.from_partition(splits, partition, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size)
    return splits, partition, fed_data


def build_devices(cfg: RecipeConfig) -> list[Any]:
    """The recipe's device profiles (``devices`` section: FedMP's scenarios or generic ranges)."""
    from lightning_fedprune.core.devices import fedmp_devices, make_devices, with_memory

    v = cfg.devices
    if v.scenario is not None or v.clusters:
        devices = fedmp_devices(
            v.scenario if v.scenario is not None else dict(v.clusters), seed=cfg.seed,
            availability=v.availability, failure_prob=v.failure_prob,
        )
    else:
        devices = make_devices(
            cfg.data.num_clients, seed=cfg.seed, compute_gflops=v.compute_gflops, uplink_mbps=v.uplink_mbps,
            downlink_mbps=v.downlink_mbps, availability=v.availability, failure_prob=v.failure_prob,
        )
    return with_memory(devices, v.memory_mb, seed=cfg.seed) if v.memory_mb is not None else devices


def _wants_uplink(cfg: RecipeConfig) -> bool:
    from lightning_fedprune.strategies import strategy_options

    s = cfg.strategy
    return "client_uplink" in strategy_options(s.name) and "client_uplink" not in s.options and "keep_ratios" not in s.options


def _wants_devices(cfg: RecipeConfig) -> bool:
    from lightning_fedprune.strategies import strategy_options

    s = cfg.strategy
    return "devices" in strategy_options(s.name) and "devices" not in s.options and "fixed_rates" not in s.options


def needs_devices(cfg: RecipeConfig) -> bool:
    """Whether the strategy is told about the devices' profiles: capability-scaled local work
    (``strategy.local_work_by_capability``), FlexCom's uplink bandwidths (unless ``keep_ratios``
    or ``client_uplink`` are given) or a strategy taking ``devices`` (NestFL's resource-driven
    rates, unless ``fixed_rates`` are given). A deployment then uses the recipe's profiles as
    declared."""
    return bool(cfg.strategy.local_work_by_capability) or _wants_uplink(cfg) or _wants_devices(cfg)


def client_callbacks_of(cfg: RecipeConfig) -> tuple[str, ...]:
    """The client callbacks of the recipe's strategy and wrappers (what a client's runtime needs)."""
    from lightning_fedprune.strategies.registry import declared_client_callbacks

    s = cfg.strategy
    return declared_client_callbacks(s.name, [w.name for w in s.wrappers])


def _capability_steps(s: StrategyConfig, fed_data: Any, devices: Sequence[Any], batch_size: int) -> dict[int, int]:
    """Local iterations per client scaled by device speed (the fastest does its full local work)."""
    fastest = max(dev.flops_per_second for dev in devices)
    out = {}
    for c, dev in enumerate(devices):
        full = s.local_steps if s.local_steps is not None else s.local_epochs * max(1, math.ceil(fed_data.num_train_samples(c) / batch_size))
        out[c] = max(1, int(round(full * dev.flops_per_second / fastest)))
    return out


def build_strategy(cfg: RecipeConfig, *, data: Any = None, devices: Sequence[Any] | None = None) -> Any:
    """The recipe's strategy (with its wrappers), not initialized.

    Args:
        cfg: the recipe.
        data: the federated data (for capability-scaled local epochs).
        devices: the device profiles, when :func:`needs_devices` says the strategy uses them.

    Raises:
        ConfigError: invalid strategy settings, or device knowledge needed but not given.
    """
    from lightning_fedprune.strategies import STRATEGIES, WRAPPERS, strategy_options, wrapper_options

    s, m = cfg.strategy, cfg.model
    kwargs: dict[str, Any] = {
        "fraction_fit": s.fraction_fit,
        "min_fit_clients": s.min_fit_clients,
        "local_epochs": s.local_epochs,
        "local_steps": s.local_steps,
        "seed": cfg.seed,
        **s.options,
    }
    valid = strategy_options(s.name)
    wrapper_kwargs = [dict(w.options) for w in s.wrappers]
    if "momentum" in valid and "momentum" not in s.options:  # a strategy that must know the clients' momentum
        kwargs["momentum"] = m.momentum
    if needs_devices(cfg) and devices is None:
        raise ConfigError(
            f"strategy {s.name!r} is told about the devices (capability-scaled work or uplink bandwidths) but none "
            "were built; give `keep_ratios` / `client_uplink` in `strategy.options` for a deployment"
        )
    if s.local_work_by_capability:
        assert devices is not None
        steps = _capability_steps(s, data, devices, cfg.data.batch_size)
        if "client_local_steps" in valid:
            kwargs["client_local_steps"] = steps
        else:  # the first wrapper that takes it (validated with the recipe)
            i = next(i for i, w in enumerate(s.wrappers) if "client_local_steps" in wrapper_options(w.name))
            wrapper_kwargs[i]["client_local_steps"] = steps
    if _wants_uplink(cfg):
        assert devices is not None
        kwargs["client_uplink"] = {c: dev.uplink_bytes_per_second for c, dev in enumerate(devices)}
    if _wants_devices(cfg):
        kwargs["devices"] = list(devices or [])
    try:
        strategy = STRATEGIES[s.name](**kwargs)
        for w, wk in zip(s.wrappers, wrapper_kwargs):
            strategy = WRAPPERS[w.name](strategy, **wk)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"invalid `strategy` settings for {s.name!r}: {err}") from err
    return strategy


def build_parts(cfg: RecipeConfig, *, role: str = "simulation", client_data: Any = None) -> RunParts:
    """Build what ``role`` needs from the recipe (see the module docstring).

    Args:
        cfg: the recipe.
        role: ``"simulation"``, ``"server"`` or ``"client"``.
        client_data: a client process's own data (an exported folder's
            :class:`~lightning_fedprune.fedml_adapters.components.LocalClientData`); ``None``
            loads the dataset and partitions it.

    Raises:
        ConfigError, DataError, ModelError: on settings that only fail once the objects are built
            (e.g. a missing dataset file, a model argument the architecture rejects).
    """
    from lightning_fedprune.runtime import ClientRuntime, initialize_strategy

    if role not in ROLES:
        raise ConfigError(f"`role` can be {', '.join(ROLES)}; got {role!r}")
    torch.set_num_threads(1)
    if role != "server":
        check_trainer_settings(cfg.trainer)
    splits = partition = None
    if client_data is not None:
        data, info = client_data, client_data.info
    else:
        splits, partition, data = build_data(cfg)
        info = splits
    module = build_module(cfg, info)
    parts = RunParts(
        recipe=cfg, role=role, module=module, data=data, splits=splits, partition=partition,
        num_clients=cfg.data.num_clients, perplexity=info.task == "language_model",
    )
    if role == "client":
        parts.runtime = ClientRuntime(
            module, data=data, seed=cfg.seed, client_callbacks=client_callbacks_of(cfg), trainer_kwargs=dict(cfg.trainer),
            lr_schedule=cfg.model.lr_schedule,
        )
        return parts
    if role == "simulation" or needs_devices(cfg):
        parts.devices = build_devices(cfg)
    strategy = build_strategy(cfg, data=data, devices=parts.devices)
    if getattr(strategy, "needs_server_pruning", False):
        # PruneFL's initial pruning at the server (sample-based: an ordinary Lightning training)
        from lightning_fedprune.callbacks.server_pruning import run_server_pruning

        run_server_pruning(strategy, module, splits=splits, partition=partition, batch_size=cfg.data.batch_size, seed=cfg.seed)
    if role == "simulation":
        parts.runtime = ClientRuntime(
            module, data=data, seed=cfg.seed, client_callbacks=strategy.client_callbacks, trainer_kwargs=dict(cfg.trainer),
            lr_schedule=cfg.model.lr_schedule,
        )
    from lightning_fedprune.evaluation import GlobalEvaluator

    parts.evaluator = GlobalEvaluator(copy.deepcopy(module), data.test_loader(), perplexity=parts.perplexity)
    initialize_strategy(strategy, module, num_clients=cfg.data.num_clients, data=data)
    parts.strategy = strategy
    log.info("built run %r (%s): %s, %d clients, %s on %s", cfg.name, role, cfg.strategy.name, cfg.data.num_clients, cfg.model.name, cfg.data.name)
    return parts
