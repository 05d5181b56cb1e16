"""The nn.LSTM pruner: gate-row bookkeeping, graph coupling, sub-model == sparse model, and the
torch-pruning pruning function against a hand-written reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_fedprune.core.lstm_pruning import LSTMPruner, gate_rows, lstm_unit_scores
from lightning_fedprune.core.plans import Planner, resize_module
from lightning_fedprune.errors import ConfigError, ModelError


class _LM(nn.Module):
    """Linear encoder -> LSTM -> classifier (an encoder that is prunable, unlike an embedding)."""

    def __init__(self, *, num_layers: int = 1, batch_first: bool = True, hidden: int = 6, inp: int = 5, bidirectional: bool = False):
        super().__init__()
        self.encoder = nn.Linear(3, inp)
        self.lstm = nn.LSTM(inp, hidden, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional)
        self.classifier = nn.Linear(hidden * (2 if bidirectional else 1), 4)

    def forward(self, x):
        out, _ = self.lstm(torch.tanh(self.encoder(x)))
        return self.classifier(out)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _example(batch_first: bool) -> torch.Tensor:
    x = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1).contiguous()


def test_gate_rows_hand_computed():
    assert gate_rows(torch.tensor([1, 3]), 4).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    model = _randomize(_LM(hidden=4))
    planner = Planner.from_module(model, _example(True), unprunable=("classifier",))
    assert planner.group_names == ["lstm.l0", "encoder"]
    plan = planner.plan_from_indices({"lstm.l0": [1, 3]})
    rows = [1, 3, 5, 7, 9, 11, 13, 15]
    assert plan.indices("lstm.weight_ih_l0")[0].tolist() == rows
    assert plan.indices("lstm.weight_ih_l0")[1].tolist() == [0, 1, 2, 3, 4]  # the encoder's group keeps all
    assert [i.tolist() for i in plan.indices("lstm.weight_hh_l0")] == [rows, [1, 3]]
    assert plan.indices("lstm.bias_ih_l0")[0].tolist() == rows
    assert plan.indices("lstm.bias_hh_l0")[0].tolist() == rows
    assert plan.indices("classifier.weight")[0] is None
    assert plan.indices("classifier.weight")[1].tolist() == [1, 3]
    # the encoder's outputs are coupled with the LSTM's input columns
    enc = planner.plan_from_indices({"encoder": [0, 4]})
    assert enc.indices("lstm.weight_ih_l0")[1].tolist() == [0, 4]
    assert enc.indices("encoder.weight")[0].tolist() == [0, 4]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sub_model_forward_equals_sparse_forward(num_layers, batch_first):
    model = _randomize(_LM(num_layers=num_layers, batch_first=batch_first))
    x = _example(batch_first)
    planner = Planner.from_module(model, x, unprunable=("classifier",))
    expected_groups = [f"lstm.l{k}" for k in range(num_layers)] + ["encoder"]
    assert planner.group_names == expected_groups
    state = model.state_dict()
    scores = planner.importance(state)
    for k in range(num_layers):  # FedMP's neuron score: 4 gate rows of weight_ih and weight_hh
        ih, hh = state[f"lstm.weight_ih_l{k}"], state[f"lstm.weight_hh_l{k}"]
        hand = torch.stack([sum(ih[g * 6 + j].abs().sum() + hh[g * 6 + j].abs().sum() for g in range(4)) for j in range(6)])
        torch.testing.assert_close(scores[k], hand)
        torch.testing.assert_close(lstm_unit_scores(ih, hh), hand)
    for ratio in (0.25, 0.5, 0.8):
        plan = planner.plan(state, ratio)
        assert plan.kept_counts == (max(1, int(6 * (1 - ratio))),) * num_layers + (max(1, int(5 * (1 - ratio))),)
        sub = copy.deepcopy(model)
        resize_module(sub, plan.sub_shapes())
        sub.load_state_dict(plan.extract(state))
        assert sub.lstm.hidden_size == plan.kept_counts[0] and sub.lstm.input_size == plan.kept_counts[-1]
        sparse = copy.deepcopy(model)
        sparse.load_state_dict(plan.sparse(state))
        with torch.no_grad():
            a, b = sub.eval()(x), sparse.eval()(x)
        assert (a - b).abs().max() / b.abs().max() < 1e-5
        with torch.no_grad():  # zeroing only the pruned gate rows would leak the biases
            leaky = copy.deepcopy(model)
            for k in range(num_layers):
                w = getattr(leaky.lstm, f"weight_ih_l{k}")
                w.mul_(plan.mask(f"lstm.weight_ih_l{k}").all(dim=1, keepdim=True))
            assert (leaky.eval()(x) - b).abs().max() / b.abs().max() > 1e-3


def _hand_sub_lstm(lstm: nn.LSTM, kept: list[list[int]], kept_in: list[int]) -> nn.LSTM:
    """An independent reference: copy the kept rows / columns with explicit loops."""
    H = lstm.hidden_size
    h = len(kept[0])
    ref = nn.LSTM(len(kept_in), h, num_layers=lstm.num_layers, batch_first=lstm.batch_first)
    with torch.no_grad():
        for k, units in enumerate(kept):
            cols = kept_in if k == 0 else kept[k - 1]
            for name, src_cols in (("weight_ih", cols), ("weight_hh", units)):
                src, dst = getattr(lstm, f"{name}_l{k}"), getattr(ref, f"{name}_l{k}")
                for g in range(4):
                    for a, j in enumerate(units):
                        for b, c in enumerate(src_cols):
                            dst[g * h + a, b] = src[g * H + j, c]
            for name in ("bias_ih", "bias_hh"):
                src, dst = getattr(lstm, f"{name}_l{k}"), getattr(ref, f"{name}_l{k}")
                for g in range(4):
                    for a, j in enumerate(units):
                        dst[g * h + a] = src[g * H + j]
    return ref


@pytest.mark.parametrize("num_layers", [1, 2])
def test_torch_pruning_with_lstm_pruner_matches_reference(num_layers):
    model = _randomize(_LM(num_layers=num_layers))
    x = _example(True)
    pruner = LSTMPruner()
    pruned = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(pruned, x, customized_pruners={nn.LSTM: pruner}, verbose=False)
    group = graph.get_pruning_group(pruned.lstm, pruner.prune_out_channels, [0, 2, 5])
    targets = {(type(dep.target.module).__name__, dep.handler.__name__) for dep, _ in group}
    assert ("Linear", "prune_in_channels") in targets  # the classifier's inputs follow the LSTM's units
    group.prune()
    last = [1, 3, 4]
    kept = [last]
    if num_layers == 2:  # the inner layer keeps its 3 units of largest L1 (FedMP's score)
        scores = lstm_unit_scores(model.lstm.weight_ih_l0, model.lstm.weight_hh_l0)
        kept = [sorted(torch.argsort(scores, descending=True)[:3].tolist()), last]
    ref = _hand_sub_lstm(model.lstm, kept, list(range(5)))
    assert pruned.lstm.hidden_size == 3 and pruned.classifier.in_features == 3
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(pruned.lstm, name), p), name
    assert torch.equal(pruned.classifier.weight, model.classifier.weight[:, last])
    # the planner's sub-model with the same indices is the same model
    planner = Planner.from_module(model, x, unprunable=("classifier",))
    plan = planner.plan_from_indices({f"lstm.l{k}": kept[k] for k in range(num_layers)})
    sub = plan.extract(model.state_dict())
    assert all(torch.equal(sub[k], v) for k, v in pruned.state_dict().items())
    with torch.no_grad():
        out = pruned(x)
        ref_out = model.classifier.weight[:, last] @ ref(torch.tanh(model.encoder(x)))[0].unsqueeze(-1)
    torch.testing.assert_close(out, ref_out.squeeze(-1) + model.classifier.bias, rtol=1e-5, atol=1e-6)
    # input columns
    group = graph.get_pruning_group(pruned.encoder, tp.prune_linear_out_channels, [1])
    group.prune()
    assert pruned.lstm.input_size == 4 and pruned.lstm.weight_ih_l0.shape[1] == 4
    assert torch.equal(pruned.lstm.weight_ih_l0, ref.weight_ih_l0[:, [0, 2, 3, 4]])
    pruned(x)  # still a valid LSTM


def test_layers_of_one_lstm_keep_equal_counts():
    model = _randomize(_LM(num_layers=2))
    planner = Planner.from_module(model, _example(True), unprunable=("classifier",))
    state = model.state_dict()
    with pytest.raises(ConfigError, match=r"lstm.l0.*lstm.l1.*same number"):
        planner.plan_from_indices({"lstm.l0": [0, 1], "lstm.l1": [2]})
    with pytest.raises(ConfigError, match="equal keep counts"):
        planner.plan_from_keep(state, {"lstm.l0": 3})
    plan = planner.plan_from_keep(state, {"lstm.l0": 3, "lstm.l1": 3})
    assert plan.kept_counts[:2] == (3, 3)
    sub = copy.deepcopy(model)
    resize_module(sub, plan.sub_shapes())
    sub.load_state_dict(plan.extract(state))
    assert sub.lstm.hidden_size == 3
    with pytest.raises(ModelError, match="same number of units"):
        resize_module(copy.deepcopy(model), {"lstm.weight_hh_l0": (12, 3)})


def test_unsupported_lstms_are_rejected():
    with pytest.raises(ModelError, match="'lstm' is bidirectional"):
        Planner.from_module(_LM(bidirectional=True), _example(True), unprunable=("classifier",))
    # unprunable: accepted (its outputs stay, nothing of it is pruned)
    planner = Planner.from_module(_LM(bidirectional=True), _example(True), unprunable=("classifier", "lstm", "encoder"))
    assert planner.num_groups == 0
    proj = _LM()
    proj.lstm = nn.LSTM(5, 6, proj_size=2, batch_first=True)
    proj.classifier = nn.Linear(2, 4)
    with pytest.raises(ModelError, match="proj_size"):
        Planner.from_module(proj, _example(True), unprunable=("classifier",))
    with pytest.raises(ModelError, match="bidirectional"):
        LSTMPruner().prune_out_channels(nn.LSTM(3, 4, bidirectional=True), [0])
