"""Structured pruning of ``nn.LSTM`` hidden units, as a torch-pruning pruning function.

torch-pruning's built-in LSTM pruner is broken (it prunes ``weight_hh`` twice, indexes
``weight_ih`` with gate indices, shrinks the biases to ``H`` instead of ``4H`` and asserts on
``num_layers > 1``). :class:`LSTMPruner` replaces it. Register it with a dependency graph so that
the graph couples the LSTM's output hidden units with the next layer's inputs and the previous
layer's outputs with the LSTM's input columns::

    DG = tp.DependencyGraph().build_dependency(
        model, example, customized_pruners={nn.LSTM: LSTMPruner()}
    )

Layout of one layer ``k`` of an ``nn.LSTM`` with hidden size ``H`` (PyTorch's convention, gates in
the order input, forget, cell, output)::

    weight_ih_l{k}: (4H, in_k)    rows  g*H + j  belong to hidden unit j (gate g = 0..3)
    weight_hh_l{k}: (4H, H)       rows as above, column j reads hidden unit j
    bias_ih_l{k}, bias_hh_l{k}: (4H,)
    in_k = input_size for k = 0, H of layer k-1 otherwise (columns of weight_ih_l{k})

Removing hidden unit ``j`` of layer ``k`` removes its four gate rows from ``weight_ih_l{k}``,
``weight_hh_l{k}`` and both biases, column ``j`` of ``weight_hh_l{k}`` and, for ``k`` below the
last layer, column ``j`` of ``weight_ih_l{k+1}``; for the last layer the next module's input
channel ``j`` (the dependency graph handles that).

Each layer's hidden units form their own pruning group, pruned at the same ratio: ``nn.LSTM``
has one ``hidden_size`` for all layers, so every layer must keep the same number of units.
:meth:`LSTMPruner.prune_out_channels` (what torch-pruning calls for the group of the LSTM's
output) prunes the last layer with the given indices and, for ``num_layers > 1``, every lower layer
to the same width, keeping its units with the largest L1 norm of the four gate rows of
``weight_ih`` and ``weight_hh`` (FedMP's neuron score). Every layer is scored on the weights the
call starts from (every column of ``weight_ih_l{k}``, also those that read units of layer ``k-1``
that this call removes), exactly as
:meth:`~lightning_fedprune.core.pruning.planner.Planner.importance` scores each layer's group
from the full model: both choose the same units for every layer of any depth. :meth:`LSTMPruner.prune_hidden_units`
prunes one layer with explicit indices.

Only unidirectional LSTMs without projections (``proj_size == 0``) are supported; bidirectional
ones raise :class:`~lightning_fedprune.errors.ModelError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from lightning_fedprune.errors import ModelError

__all__ = [
    "LSTMPruner",
    "check_lstm_supported",
    "gate_rows",
    "lstm_unit_scores",
]

#: Number of gates per hidden unit (input, forget, cell, output).
NUM_GATES = 4


def check_lstm_supported(layer: nn.RNNBase, name: str = "") -> None:
    """Raise :class:`ModelError` unless ``layer`` is a unidirectional recurrent layer (``nn.LSTM``,
    ``nn.GRU``, ``nn.RNN``) without projections.

    Args:
        layer: The LSTM (or GRU / RNN).
        name: Its qualified module name, for the message.

    Raises:
        ModelError: For bidirectional layers or ``proj_size > 0``.
    """
    kind = type(layer).__name__ if isinstance(layer, (nn.LSTM, nn.GRU, nn.RNN)) else "LSTM"
    label = f"{kind} {name!r}" if name else f"this {kind}"
    if layer.bidirectional:
        raise ModelError(
            f"{label} is bidirectional; structured pruning supports unidirectional nn.{kind} only. "
            "HINT: list it as unprunable to keep it whole."
        )
    if getattr(layer, "proj_size", 0):
        raise ModelError(
            f"{label} has proj_size={layer.proj_size}; structured pruning supports nn.{kind} "
            "without projections only. HINT: list it as unprunable to keep it whole."
        )


def gate_rows(units: torch.Tensor, hidden_size: int, gates: int = NUM_GATES) -> torch.Tensor:
    """Rows of ``weight_ih`` / ``weight_hh`` / the biases that belong to hidden ``units``.

    Args:
        units: int64 hidden-unit indices (any order).
        hidden_size: ``H`` of the layer.
        gates: Gate blocks per unit: 4 for ``nn.LSTM`` (the default), 3 for ``nn.GRU`` (reset,
            update, new), 1 for ``nn.RNN``.

    Returns:
        ``cat([units + g * H for g in range(gates)])``: the gate blocks in gate order.

    Example:
        ``gate_rows(tensor([1, 3]), 4)`` is ``[1, 3, 5, 7, 9, 11, 13, 15]``.
    """
    units = torch.as_tensor(units, dtype=torch.long)
    return torch.cat([units + g * hidden_size for g in range(gates)])


def lstm_unit_scores(weight_ih: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """FedMP's L1 score of every hidden unit of one LSTM layer.

    The score of unit ``j`` is the sum of ``|w|`` over its four gate rows in ``weight_ih`` and in
    ``weight_hh`` (the weights the neuron is connected to on its input side).

    Args:
        weight_ih: ``(4H, in)``.
        weight_hh: ``(4H, H)``.

    Returns:
        float32 scores of shape ``(H,)``.
    """
    hidden = weight_hh.shape[0] // NUM_GATES
    rows = weight_ih.detach().float().abs().sum(1) + weight_hh.detach().float().abs().sum(1)
    return rows.view(NUM_GATES, hidden).sum(0)


def _keep(size: int, pruned: Sequence[int]) -> torch.Tensor:
    pruned_set = set(int(i) for i in pruned)
    return torch.tensor([i for i in range(size) if i not in pruned_set], dtype=torch.long)


class LSTMPruner(tp.pruner.BasePruningFunc):
    """torch-pruning pruning function for ``nn.LSTM`` (see the module docstring).

    ``prune_out_channels`` and ``prune_in_channels`` take the indices to REMOVE (torch-pruning's
    convention) and edit the layer in place: new ``Parameter`` objects, ``hidden_size`` /
    ``input_size`` updated and the flat weights refreshed.
    """

    TARGET_MODULES = (nn.LSTM,)

    # ------------------------------------------------------------------ torch-pruning interface
    def check(self, layer: nn.Module, idxs: Sequence[int], to_output: bool) -> None:
        """Validate the layer type, direction and index range (raises ``ModelError``)."""
        if not isinstance(layer, nn.LSTM):
            raise ModelError(f"LSTMPruner cannot prune {type(layer).__name__}.")
        check_lstm_supported(layer)
        super().check(layer, idxs, to_output)

    def prune_out_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.LSTM:
        """Remove hidden units ``idxs`` of the LAST layer (the LSTM's output channels).

        For ``num_layers > 1`` every lower layer is pruned to the same width, keeping its units
        of largest :func:`lstm_unit_scores` (ties: lower index first), so the module stays a valid
        ``nn.LSTM`` with one ``hidden_size``.
        """
        check_lstm_supported(layer)
        last = layer.num_layers - 1
        # every layer is scored on the weights as they are BEFORE this call (all columns), as the
        # last layer's units were chosen and as the Planner scores each layer's group
        scores = [
            lstm_unit_scores(getattr(layer, f"weight_ih_l{k}"), getattr(layer, f"weight_hh_l{k}")) for k in range(last)
        ]
        self.prune_hidden_units(layer, last, idxs)
        width = getattr(layer, f"weight_hh_l{last}").shape[1]
        for k in range(last):
            current = getattr(layer, f"weight_hh_l{k}").shape[1]
            if current == width:
                continue
            order = torch.sort(scores[k], descending=True, stable=True).indices
            kept = set(order[:width].tolist())
            self.prune_hidden_units(layer, k, [i for i in range(current) if i not in kept])
        return layer

    def prune_in_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.LSTM:
        """Remove input features ``idxs`` (columns of ``weight_ih_l0``)."""
        check_lstm_supported(layer)
        keep = _keep(layer.input_size, idxs)
        w = layer.weight_ih_l0
        setattr(layer, "weight_ih_l0", self._prune_parameter_and_grad(w, keep, 1))
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: nn.LSTM) -> int:
        """Hidden units of the last layer."""
        return getattr(layer, f"weight_hh_l{layer.num_layers - 1}").shape[1]

    def get_in_channels(self, layer: nn.LSTM) -> int:
        """Input features of the first layer."""
        return layer.weight_ih_l0.shape[1]

    # ------------------------------------------------------------------ explicit per-layer pruning
    def prune_hidden_units(self, layer: nn.LSTM, layer_index: int, idxs: Sequence[int]) -> nn.LSTM:
        """Remove hidden units ``idxs`` of layer ``layer_index`` (rows of its gates, columns of its
        ``weight_hh`` and of the next layer's ``weight_ih``).

        ``hidden_size`` is updated once every layer has the same width again.

        Raises:
            ModelError: On an unsupported LSTM, a bad layer index or out-of-range units.
        """
        check_lstm_supported(layer)
        if not 0 <= layer_index < layer.num_layers:
            raise ModelError(
                f"layer_index must be in [0, {layer.num_layers}), got {layer_index!r}."
            )
        k = layer_index
        w_hh = getattr(layer, f"weight_hh_l{k}")
        hidden = w_hh.shape[1]
        bad = [i for i in idxs if not 0 <= int(i) < hidden]
        if bad:
            raise ModelError(f"hidden units {bad} of layer {k} are out of range [0, {hidden}).")
        keep = _keep(hidden, idxs)
        rows = gate_rows(keep, hidden)
        setattr(layer, f"weight_ih_l{k}", self._prune_parameter_and_grad(getattr(layer, f"weight_ih_l{k}"), rows, 0))
        w_hh = self._prune_parameter_and_grad(w_hh, rows, 0)
        setattr(layer, f"weight_hh_l{k}", self._prune_parameter_and_grad(w_hh, keep, 1))
        if layer.bias:
            for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), rows, 0))
        if k + 1 < layer.num_layers:
            name = f"weight_ih_l{k + 1}"
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        widths = {getattr(layer, f"weight_hh_l{i}").shape[1] for i in range(layer.num_layers)}
        if len(widths) == 1:
            layer.hidden_size = widths.pop()
        layer._init_flat_weights()
        return layer

    def _prune_parameter_and_grad(self, weight: nn.Parameter, keep_idxs, pruning_dim: int) -> nn.Parameter:
        keep = torch.as_tensor(keep_idxs, dtype=torch.long, device=weight.device)
        pruned = nn.Parameter(torch.index_select(weight.data, pruning_dim, keep).contiguous(), requires_grad=weight.requires_grad)
        if weight.grad is not None:
            pruned.grad = torch.index_select(weight.grad, pruning_dim, keep).contiguous()
        return pruned
