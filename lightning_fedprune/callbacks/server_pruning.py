"""PruneFL's server-side initial pruning: an ordinary Lightning training on a small sample.

* :func:`sample_based_pruning` trains and prunes a module level by level with
  :class:`~lightning_fedprune.callbacks.masking.IterativeMagnitudePruning` in a plain ``Trainer``;
* :func:`run_server_pruning` runs what a :class:`~lightning_fedprune.strategies.PruneFL` strategy
  declares (sample size, labels, epochs, level, rates) and hands it the masks.

The server's sample is chosen by :mod:`lightning_fedprune.data.sampling`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.callbacks.masking import IterativeMagnitudePruning
from lightning_fedprune.core.masks import MaskSet, layer_rates
from lightning_fedprune.data.sampling import biased_sample_indices, sample_loader, shared_sample_indices
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.trainer_utils import quiet_lightning, trainer_defaults

log = logging.getLogger(__name__)

__all__ = ["sample_based_pruning", "run_server_pruning"]


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
            :func:`~lightning_fedprune.data.sampling.sample_loader`.
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
    kwargs = trainer_defaults(extra, max_epochs=target_level * epochs_per_level, callbacks=[callback])
    with quiet_lightning():
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
