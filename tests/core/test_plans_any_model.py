"""Plans for models outside the registry: every model either plans exactly or is refused with a
message naming the layer (tracing failures, recurrent layers, grouped convolutions, wiring)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_fedprune.core.lstm_pruning import LSTMPruner
from lightning_fedprune.core.plans import Planner, resize_module
from lightning_fedprune.errors import ConfigError, ModelError


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


# --------------------------------------------------------------------------------------------------
# recurrent layers
# --------------------------------------------------------------------------------------------------
class _GRUTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 5)
        self.gru = nn.GRU(5, 6, batch_first=True)
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        return self.classifier(self.gru(torch.tanh(self.encoder(x)))[0])


def test_gru_is_refused_by_name_or_kept_whole_with_its_inputs_pruned():
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match="layer 'gru' is an GRU.*HINT: list 'gru' as unprunable"):
        Planner.from_module(_GRUTagger(), x, unprunable=("classifier",))
    model = _randomize(_GRUTagger())
    planner = Planner.from_module(model, x, unprunable=("classifier", "gru"))
    assert planner.group_names == ["encoder"]
    plan = planner.plan(model.state_dict(), 0.4)  # keeps int(5 * 0.6) = 3 encoder neurons
    kept = plan.kept[0].tolist()
    assert len(kept) == 3
    sub = copy.deepcopy(model)
    resize_module(sub, plan.sub_shapes())
    sub.load_state_dict(plan.extract(model.state_dict()))
    assert sub.gru.input_size == 3 and torch.equal(sub.gru.weight_ih_l0, model.gru.weight_ih_l0[:, kept])
    sparse = copy.deepcopy(model)
    sparse.load_state_dict(plan.sparse(model.state_dict()))
    with torch.no_grad():
        a, b = sub(x), sparse(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6


# --------------------------------------------------------------------------------------------------
# LSTM layer k: Planner and LSTMPruner score the same weights
# --------------------------------------------------------------------------------------------------
class _LSTM3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 5)
        self.lstm = nn.LSTM(5, 6, num_layers=3, batch_first=True)
        self.classifier = nn.Linear(6, 4)

    def forward(self, x):
        return self.classifier(self.lstm(torch.tanh(self.encoder(x)))[0])


def test_three_layer_lstm_planner_and_lstm_pruner_pick_the_same_units():
    model = _randomize(_LSTM3(), seed=3)
    x = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(1))
    state = model.state_dict()
    H, keep = 6, 3
    # independent computation: each layer's unit score over the FULL weights (every column)
    expected = []
    for k in range(3):
        ih, hh = state[f"lstm.weight_ih_l{k}"], state[f"lstm.weight_hh_l{k}"]
        score = [sum(float(ih[g * H + j].abs().sum() + hh[g * H + j].abs().sum()) for g in range(4)) for j in range(H)]
        expected.append(sorted(sorted(range(H), key=lambda j: -score[j])[:keep]))
    # the full-column and the reduced-column scores disagree on layer 1 for this model
    reduced = state["lstm.weight_ih_l1"][:, expected[0]].abs().sum(1) + state["lstm.weight_hh_l1"].abs().sum(1)
    assert sorted(torch.argsort(reduced.view(4, H).sum(0), descending=True)[:keep].tolist()) != expected[1]

    planner = Planner.from_module(model, x, unprunable=("classifier",))
    assert planner.group_names == ["lstm.l0", "lstm.l1", "lstm.l2", "encoder"]
    plan = planner.plan_from_keep(state, {"lstm.l0": keep, "lstm.l1": keep, "lstm.l2": keep})
    assert [plan.kept[g].tolist() for g in (0, 1, 2)] == expected

    pruned = copy.deepcopy(model)
    pruner = LSTMPruner()
    graph = tp.DependencyGraph().build_dependency(pruned, x, customized_pruners={nn.LSTM: pruner}, verbose=False)
    removed = [j for j in range(H) if j not in expected[2]]
    graph.get_pruning_group(pruned.lstm, pruner.prune_out_channels, removed).prune()
    sub = plan.extract(state)
    for k, v in pruned.state_dict().items():
        assert torch.equal(sub[k], v), k


# --------------------------------------------------------------------------------------------------
# tracing failures and grouped convolutions name a layer
# --------------------------------------------------------------------------------------------------
def test_channel_shuffle_tracing_failure_names_the_layers():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    with pytest.raises(ModelError, match=r"ShuffleNetV2.*after layer\(s\) \['stage4\.1\.branch2\.6'.*ZeroDivisionError"):
        Planner.from_module(model, torch.zeros(1, 3, 64, 64), unprunable=("fc",))


def test_grouped_convolution_hint_names_the_layers_that_work():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 1))
    model.add_module("conv", nn.Conv2d(8, 8, 3, groups=2))
    model.add_module("head", nn.Conv2d(8, 4, 1))
    x = torch.zeros(1, 3, 5, 5)
    with pytest.raises(ModelError, match="'conv' is a grouped convolution.*HINT: list 'conv' and 'stem' as unprunable"):
        Planner.from_module(model, x, unprunable=("head",))
    with pytest.raises(ModelError, match="'conv' is a grouped convolution"):
        Planner.from_module(model, x, unprunable=("head", "conv"))  # not enough: 'stem' feeds it
    planner = Planner.from_module(model, x, unprunable=("head", "conv", "stem"))
    assert planner.num_groups == 0


# --------------------------------------------------------------------------------------------------
# wiring is part of the fingerprint
# --------------------------------------------------------------------------------------------------
class _Cat(nn.Module):
    def __init__(self, swapped: bool = False) -> None:
        super().__init__()
        self.swapped = swapped
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.classifier(torch.cat([b, a] if self.swapped else [a, b], 1))


def test_a_plan_for_other_wiring_is_refused_with_that_reason():
    x = torch.zeros(1, 3, 4, 4)
    plain = Planner.from_module(_Cat(), x, unprunable=("classifier",))
    swapped_model = _Cat(swapped=True)
    swapped = Planner.from_module(swapped_model, x, unprunable=("classifier",))
    assert plain.layout.shapes == swapped.layout.shapes  # same keys and shapes
    assert plain.layout.shapes_fingerprint == swapped.layout.shapes_fingerprint
    assert plain.fingerprint != swapped.fingerprint
    plan = swapped.plan(swapped_model.state_dict(), 0.5)
    with pytest.raises(ConfigError, match="same tensors but other wiring"):
        plain.check(plan)
    with pytest.raises(ConfigError, match="other wiring"):
        plain.plan(swapped_model.state_dict(), 0.5, within=plan)
    # the same model with other unprunable layers: same fingerprint, other groups
    other = Planner.from_module(_Cat(), x, unprunable=("classifier", "a"))
    assert other.fingerprint == plain.fingerprint
    with pytest.raises(ConfigError, match="other unprunable layers"):
        plain.check(other.plan(_Cat().state_dict(), 0.5))
