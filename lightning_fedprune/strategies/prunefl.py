"""PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices").

The server strategy of PruneFL's procedure (Sec. 3.2.3, Fig. 1):

1. initial pruning at the server to ``initial_level``:

   * ``"sample"``: sample-based: train on a small server sample and prune level by level
     (done with a Lightning ``Trainer`` before the federation starts:
     :func:`lightning_fedprune.callbacks.server_pruning.sample_based_pruning`), the resulting masks are
     passed as ``initial_masks`` and the trained weights are the model the engine starts from;
   * ``"init"``: initialization-based: the weights with the smallest magnitude at
     initialization go;
   * ``"random"``: random weights go (seeded);
   * ``"none"``: start unpruned (level 0);

2. federations in which every client trains the masked model (client callback ``"masks"``:
   :class:`~lightning_fedprune.callbacks.masking.MaskingCallback`) and the server averages only the
   unpruned positions;
3. *federated pruning*: every ``prune_every`` rounds, until ``target_level``, one more level of
   magnitude pruning of the AGGREGATED model (optionally resetting the remaining weights to their
   initial values, Sec. 6.3); ``target_level == initial_level`` is *one-shot* pruning;
4. then plain federated learning on the final mask.

Payloads are real sparse tensors: the server sends the global model packed by
:func:`~lightning_fedprune.core.sparse.pack_state` (FC weights as COO when that is smaller,
other pruned layers dense with a bit mask) with ``config["weights_format"] = "coo"``, and the
client packs its trained weights with the same masks, so both directions carry
``(1 + b/16) * M/N`` of the dense FC bytes. :meth:`PruneFL.expected_result` describes the packed
result tensors exactly, and :meth:`PruneFL.aggregate` also checks that each result keeps exactly
the server's mask (a result that does not is left out and counted in ``num_rejected``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_fedprune.core.contract import COO, WEIGHTS_FORMAT
from lightning_fedprune.core.masks import (
    MaskSet,
    apply_masks,
    check_levels,
    check_rate,
    init_prune,
    layer_rates,
    magnitude_prune,
    masked_weighted_average,
    prunable_layers,
    random_prune,
    remaining_fraction,
)
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, TensorSpec, tensor_spec
from lightning_fedprune.core.seeding import derive_seed
from lightning_fedprune.core.sparse import pack_state, unpack_with_masks
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.strategies.base import ModelSpec
from lightning_fedprune.strategies.fedavg import FedAvg, result_metrics
from lightning_fedprune.strategies.registry import register_strategy

log = logging.getLogger(__name__)

__all__ = ["PruneFL", "INITIAL_PRUNING"]

#: valid values of ``initial_pruning``
INITIAL_PRUNING = ("none", "sample", "init", "random")


def _rate_list(value: Any, name: str) -> float | tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_rate(value, name)
    values = tuple(value)
    if not values:
        raise ConfigError(f"`{name}` must hold at least one rate (or be null to leave those layers unpruned)")
    return tuple(check_rate(v, f"{name}[{i}]") for i, v in enumerate(values))


@register_strategy("prunefl")
class PruneFL(FedAvg):
    """Federated learning with initial and federated magnitude pruning by levels.

    Args:
        initial_pruning: ``"none"``, ``"sample"`` (masks from server-side training, given in
            ``initial_masks``), ``"init"`` or ``"random"``.
        initial_level: level of the initial pruning (for ``"sample"``: the masks' level, which is
            the default).
        target_level: the level federated pruning ends at (default: ``initial_level``, i.e.
            one-shot pruning).
        prune_every: federations between two federated pruning steps (the paper: 100 for
            LeNet-300-100, 200 for VGG-11); the level rises after rounds ``X-1, 2X-1, ...``.
        fc_rates: rates of the fully connected layers, in order (Table 1: 20%/20%/10%); one per
            layer or a single one for all; ``None`` leaves them unpruned.
        conv_rates: rates of the convolutional layers (Table 1: 5%/10%).
        rates: explicit ``{state key: rate}`` overriding the two above.
        initial_masks: the sample-based masks (a :class:`~lightning_fedprune.core.masks.MaskSet`
            or its JSON form).
        reinitialize: after every pruning step (the initial one included), reset the remaining
            weights to their values at initialization (Sec. 6.3) instead of keeping the trained ones.
        init_state: the values at initialization for ``reinitialize`` (default: the state the
            strategy is initialized with, which for sample-based pruning is already trained:
            pass the untrained weights then).
        sparse_payload: send FC layers as COO when smaller (``False``: every pruned layer dense
            with a bit mask).
        sample_size, sample_labels, sample_epochs_per_level: the server's sample-based pruning,
            as plain data for whoever runs it before :meth:`initialize` when ``initial_masks`` is
            not given (:func:`lightning_fedprune.callbacks.server_pruning.run_server_pruning`; the
            strategy itself never trains): ``sample_size`` images, a share of every client's data
            (``sample_labels`` null) or only images of these labels (a biased sample), trained
            ``sample_epochs_per_level`` epochs per level (the paper: 200 images, 50 epochs).
        **fedavg_kwargs: as :class:`~lightning_fedprune.strategies.FedAvg` (``fraction_fit``,
            ``local_epochs`` / ``local_steps``, ``seed``, ...).

    Raises:
        ConfigError: an unknown ``initial_pruning``, rates outside ``[0, 1)``, levels out of order,
            ``"sample"`` without masks (or masks with another method); at :meth:`initialize`, masks
            or rates that do not fit the model or a level that would remove every weight of a layer
            (naming the layer).
    """

    client_callbacks = ("masks",)

    def __init__(
        self,
        *,
        initial_pruning: str = "none",
        initial_level: int | None = None,
        target_level: int | None = None,
        prune_every: int = 100,
        fc_rates: float | tuple[float, ...] | None = (0.2, 0.2, 0.1),
        conv_rates: float | tuple[float, ...] | None = (0.05, 0.1),
        rates: dict[str, float] | None = None,
        initial_masks: MaskSet | dict[str, Any] | None = None,
        reinitialize: bool = False,
        init_state: dict[str, torch.Tensor] | None = None,
        sparse_payload: bool = True,
        sample_size: int = 200,
        sample_labels: tuple[int, ...] | None = None,
        sample_epochs_per_level: int = 50,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if initial_pruning not in INITIAL_PRUNING:
            raise ConfigError(f"`initial_pruning` can be {', '.join(INITIAL_PRUNING)}; got {initial_pruning!r}")
        if isinstance(initial_masks, Mapping):
            initial_masks = MaskSet.from_json(initial_masks)
        if initial_masks is not None and not isinstance(initial_masks, MaskSet):
            raise ConfigError(f"`initial_masks` must be a MaskSet, its JSON form or null, got {type(initial_masks).__name__}")
        if initial_pruning == "sample":
            if initial_masks is None and initial_level is None:
                raise ConfigError(
                    "`initial_pruning='sample'` needs `initial_masks` (the masks of the server-side pruning) or the "
                    "`initial_level` to prune the server's sample to. HINT: lightning_fedprune.callbacks.masking."
                    "sample_based_pruning(...) returns such masks; run_server_pruning(strategy, ...) does it from "
                    "`sample_size` / `sample_labels` / `sample_epochs_per_level`"
                )
            if initial_masks is not None:
                if initial_level is None:
                    initial_level = initial_masks.level
                elif initial_level != initial_masks.level:
                    raise ConfigError(f"`initial_level` is {initial_level} but `initial_masks` are at level {initial_masks.level}")
        elif initial_masks is not None:
            raise ConfigError(f"`initial_masks` are only used with initial_pruning='sample', got initial_pruning={initial_pruning!r}")
        initial_level = 0 if initial_level is None else initial_level
        for name, v in (("initial_level", initial_level), ("prune_every", prune_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "prune_every" else 0):
                raise ConfigError(f"`{name}` must be an int >= {1 if name == 'prune_every' else 0}, got {v!r}")
        if initial_pruning == "none" and initial_level != 0:
            raise ConfigError(f"`initial_level` is {initial_level} but `initial_pruning` is 'none'; pick 'init', 'random' or 'sample'")
        if target_level is None:
            target_level = initial_level
        if isinstance(target_level, bool) or not isinstance(target_level, int) or target_level < initial_level:
            raise ConfigError(f"`target_level` must be an int >= initial_level ({initial_level}), got {target_level!r}")
        self.initial_pruning = initial_pruning
        self.initial_level = initial_level
        self.target_level = target_level
        self.prune_every = prune_every
        self.fc_rates = _rate_list(fc_rates, "fc_rates")
        self.conv_rates = _rate_list(conv_rates, "conv_rates")
        self.explicit_rates = {str(k): check_rate(v, str(k)) for k, v in (rates or {}).items()}
        self.initial_masks = initial_masks
        self.reinitialize = bool(reinitialize)
        self.init_state = {k: v.detach().clone() for k, v in init_state.items()} if init_state is not None else None
        self.sparse_payload = bool(sparse_payload)
        for name, v in (("sample_size", sample_size), ("sample_epochs_per_level", sample_epochs_per_level)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"`{name}` must be an int >= 1, got {v!r}")
        if sample_labels is not None:
            sample_labels = tuple(int(v) for v in sample_labels)
            if not sample_labels:
                raise ConfigError("`sample_labels` must name at least one label (or be null for a share of every client's data)")
        self.sample_size = sample_size
        self.sample_labels = sample_labels
        self.sample_epochs_per_level = sample_epochs_per_level
        self.rates: dict[str, float] = {}
        self._masks: MaskSet | None = None
        self._init: dict[str, torch.Tensor] | None = None
        self._packed: dict[str, torch.Tensor] | None = None
        self._prune_rounds: list[int] = []

    # ------------------------------------------------------------------ set-up
    def initialize(self, spec: ModelSpec, *, num_clients: int) -> None:
        """Take the initial model, resolve the layer rates and do the initial pruning."""
        super().initialize(spec, num_clients=num_clients)
        state = self.global_state
        layers = prunable_layers(state, keys=self._trainable)
        self.rates = layer_rates(layers, fc=self.fc_rates, conv=self.conv_rates)
        for key, rate in self.explicit_rates.items():
            if key not in state:
                raise ConfigError(f"`rates` names layer {key!r}, which the model does not have; prunable layers: {[l.key for l in layers]}")
            self.rates[key] = rate
        if not self.rates and self.target_level > 0:
            raise ConfigError("PruneFL found no layer to prune (no trainable *.weight of 2 to 5 dimensions with a rate)")
        check_levels(state, self.rates, self.target_level)
        self._init = None
        if self.reinitialize:
            source = self.init_state if self.init_state is not None else state
            missing = [k for k in state if k not in source]
            if missing:
                raise ConfigError(f"`init_state` lacks tensors of the model: {missing[:5]}")
            self._init = {k: source[k].detach().clone() for k in state}
        if self.initial_pruning == "sample":
            if self.initial_masks is None:
                raise ConfigError(
                    "`initial_pruning='sample'` but no server-side pruning has run: no `initial_masks`. HINT: call "
                    "lightning_fedprune.callbacks.server_pruning.run_server_pruning(strategy, module, ...) before the run starts, "
                    "or pass the masks of sample_based_pruning(...) as `initial_masks`"
                )
            self.initial_masks.validate(state)
            unknown = [k for k in self.initial_masks.masks if k not in self.rates]
            if unknown:
                raise ConfigError(f"`initial_masks` prune layers {unknown[:5]} that have no pruning rate here")
            masks = MaskSet({k: m.clone() for k, m in self.initial_masks.masks.items()}, self.initial_masks.level)
            full = MaskSet.full({k: state[k] for k in self.rates if k not in masks.masks})
            masks = MaskSet({**masks.masks, **full.masks}, masks.level)
        elif self.initial_pruning == "init":
            masks = init_prune(state, self.rates, self.initial_level)
        elif self.initial_pruning == "random":
            masks = random_prune(state, self.rates, seed=derive_seed(self.seed, "prunefl-random"), levels=self.initial_level)
        else:
            masks = MaskSet.full({k: state[k] for k in self.rates})
        self._masks = masks
        self._set_global(self._init if self._init is not None and masks.level > 0 else state)
        self._prune_rounds = []

    def trained_positions(self, results: Sequence[ClientResult]) -> dict[str, torch.Tensor] | None:
        """The unpruned positions of the pruned layers (clients keep pruned weights at zero)."""
        return {k: m.clone() for k, m in self.masks.masks.items() if not bool(m.all())}

    def set_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the global model; pruned positions are set to zero."""
        self._set_global(state)

    def _set_global(self, state: Mapping[str, torch.Tensor]) -> None:
        assert self._masks is not None
        self._global = {k: v if k in self._masks.masks else v.clone() for k, v in apply_masks(dict(state), self._masks).items()}
        self._packed = None

    # ------------------------------------------------------------------ queries
    @property
    def masks(self) -> MaskSet:
        """The current global masks."""
        if self._masks is None:
            raise RuntimeError("PruneFL is not initialized: call initialize() first")
        return self._masks

    @property
    def level(self) -> int:
        return self.masks.level

    @property
    def needs_server_pruning(self) -> bool:
        """Whether sample-based pruning must run at the server before :meth:`initialize`."""
        return self.initial_pruning == "sample" and self.initial_masks is None

    def set_initial_masks(self, masks: MaskSet, *, init_state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Take the masks of the server-side sample-based pruning (before :meth:`initialize`).

        Args:
            masks: masks at ``initial_level``.
            init_state: the untrained weights, for ``reinitialize`` (kept unless one was given).

        Raises:
            ConfigError: not a sample-based strategy, already initialized, or masks at another level.
        """
        if self.initial_pruning != "sample":
            raise ConfigError(f"initial masks are for initial_pruning='sample', this strategy uses {self.initial_pruning!r}")
        if self._global is not None:
            raise ConfigError("set_initial_masks() must come before initialize()")
        if masks.level != self.initial_level:
            raise ConfigError(f"`initial_level` is {self.initial_level} but the masks are at level {masks.level}")
        self.initial_masks = masks
        if init_state is not None and self.init_state is None:
            self.init_state = {k: v.detach().clone() for k, v in init_state.items()}

    def packed_state(self) -> dict[str, torch.Tensor]:
        """The global model as sent to clients (cached until the model changes)."""
        if self._packed is None:
            self._packed = pack_state(self.global_state, self.masks, keys=None if self.sparse_payload else ())
        return self._packed

    def params_remaining(self) -> float:
        """Fraction of the communicated floating parameters still there (biases included)."""
        return remaining_fraction(self.global_state, self.masks)

    # ------------------------------------------------------------------ round
    def task_config(self, rnd: int, client_id: int) -> dict[str, Any]:
        return {WEIGHTS_FORMAT: COO, "prunefl_level": self.level}

    def configure_round(self, rnd: int, available: Sequence[int]) -> list[ClientTask]:
        packed = self.packed_state()
        return [
            ClientTask(
                round=rnd,
                client_id=cid,
                weights=packed,
                extras=self.task_extras(rnd, cid),
                config=self.task_config(rnd, cid),
                **self.local_work(rnd, cid),
            )
            for cid in self.sample(rnd, available)
        ]

    def expected_result(self, task: ClientTask) -> tuple[TensorSpec | None, TensorSpec | None]:
        """The result's weights are packed with the task's masks: the very names, shapes and dtypes sent."""
        return tensor_spec(task.weights), None

    def aggregate(self, rnd: int, results: Sequence[ClientResult], failures: Sequence[ClientFailure]) -> dict[str, float]:
        """Average the unpruned positions of the results; prune one more level when it is time."""
        shapes = {k: tuple(v.shape) for k, v in self.global_state.items()}
        states, accepted = [], []
        for r in results:
            try:
                state, masks = unpack_with_masks(r.weights, shapes)
                self._check_result_masks(masks)
            except PayloadError as err:
                log.warning("round %d: result of client %d left out: %s", rnd, r.client_id, err)
                continue
            states.append(state)
            accepted.append(r)
        metrics = result_metrics(accepted) if accepted else {"num_results": 0.0}
        metrics["num_rejected"] = float(len(results) - len(accepted))
        if accepted:
            weights = [r.metrics.num_samples if self.weighted else 1.0 for r in accepted]
            new_state = masked_weighted_average(states, weights, self.masks, keys=list(self.global_state))
            self._global = new_state
            self._packed = None
            if self._due(rnd):
                self._prune_step(rnd)
        metrics["level"] = float(self.level)
        metrics["density"] = self.masks.density()
        metrics["params_remaining"] = self.params_remaining()
        return metrics

    def _due(self, rnd: int) -> bool:
        return self.level < self.target_level and (rnd + 1) % self.prune_every == 0

    def _prune_step(self, rnd: int) -> None:
        self._masks = magnitude_prune(self.global_state, self.rates, masks=self._masks, levels=1)
        self._set_global(self._init if self._init is not None else self.global_state)
        self._prune_rounds.append(int(rnd))
        log.info("round %d: federated pruning to level %d (density %.4f)", rnd, self.level, self.masks.density())

    def _check_result_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        expected = {k: m for k, m in self.masks.masks.items() if not bool(m.all())}
        if set(masks) != set(expected):
            raise PayloadError(f"result masks layers {sorted(masks)}, the server masks {sorted(expected)}")
        for key, m in expected.items():
            if not torch.equal(masks[key], m):
                raise PayloadError(f"result keeps other weights of layer {key!r} than the server's mask")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["prunefl"] = {
            "masks": dict(self.masks.masks),
            "level": self.level,
            "rates": dict(self.rates),
            "prune_rounds": list(self._prune_rounds),
            "init": dict(self._init) if self._init is not None else None,
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        p = state["prunefl"]
        self._masks = MaskSet({k: v.to(torch.bool).clone() for k, v in p["masks"].items()}, int(p["level"]))
        self.rates = {k: float(v) for k, v in p.get("rates", self.rates).items()}
        self._prune_rounds = [int(r) for r in p.get("prune_rounds", [])]
        init = p.get("init")
        self._init = {k: v.clone() for k, v in init.items()} if init is not None else None
        self._packed = None

    def __repr__(self) -> str:
        return (
            f"PruneFL(initial_pruning={self.initial_pruning!r}, initial_level={self.initial_level}, "
            f"target_level={self.target_level}, prune_every={self.prune_every})"
        )
