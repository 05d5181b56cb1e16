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
  in any centralized training; :func:`~lightning_fedprune.callbacks.server_pruning.sample_based_pruning`
  runs it with a plain ``Trainer`` at the server, on a sample chosen by
  :mod:`lightning_fedprune.data.sampling`.

Why not Lightning's ``ModelPruning``: it prunes through ``torch.nn.utils.prune``, whose
reparametrization replaces ``weight`` by ``weight_orig`` and ``weight_mask`` in the ``state_dict``
until ``make_pruning_permanent`` runs at the end of fit; the federated payload, the server
strategy and the sparse codec are keyed by the plain ``weight`` names. It also applies one amount
to every layer (PruneFL prunes each layer at its own rate, Table 1), keeps no JSON-able mask set
that a server could send, and does not checkpoint its masks (so a resumed run loses them). The
math here lives in :mod:`lightning_fedprune.core.masks`; these callbacks only call it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.contract import COO, DENSE, WEIGHTS_FORMAT
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
from lightning_fedprune.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["MaskingCallback", "IterativeMagnitudePruning"]


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


@register_client_callback("masks")
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
        self._packed_task = task.config.get(WEIGHTS_FORMAT, DENSE) == COO
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
