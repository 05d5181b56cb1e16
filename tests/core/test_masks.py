"""Mask math of PruneFL: levels, layer-wise rates, magnitude / init / random pruning, JSON masks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_fedprune.core.masks import (
    MaskSet,
    apply_masks,
    check_levels,
    init_prune,
    kept_after_levels,
    layer_rates,
    magnitude_prune,
    masked_weighted_average,
    prunable_layers,
    prune_count,
    pruned_linear_macs,
    random_prune,
    reinitialize,
    remaining_fraction,
)
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.models import create_model


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 2))


# ----------------------------------------------------------------------------- level arithmetic


def test_prune_count_rounds_half_up_and_levels_compound():
    # Prepare / Execute / Assert: 10 weights at 20%: 10 -2-> 8 -2(1.6)-> 6 -1(1.2)-> 5 -1-> 4 -1(0.8)-> 3 -1(0.6)-> 2 -0(0.4)-> 2
    assert [prune_count(n, 0.2) for n in (10, 8, 6, 5, 4, 3, 2)] == [2, 2, 1, 1, 1, 1, 0]
    assert kept_after_levels(10, 0.2, 7) == [8, 6, 5, 4, 3, 2, 2]
    assert prune_count(5, 0.5) == 3  # 2.5 rounds up


@pytest.mark.parametrize("level, percent", [(20, 1.35), (30, 0.29)])
def test_lenet_levels_leave_the_fraction_the_paper_quotes(level, percent):
    # Prepare: LeNet-300-100 with Table 1's rates 20%/20%/10%
    model = create_model("lenet300_100")
    state = model.state_dict()
    rates = layer_rates(model)
    assert rates == {"features.0.weight": 0.2, "features.2.weight": 0.2, "classifier.weight": 0.1}
    # Execute: prune `level` levels by magnitude at initialization
    masks = init_prune(state, rates, level)
    # Assert: 1.35% of all parameters (biases included) at level 20, 0.3% at level 30 (Sec. 5.1.3, 6.1)
    assert masks.level == level
    for key, rate in rates.items():
        assert masks.num_kept(key) == kept_after_levels(state[key].numel(), rate, level)[-1]
    assert round(100 * remaining_fraction(state, masks), 2) == percent


def test_check_levels_names_the_layer_that_would_lose_every_weight():
    shapes = {"a.weight": (4, 100), "tiny.weight": (1, 2)}
    check_levels(shapes, {"a.weight": 0.2, "tiny.weight": 0.2}, 30)  # 2 weights at 20%: never emptied
    with pytest.raises(ConfigError, match=r"level 2 would remove every weight of layer 'tiny.weight'"):
        check_levels(shapes, {"a.weight": 0.2, "tiny.weight": 0.6}, 5)  # 2 -1(1.2)-> 1 -1(0.6)-> 0


# ----------------------------------------------------------------------------- layers and rates


def test_prunable_layers_and_rates_follow_layer_order_and_kind():
    net = _conv_net()
    layers = prunable_layers(net)
    assert [(l.key, l.kind) for l in layers] == [("0.weight", "conv"), ("2.weight", "conv"), ("4.weight", "fc"), ("5.weight", "fc")]
    # the state-dict variant classifies by dimensionality and agrees here
    assert [(l.key, l.kind) for l in prunable_layers(net.state_dict())] == [(l.key, l.kind) for l in layers]
    assert layer_rates(net, fc=(0.2, 0.1), conv=(0.05, 0.1)) == {"0.weight": 0.05, "2.weight": 0.1, "4.weight": 0.2, "5.weight": 0.1}
    assert layer_rates(net, fc=0.3, conv=None) == {"4.weight": 0.3, "5.weight": 0.3}
    assert layer_rates(net, fc=[0.3], conv=None, rates={"0.weight": 0.0}) == {"0.weight": 0.0, "4.weight": 0.3, "5.weight": 0.3}
    # an MLP has no convolution: the default conv rates are simply unused
    assert layer_rates(create_model("mlp", hidden=(4,)), fc=(0.2, 0.1)) == {"features.0.weight": 0.2, "classifier.weight": 0.1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fc": (0.2, 1.0)}, r"pruning rate of layer '5.weight' must be a number in \[0, 1\), got 1.0"),
        ({"fc": (0.2, -0.1)}, r"layer '5.weight'.*got -0.1"),
        ({"fc": (0.2, 0.2, 0.1)}, r"`fc_rates` has 3 values but the model has 2 fully connected layers \('4.weight', '5.weight'\)"),
        ({"rates": {"nope.weight": 0.1}}, r"`rates` names layer 'nope.weight'"),
        ({"rates": {"4.weight": float("nan")}}, r"layer '4.weight'"),
    ],
)
def test_bad_rates_are_rejected_naming_the_layer(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        layer_rates(_conv_net(), **{"fc": (0.2, 0.1), "conv": (0.05, 0.1), **kwargs})


# ----------------------------------------------------------------------------- pruning


def test_magnitude_pruning_by_hand():
    # Prepare: 6 weights at rate 50%
    w = torch.tensor([[0.5, -0.1, 0.3], [0.05, -0.9, 0.2]])
    state = {"l.weight": w, "l.bias": torch.ones(2)}
    # Execute: level 1 removes round(3.0) = 3 smallest |w|: 0.05, 0.1, 0.2
    m1 = magnitude_prune(state, {"l.weight": 0.5})
    # level 2 removes round(1.5) = 2 of the 3 left: 0.3, 0.5
    m2 = magnitude_prune(state, {"l.weight": 0.5}, masks=m1)
    # Assert
    assert m1.level == 1 and m1.masks["l.weight"].tolist() == [[True, False, True], [False, True, False]]
    assert m2.level == 2 and m2.masks["l.weight"].tolist() == [[False, False, False], [False, True, False]]
    assert "l.bias" not in m2.masks  # biases are never pruned
    # level 3 would remove the last weight (round(0.5) = 1)
    with pytest.raises(ConfigError, match=r"level 3 would remove every weight of layer 'l.weight'"):
        magnitude_prune(state, {"l.weight": 0.5}, masks=m2)


def test_magnitude_ties_prune_lower_indices_first_and_levels_equal_top_k():
    state = {"w": torch.ones(1, 4)}
    assert magnitude_prune(state, {"w": 0.5}).masks["w"].tolist() == [[False, False, True, True]]
    # several levels on unchanged weights = keeping the largest kept_after_levels(...) weights
    torch.manual_seed(1)
    w = torch.randn(20, 30)
    masks = magnitude_prune({"w": w}, {"w": 0.2}, levels=4)
    kept = kept_after_levels(600, 0.2, 4)[-1]
    top = torch.zeros(600, dtype=torch.bool)
    top[w.abs().flatten().argsort(descending=True)[:kept]] = True
    assert torch.equal(masks.masks["w"].flatten(), top)
    assert init_prune({"w": w}, {"w": 0.2}, 4).equal(masks)


def test_magnitude_pruning_refuses_non_finite_weights():
    with pytest.raises(ConfigError, match=r"weights of layer 'w' hold NaN"):
        magnitude_prune({"w": torch.tensor([[1.0, float("nan")]])}, {"w": 0.5})


def test_random_pruning_is_seeded_nested_and_counts_right():
    shapes = {"a": (10, 10), "b": (3, 5)}
    rates = {"a": 0.2, "b": 0.1}
    m1 = random_prune(shapes, rates, seed=3, levels=1)
    m3 = random_prune(shapes, rates, seed=3, levels=3)
    assert random_prune(shapes, rates, seed=3, levels=3).equal(m3)
    assert not random_prune(shapes, rates, seed=4, levels=3).equal(m3)
    assert m3.num_kept("a") == kept_after_levels(100, 0.2, 3)[-1] == 51
    assert m3.num_kept("b") == kept_after_levels(15, 0.1, 3)[-1]
    # continuing from level 1 gives masks nested in level 1's
    m3b = random_prune(shapes, rates, seed=9, masks=m1, levels=2)
    assert m3b.level == 3 and not bool((m3b.masks["a"] & ~m1.masks["a"]).any())


# ----------------------------------------------------------------------------- mask sets


def test_mask_json_round_trip_with_hand_computed_runs():
    m = torch.tensor([True, True, False, True, False, False, True]).reshape(7, 1)
    ms = MaskSet({"x.weight": m}, 4)
    data = ms.to_json()
    assert data == {"format": 1, "level": 4, "layers": {"x.weight": {"shape": [7, 1], "kept": 4, "runs": [0, 2, 3, 1, 6, 1]}}}
    back = MaskSet.from_json(json.loads(json.dumps(data)))
    assert back.equal(ms)
    # a random mask of a real layer survives too
    big = MaskSet({"w": torch.rand(30, 40) < 0.3, "v": torch.ones(2, 2, dtype=torch.bool)}, 2)
    assert MaskSet.from_json(json.loads(json.dumps(big.to_json()))).equal(big)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"shape": [4], "kept": 3, "runs": [0, 2, 1, 1]}, r"layer 'w': run 1 .* overlaps"),
        ({"shape": [4], "kept": 3, "runs": [0, 2, 2, 1]}, r"layer 'w': run 1 .* touches"),
        ({"shape": [4], "kept": 2, "runs": [3, 2]}, r"layer 'w': run 0 .* leaves the layer's 4 weights"),
        ({"shape": [4], "kept": 3, "runs": [0, 2]}, r"layer 'w': `kept` is 3 but the runs keep 2"),
        ({"shape": [0], "kept": 0, "runs": []}, r"layer 'w': `shape` must be a list of positive ints"),
        ({"shape": [4], "kept": 0, "runs": []}, r"mask of layer 'w' removes every weight"),
        ({"shape": [4], "kept": 1, "runs": [0]}, r"layer 'w': `runs` must be a list of int start/length pairs"),
    ],
)
def test_malformed_mask_json_is_rejected_naming_the_layer(entry, match):
    with pytest.raises(ConfigError, match=match):
        MaskSet.from_json({"format": 1, "level": 1, "layers": {"w": entry}})


def test_masks_that_do_not_match_the_model_name_the_layer():
    model = create_model("mlp", hidden=(4,))
    state = model.state_dict()
    ok = MaskSet.full({"features.0.weight": (4, 64)})
    ok.validate(state)
    with pytest.raises(ConfigError, match=r"mask of layer 'features.0.weight' has shape \(4, 63\), the model's weight has shape \(4, 64\)"):
        MaskSet.full({"features.0.weight": (4, 63)}).validate(state)
    with pytest.raises(ConfigError, match=r"mask names layer 'fc9.weight', which the model does not have"):
        MaskSet.full({"fc9.weight": (2, 2)}).validate(state)
    with pytest.raises(ConfigError, match=r"mask of layer 'w' must be a bool tensor"):
        MaskSet({"w": torch.ones(2)})


# ----------------------------------------------------------------------------- using masks


def test_masked_average_keeps_pruned_positions_at_zero():
    # Prepare: two clients, weights 1 and 3; position 1 pruned (a client even sent a value there)
    masks = MaskSet({"w": torch.tensor([True, False, True])}, 1)
    a = {"w": torch.tensor([1.0, 0.0, 2.0]), "b": torch.tensor([4.0])}
    b = {"w": torch.tensor([5.0, 7.0, -2.0]), "b": torch.tensor([8.0])}
    # Execute
    avg = masked_weighted_average([a, b], [1, 3], masks)
    # Assert: (1*1 + 3*5)/4 = 4, pruned 0, (2 - 6)/4 = -1; unmasked tensors averaged plainly
    assert avg["w"].tolist() == [4.0, 0.0, -1.0]
    assert avg["b"].tolist() == [7.0]


def test_apply_reinitialize_remaining_fraction_and_saved_macs():
    masks = MaskSet({"w": torch.tensor([[True, False], [False, False]])}, 3)
    state = {"w": torch.tensor([[2.0, 3.0], [4.0, 5.0]]), "b": torch.tensor([1.0, 1.0])}
    assert apply_masks(state, masks)["w"].tolist() == [[2.0, 0.0], [0.0, 0.0]]
    init = {"w": torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), "b": torch.tensor([0.5, 0.5])}
    re = reinitialize(init, masks)
    assert re["w"].tolist() == [[-1.0, 0.0], [0.0, 0.0]] and re["b"].tolist() == [0.5, 0.5]
    assert remaining_fraction(state, masks) == pytest.approx(3 / 6)
    lin = nn.Sequential(nn.Linear(2, 2))
    assert pruned_linear_macs(lin, MaskSet({"0.weight": masks.masks["w"]}, 3)) == 3
