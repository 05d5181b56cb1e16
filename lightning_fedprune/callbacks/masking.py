"""PruneFL's Lightning side: keeping pruned weights at zero, and pruning by levels while training.

* :class:`MaskingCallback` (client callback ``"masks"``) trains a masked model: pruned weights
  start at zero, their gradients are zeroed before every optimizer step and the weights are zeroed
  again after it (so momentum or weight decay cannot revive them). In a federated run it reads the
  masks from the task's packed (``weights_format="coo"``) weights, computes sparse FC layers with
  ``torch.sparse`` below a density threshold, and packs the trained weights with the same masks
  into ``ctx.result_weights`` so the upload is sparse too. Given fixed ``masks`` it works in any
  centralized training.
* :class:`IterativeMagnitudePruning` is the joint training-and-pruning of Han et al. (2015) that
  PruneFL runs at the server on a small sample: train ``epochs_per_level`` epochs, prune one level
  with layer-wise rates, repeat until ``target_level``. It is an ordinary Lightning callback, usable
  in any centralized training; :func:`sample_based_pruning` runs it with a plain ``Trainer``.
* :func:`shared_sample_indices` and :func:`biased_sample_indices` choose the server's sample: a
  small share of every client's data, or a biased subset (a few labels, writers or clients).

Why not Lightning's ``ModelPruning``: it prunes through ``torch.nn.utils.prune``, whose
reparametrization replaces ``weight`` by ``weight_orig`` and ``weight_mask`` in the ``state_dict``
until ``make_pruning_permanent`` runs at the end of fit; the federated payload, the server
strategy and the sparse codec are keyed by the plain ``weight`` names. It also applies one amount
to every layer (PruneFL prunes each layer at its own rate, Table 1), keeps no JSON-able mask set
that a server could send, and does not checkpoint its masks (so a resumed run loses them). The
math here lives in :mod:`lightning_fedprune.core.masks`; these callbacks only call it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.core.masks import (
    MaskSet,
    check_levels,
    check_rate,
    layer_rates,
    magnitude_prune,
    pruned_linear_macs,
)
from lightning_fedprune.core.sparse import COO_INDICES, pack_state, payload_masks
from lightning_fedprune.core.sparse_linear import disable_sparse_forward, enable_sparse_forward
from lightning_fedprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "MaskingCallback",
    "IterativeMagnitudePruning",
    "sample_based_pruning",
    "run_server_pruning",
    "shared_sample_indices",
    "biased_sample_indices",
    "sample_loader",
]


def _check_density(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"`{name}` must be null or a number in [0, 1], got {value!r}")
    return float(value)


class _MaskedTraining:
    """The mechanics shared by both callbacks: resolve masks to a module's tensors, zero, go sparse."""

    def __init__(self, sparse_fc_max_density: float | None, sparse_fc_min_weights: int = 0) -> None:
        self.sparse_fc_max_density = sparse_fc_max_density
        self.sparse_fc_min_weights = sparse_fc_min_weights
        self.active: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.sparse_layers: list[nn.Module] = []

    def activate(self, module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.deactivate()
        own = module.state_dict(keep_vars=True)
        for key, m in masks.items():
            if key not in own:
                raise ConfigError(f"mask names layer {key!r}, which {type(module).__name__} does not have")
            if tuple(own[key].shape) != tuple(m.shape):
                raise ConfigError(f"mask of layer {key!r} has shape {tuple(m.shape)}, the model's weight {tuple(own[key].shape)}")
        self.tensors = {k: own[k] for k in masks}
        self.active = {k: m.to(device=own[k].device, dtype=own[k].dtype) for k, m in masks.items()}
        self.zero_weights()
        if self.sparse_fc_max_density is None:
            return
        for key, m in masks.items():
            path, _, attr = key.rpartition(".")
            if attr != "weight":
                continue
            try:
                layer = module.get_submodule(path) if path else module
            except AttributeError:
                continue
            if (
                isinstance(layer, nn.Linear)
                and layer.weight is own[key]
                and layer.weight.numel() >= self.sparse_fc_min_weights
                and float(m.float().mean()) <= self.sparse_fc_max_density
            ):
                enable_sparse_forward(layer, m.to(torch.bool).cpu())
                self.sparse_layers.append(layer)

    def deactivate(self) -> None:
        for layer in self.sparse_layers:
            disable_sparse_forward(layer)
        self.sparse_layers = []
        self.active, self.tensors = {}, {}

    def zero_weights(self) -> None:
        with torch.no_grad():
            for key, m in self.active.items():
                self.tensors[key].mul_(m)

    def zero_grads(self) -> None:
        with torch.no_grad():
            for key, m in self.active.items():
                g = self.tensors[key].grad
                if g is not None:
                    g.mul_(m)


class MaskingCallback(FederatedCallback):
    """Keeps pruned weights at zero during (local) training; packs sparse results.

    Args:
        masks: fixed masks for centralized training (or for federated tasks sent densely);
            a packed (``weights_format="coo"``) task's own masks take precedence.
        sparse_fc_max_density: compute an ``nn.Linear`` with ``torch.sparse`` when its kept
            fraction is at most this (``None``: always dense; ``1.0``: always sparse).
        sparse_fc_min_weights: ... and when it has at least this many weights: sparse kernels
            carry a fixed cost per layer that only large layers earn back. On a 2-core x86 CPU
            with batch 20, a 784x300 layer trains faster sparsely below about 2% density and small
            layers never do (``benchmarks/sparse_fc.py``); hence the defaults.
        pack_results: for packed tasks, send the trained weights packed with the task's masks
            (``ctx.result_weights``), so the upload is as sparse as the download.

    Raises:
        ConfigError: on an invalid ``sparse_fc_max_density``, or masks that do not fit the module
            (naming the layer, when training starts).
    """

    def __init__(
        self,
        *,
        masks: MaskSet | None = None,
        sparse_fc_max_density: float | None = 0.02,
        sparse_fc_min_weights: int = 50_000,
        pack_results: bool = True,
    ) -> None:
        if masks is not None and not isinstance(masks, MaskSet):
            raise ConfigError(f"`masks` must be a MaskSet or None, got {type(masks).__name__}")
        if isinstance(sparse_fc_min_weights, bool) or not isinstance(sparse_fc_min_weights, int) or sparse_fc_min_weights < 0:
            raise ConfigError(f"`sparse_fc_min_weights` must be an int >= 0, got {sparse_fc_min_weights!r}")
        self.masks = masks
        self.pack_results = bool(pack_results)
        self._run = _MaskedTraining(_check_density(sparse_fc_max_density, "sparse_fc_max_density"), sparse_fc_min_weights)
        self._coo_keys: set[str] = set()
        self._packed_task = False

    @property
    def active_masks(self) -> dict[str, torch.Tensor]:
        """The masks in force now (``{}`` outside training)."""
        return {k: m.to(torch.bool) for k, m in self._run.active.items()}

    @property
    def sparse_layers(self) -> list[nn.Module]:
        """The ``nn.Linear`` layers computed sparsely now."""
        return list(self._run.sparse_layers)

    # ------------------------------------------------------------------ centralized use
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None:
            self._run.activate(pl_module, self.masks.masks)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run.deactivate()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._run.deactivate()

    # ------------------------------------------------------------------ every step
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self._run.zero_grads()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._run.zero_weights()

    # ------------------------------------------------------------------ client boundaries
    def on_client_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        task = ctx.task
        self._packed_task = task.config.get("weights_format", "dense") == "coo"
        if self._packed_task:
            shapes = {k: tuple(v.shape) for k, v in pl_module.federated_state().items()}
            masks = payload_masks(task.weights, shapes)
            self._coo_keys = {n[: -len(COO_INDICES)] for n in task.weights if n.endswith(COO_INDICES)}
        else:
            masks = dict(self.masks.masks) if self.masks is not None else {}
            self._coo_keys = set()
        self._run.activate(pl_module, masks)

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        self._run.zero_weights()
        if self._packed_task and self.pack_results:
            masks = {k: m.to(torch.bool) for k, m in self._run.active.items()}
            state = {k: v.detach().clone() for k, v in pl_module.federated_state().items()}
            ctx.result_weights = pack_state(state, masks, keys=self._coo_keys)
        ctx.result_config["prunefl_sparse_layers"] = len(self._run.sparse_layers)
        if self._run.active:
            # Eq. (1): a sparse FC layer costs one MAC per KEPT weight and example; report what the
            # pruned FC weights save of the forward FLOPs the runtime counts densely
            saved = 2.0 * pruned_linear_macs(pl_module, MaskSet({k: m.to(torch.bool) for k, m in self._run.active.items()}))
            ctx.result_config["prunefl_fc_flops_saved_per_example"] = saved
            ctx.flops_saved_per_example = saved  # the runtime charges the clock dense FLOPs minus this
        self._run.deactivate()
        self._packed_task = False
        self._coo_keys = set()


class IterativeMagnitudePruning(pl.Callback):
    """Train ``epochs_per_level`` epochs, prune one level by magnitude, repeat up to ``target_level``.

    Pruning happens at the end of epochs ``E, 2E, ..., target_level * E`` (so a ``Trainer`` with
    ``max_epochs = target_level * E`` ends right after the last level, as PruneFL's server does);
    further epochs train the pruned model. Pruned weights are kept at zero throughout (their
    gradients are zeroed before each optimizer step, the weights after it).

    Args:
        target_level: the last level to reach.
        epochs_per_level: training epochs before each level (the paper uses 50).
        fc_rates, conv_rates, rates: layer-wise rates, as :func:`~lightning_fedprune.core.masks.layer_rates`
            (Table 1 defaults: FC 20%/20%/10%, conv 5%/10%).
        start_masks: continue from these masks (and their level) instead of from level 0.
        snapshot_levels: levels at which to keep a copy of ``(masks, state_dict)`` in
            :attr:`snapshots` (not checkpointed), e.g. to read levels 5, 10, ... out of one run.
        sparse_fc_max_density: compute pruned ``nn.Linear`` layers sparsely at or below this
            density (``None``: dense).

    State (``state_dict``): the level, the epochs done and the masks (JSON), so a resumed fit
    continues pruning exactly where it stopped.

    Raises:
        ConfigError: invalid arguments; at fit start, rates that do not fit the model or a target
            level that would remove every weight of a layer (naming the layer).
    """

    def __init__(
        self,
        *,
        target_level: int,
        epochs_per_level: int = 50,
        fc_rates: float | Sequence[float] | None = (0.2, 0.2, 0.1),
        conv_rates: float | Sequence[float] | None = (0.05, 0.1),
        rates: Mapping[str, float] | None = None,
        start_masks: MaskSet | None = None,
        snapshot_levels: Iterable[int] = (),
        sparse_fc_max_density: float | None = None,
    ) -> None:
        if isinstance(target_level, bool) or not isinstance(target_level, int) or target_level < 0:
            raise ConfigError(f"`target_level` must be an int >= 0, got {target_level!r}")
        if isinstance(epochs_per_level, bool) or not isinstance(epochs_per_level, int) or epochs_per_level < 1:
            raise ConfigError(f"`epochs_per_level` must be an int >= 1, got {epochs_per_level!r}")
        for name, spec in (("fc_rates", fc_rates), ("conv_rates", conv_rates)):
            if spec is None:
                continue
            values = [spec] if isinstance(spec, (int, float)) else list(spec)
            for i, v in enumerate(values):
                check_rate(v, f"{name}[{i}]")
        if start_masks is not None and start_masks.level > target_level:
            raise ConfigError(f"`start_masks` are at level {start_masks.level}, beyond `target_level` {target_level}")
        self.target_level = target_level
        self.epochs_per_level = epochs_per_level
        self.fc_rates = fc_rates
        self.conv_rates = conv_rates
        self.explicit_rates = dict(rates) if rates is not None else None
        self.snapshot_levels = {int(v) for v in snapshot_levels}
        self.snapshots: dict[int, tuple[MaskSet, dict[str, torch.Tensor]]] = {}
        self.rates: dict[str, float] = {}
        self._masks: MaskSet | None = start_masks
        self._epochs_done = 0
        self._run = _MaskedTraining(_check_density(sparse_fc_max_density, "sparse_fc_max_density"))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_level=self.target_level, epochs_per_level=self.epochs_per_level)

    @property
    def masks(self) -> MaskSet:
        """The current masks (level 0 before fit starts)."""
        if self._masks is None:
            raise RuntimeError("IterativeMagnitudePruning has no masks before training starts")
        return self._masks

    @property
    def level(self) -> int:
        return self._masks.level if self._masks is not None else 0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rates = layer_rates(pl_module, fc=self.fc_rates, conv=self.conv_rates, rates=self.explicit_rates)
        if not self.rates:
            raise ConfigError(f"{type(pl_module).__name__} has no layer to prune (no nn.Linear / nn.Conv weight with a rate)")
        own = pl_module.state_dict(keep_vars=True)
        if self._masks is None:
            self._masks = MaskSet.full({k: own[k] for k in self.rates})
        self._masks.validate(own)
        check_levels(own, self.rates, self.target_level, start_level=self._masks.level, kept=self._masks.kept_counts())
        self._run.activate(pl_module, self._masks.masks)
        self._snapshot(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self._run.zero_grads()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._run.zero_weights()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_done += 1
        if self._epochs_done % self.epochs_per_level or self.level >= self.target_level:
            return
        state = {k: v.detach() for k, v in pl_module.state_dict(keep_vars=True).items()}
        self._masks = magnitude_prune(state, self.rates, masks=self._masks, levels=1)
        self._run.activate(pl_module, self._masks.masks)
        log.debug("pruned to level %d (density %.4f)", self._masks.level, self._masks.density())
        self._snapshot(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run.deactivate()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._run.deactivate()

    def _snapshot(self, pl_module: pl.LightningModule) -> None:
        if self._masks is not None and self._masks.level in self.snapshot_levels and self._masks.level not in self.snapshots:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.snapshots[self._masks.level] = (self._masks, state)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs_done": self._epochs_done,
            "masks": self._masks.to_json() if self._masks is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epochs_done = int(state_dict.get("epochs_done", 0))
        masks = state_dict.get("masks")
        self._masks = MaskSet.from_json(masks) if masks is not None else None


def sample_based_pruning(
    module: pl.LightningModule,
    train_data: Any,
    *,
    target_level: int,
    epochs_per_level: int = 50,
    fc_rates: float | Sequence[float] | None = (0.2, 0.2, 0.1),
    conv_rates: float | Sequence[float] | None = (0.05, 0.1),
    rates: Mapping[str, float] | None = None,
    snapshot_levels: Iterable[int] = (),
    trainer_kwargs: Mapping[str, Any] | None = None,
    return_callback: bool = False,
) -> MaskSet | tuple[MaskSet, IterativeMagnitudePruning]:
    """PruneFL's sample-based initial pruning at the server, with an ordinary Lightning ``Trainer``.

    Trains ``module`` on ``train_data`` (the server's small sample) for ``epochs_per_level``
    epochs, prunes one level, and repeats until ``target_level``. The module is trained and pruned
    in place: its weights are the model the federation starts from.

    Args:
        module: the LightningModule (its ``training_step`` and ``configure_optimizers`` are used).
        train_data: a DataLoader (or any iterable of batches) over the server's sample, e.g.
            :func:`sample_loader`.
        target_level: levels to prune (0: nothing is trained, all weights kept).
        epochs_per_level, fc_rates, conv_rates, rates, snapshot_levels: as
            :class:`IterativeMagnitudePruning`.
        trainer_kwargs: further ``Trainer`` arguments (``max_epochs`` and ``callbacks`` are set here).
        return_callback: also return the callback (for its ``snapshots``).

    Returns:
        The masks at ``target_level`` (and the callback when ``return_callback``).

    Raises:
        ConfigError: as :class:`IterativeMagnitudePruning`, or ``trainer_kwargs`` setting
            ``max_epochs`` / ``callbacks``.
    """
    callback = IterativeMagnitudePruning(
        target_level=target_level,
        epochs_per_level=epochs_per_level,
        fc_rates=fc_rates,
        conv_rates=conv_rates,
        rates=rates,
        snapshot_levels=snapshot_levels,
    )
    extra = dict(trainer_kwargs or {})
    bad = [k for k in ("max_epochs", "callbacks", "max_steps") if k in extra]
    if bad:
        raise ConfigError(f"`trainer_kwargs` may not set {bad}: sample-based pruning sets them from the levels")
    if target_level == 0:
        own = module.state_dict()
        masks = MaskSet.full({k: own[k] for k in layer_rates(module, fc=fc_rates, conv=conv_rates, rates=rates)})
        return (masks, callback) if return_callback else masks
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    kwargs.update(extra)
    kwargs["max_epochs"] = target_level * epochs_per_level
    kwargs["callbacks"] = [callback]
    with warnings.catch_warnings(), _quiet_lightning():
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer = pl.Trainer(**kwargs)
        trainer.fit(module, train_dataloaders=train_data)
    return (callback.masks, callback) if return_callback else callback.masks


def run_server_pruning(
    strategy: Any,
    module: pl.LightningModule,
    *,
    splits: Any,
    partition: Any = None,
    batch_size: int = 20,
    seed: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> MaskSet | None:
    """Run a PruneFL strategy's declared sample-based initial pruning and hand it the masks.

    Reads the strategy's ``sample_size``, ``sample_labels``, ``sample_epochs_per_level``,
    ``initial_level`` and rates (plain data), draws the server's sample (a share of every client's
    data from ``partition``, or a biased subset of ``sample_labels``), trains and prunes ``module``
    in place with :func:`sample_based_pruning`, then calls ``strategy.set_initial_masks`` with the
    masks and the untrained weights (for ``reinitialize``). Call it after building the module and
    the strategy and before the transport initializes the strategy from the module's weights.

    Args:
        strategy: a :class:`~lightning_fedprune.strategies.prunefl.PruneFL` (nothing happens unless
            its ``needs_server_pruning`` is true).
        module: the federated LightningModule (its weights become the sample-trained pruned model).
        splits: the dataset (``splits.train`` and ``splits.train_targets``).
        partition: the clients' split (for a share of every client's data).
        batch_size, seed: of the sample's DataLoader and draw.
        trainer_kwargs: further ``Trainer`` arguments of the server-side training.

    Returns:
        The masks, or ``None`` when the strategy needs no server pruning.

    Raises:
        ConfigError: a shared sample without a ``partition``; as :func:`sample_based_pruning`.
        DataError: a sample larger than the data it is drawn from.
    """
    if not getattr(strategy, "needs_server_pruning", False):
        return None
    if strategy.sample_labels is None:
        if partition is None:
            raise ConfigError("a sample shared by the clients needs their `partition` (or give `sample_labels` for a biased sample)")
        idx = shared_sample_indices(partition, size=strategy.sample_size, seed=seed)
    else:
        idx = biased_sample_indices(splits.train_targets, keep=strategy.sample_labels, size=strategy.sample_size, seed=seed)
    state_fn = getattr(module, "federated_state", module.state_dict)
    init_state = {k: v.detach().clone() for k, v in state_fn().items()}
    masks = sample_based_pruning(
        module,
        sample_loader(splits.train, idx, batch_size=batch_size, seed=seed),
        target_level=strategy.initial_level,
        epochs_per_level=strategy.sample_epochs_per_level,
        fc_rates=strategy.fc_rates,
        conv_rates=strategy.conv_rates,
        rates=strategy.explicit_rates or None,
        trainer_kwargs=trainer_kwargs,
    )
    strategy.set_initial_masks(masks, init_state=init_state)
    log.info("server-side sample-based pruning: %d samples, level %d, density %.4f", len(idx), masks.level, masks.density())
    return masks


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Drop the Trainer's info lines ("GPU available: ...", tips) of the server-side training."""
    flt = _BelowWarning()
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


# --------------------------------------------------------------------------------------------
# the server's sample
# --------------------------------------------------------------------------------------------


def _index_lists(clients: Any) -> list[np.ndarray]:
    if hasattr(clients, "clients"):  # a Partition
        return [np.asarray(c.train, dtype=np.int64) for c in clients.clients]
    return [np.asarray(ix, dtype=np.int64) for ix in clients]


def shared_sample_indices(clients: Any, *, size: int, seed: int) -> np.ndarray:
    """The server's sample made of a small share of every client's training data.

    Each client contributes in proportion to its number of samples (largest remainder), chosen
    at random; clients keep their data (they share a copy).

    Args:
        clients: a :class:`~lightning_fedprune.data.Partition` or one index array per client.
        size: total sample size.
        seed: the draws depend only on it.

    Returns:
        Sorted dataset indices, ``size`` of them.

    Raises:
        DataError: ``size`` < 1 or larger than all clients' data together.
    """
    lists = _index_lists(clients)
    total = sum(len(ix) for ix in lists)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= total:
        raise DataError(f"`size` must be an int in [1, {total}] (all clients' samples), got {size!r}")
    exact = np.array([size * len(ix) / total for ix in lists])
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: size - int(counts.sum())]] += 1
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(7,)))
    picked = [rng.choice(ix, size=int(n), replace=False) for ix, n in zip(lists, counts) if n > 0]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def biased_sample_indices(groups: Any, *, keep: Iterable[int], size: int | None = None, seed: int = 0) -> np.ndarray:
    """A biased server sample: only samples whose group is in ``keep``.

    Args:
        groups: one group id per sample: the labels (a few classes), writer ids (a few writers,
            as PruneFL's FEMNIST sample of 2 writers) or client ids (a few clients' data).
        keep: the groups allowed.
        size: how many to draw at random among them (``None``: all of them).
        seed: the draw depends only on it.

    Returns:
        Sorted dataset indices.

    Raises:
        DataError: no sample in ``keep``, or ``size`` larger than what is there.
    """
    g = torch.as_tensor(groups).cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    wanted = sorted({int(k) for k in keep})
    pool = np.flatnonzero(np.isin(g, wanted))
    if pool.size == 0:
        raise DataError(f"no sample belongs to the groups {wanted}")
    if size is None:
        return pool.astype(np.int64)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= pool.size:
        raise DataError(f"`size` must be an int in [1, {pool.size}] (samples in groups {wanted}), got {size!r}")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(8,)))
    return np.sort(rng.choice(pool, size=size, replace=False)).astype(np.int64)


def sample_loader(dataset: Any, indices: Any, *, batch_size: int = 20, seed: int = 0) -> torch.utils.data.DataLoader:
    """A shuffled DataLoader over ``dataset[indices]`` (seeded), for :func:`sample_based_pruning`."""
    from lightning_fedprune.data.loaders import client_batches

    gen = torch.Generator().manual_seed(int(seed))
    return client_batches(dataset, np.asarray(indices, dtype=np.int64), batch_size=batch_size, shuffle=True, generator=gen)
