"""Dynamic channel gates: top-k with saliency scaling, lasso, sites, state, FLOPs, gated inference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_fedprune.core.gates import (
    GATE_ATTR,
    GateSet,
    check_keep_ratio,
    check_lasso,
    dense_flops_per_sample,
    find_gate_sites,
    gate_scale,
    gated_flops_per_sample,
    gated_inference,
    keep_count,
    lasso_value,
    scatter_gate_state,
    slice_gate_state,
    widen_sites,
)
from lightning_fedprune.errors import ConfigError, ModelError

torch.set_num_threads(1)


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _hand_gate(keep_ratio=0.5):
    """A 1x1 conv 2 -> 4 whose gate logits are its bias (weights zero): logits [3, -1, 2, 0]."""
    conv = nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]).view(4, 2, 1, 1))
    net = nn.Sequential(conv)
    x = torch.ones(1, 2, 2, 2)
    gates = GateSet.for_model(net, x, keep_ratio=keep_ratio)
    g = gates.gate("0")
    with torch.no_grad():
        g.linear.weight.zero_()
        g.linear.bias.copy_(torch.tensor([3.0, -1.0, 2.0, 0.0]))
    return net, gates, x


def test_top_k_gating_on_a_hand_made_feature_map_zeroes_channels_and_their_gradients():
    # Prepare: conv outputs 1, 1, 2, 2 per pixel; saliencies sig(3), sig(-1), sig(2), sig(0); k = ceil(0.5 * 4) = 2
    net, gates, x = _hand_gate()
    gates.attach(net)
    # Execute
    out = net(x)
    out.sum().backward()
    # Assert: channels 0 and 2 kept, scaled by their saliency; 1 and 3 are exactly zero
    expected = torch.tensor([sig(3) * 1, 0.0, sig(2) * 2, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    torch.testing.assert_close(out, expected)
    # the dropped filters and the dropped gate rows get no gradient; kept ones do
    wgrad = net[0].weight.grad.view(4, 2)
    assert (wgrad[[1, 3]] == 0).all() and (wgrad[[0, 2]] != 0).all()
    # d out.sum / d bias_c = sig'(z_c) * sum(y_c): 4 pixels of y_0 = 1, of y_2 = 2
    g = gates.gate("0").linear
    dsig = lambda z: sig(z) * (1 - sig(z))  # noqa: E731
    torch.testing.assert_close(g.bias.grad, torch.tensor([dsig(3) * 4, 0.0, dsig(2) * 8, 0.0]))
    # the pooled input is [1, 1], so the weight gradient is the bias gradient in both columns
    torch.testing.assert_close(g.weight.grad, g.bias.grad.view(4, 1).expand(4, 2))
    assert gates.kept["0"].tolist() == [[True, False, True, False]]


def test_gate_scale_keeps_the_top_k_per_sample():
    logits = torch.tensor([[0.0, 5.0, -1.0], [2.0, -3.0, 1.0]])
    scale = gate_scale(logits, 1)
    assert torch.equal(scale > 0, torch.tensor([[False, True, False], [True, False, False]]))
    assert scale[0, 1].item() == pytest.approx(sig(5.0))


def test_keep_count_is_the_ceiling_and_bad_ratios_are_refused():
    assert [keep_count(3, 0.5), keep_count(10, 0.3), keep_count(5, 1.0), keep_count(10, 0.01), keep_count(64, 0.5)] == [2, 3, 5, 1, 32]
    for bad in (0, 0.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match="`keep_ratio` must be a number in \\(0, 1\\]"):
            check_keep_ratio(bad)
    with pytest.raises(ConfigError, match="`lasso`.*>= 0, got -1"):
        check_lasso(-1)
    assert check_lasso(0) == 0.0


def test_the_lasso_value_by_hand():
    # layer 1: per-sample L1 norms 3 and 3 -> mean 3; layer 2: 3 -> total 6; lambda 0.1 -> 0.6
    z1 = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    z2 = torch.tensor([[-1.0, 1.0, 1.0]])
    assert lasso_value([z1, z2], 0.1).item() == pytest.approx(0.6)
    # the GateSet's lasso is the same formula on the logits of its last forward: here [3, -1, 2, 0]
    net, gates, x = _hand_gate()
    gates.attach(net)
    net(torch.cat([x, x]))
    assert gates.lasso(0.5).item() == pytest.approx(0.5 * 6.0)


def _vgg_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )


def test_sites_pair_each_conv_with_the_norm_that_reads_it_and_skip_grouped_convs():
    sites, skipped = find_gate_sites(_vgg_like(), torch.randn(1, 3, 8, 8))
    assert [(s.conv, s.placement, s.in_channels, s.out_channels) for s in sites] == [("0", "1", 3, 8), ("3", "4", 8, 6)]
    assert skipped == ["6"]


def test_models_without_gateable_layers_and_bad_layer_names_are_refused():
    mlp = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ModelError, match="Sequential has no gateable layer"):
        find_gate_sites(mlp, torch.randn(1, 4))
    with pytest.raises(ModelError, match="gate layer '6' is a Conv2d with groups=2"):
        find_gate_sites(_vgg_like(), torch.randn(1, 3, 8, 8), layers=["6"])
    with pytest.raises(ModelError, match="gate layer 'nope' is not a module"):
        find_gate_sites(_vgg_like(), torch.randn(1, 3, 8, 8), layers=["nope"])


def test_gate_state_round_trips_and_another_architecture_is_refused_naming_the_key():
    x = torch.randn(1, 3, 8, 8)
    a = GateSet.for_model(_vgg_like(), x, keep_ratio=0.5)
    b = GateSet.for_model(_vgg_like(), x, keep_ratio=0.5)
    b.load_gate_state(a.gate_state())
    assert all(torch.equal(v, b.gate_state()[k]) for k, v in a.gate_state().items())
    other = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1))
    c = GateSet.for_model(other, x, keep_ratio=0.5)
    with pytest.raises(ModelError, match="gate state key '0/linear.weight' has shape \\(8, 3\\), this model's gate expects \\(5, 3\\)"):
        c.load_gate_state(a.gate_state())
    with pytest.raises(ModelError, match="gate state key '1/linear.bias' is not a gate of this model"):
        c.load_gate_state({**c.gate_state(), "1/linear.bias": torch.zeros(5)})


def test_attach_and_detach_leave_the_backbone_names_unchanged():
    net = _vgg_like()
    names = [n for n, _ in net.named_parameters()]
    gates = GateSet.for_model(net, torch.randn(1, 3, 8, 8), keep_ratio=0.5)
    gates.attach(net)
    attached = [n for n, _ in net.named_parameters()]
    assert [n for n in attached if GATE_ATTR not in n] == names and len(attached) == len(names) + 4
    gates.detach()
    assert [n for n, _ in net.named_parameters()] == names


def test_flops_of_a_gated_layer_by_hand():
    # conv 4 -> 6, 3x3, padding 1, on 5x5; input channels 1 and 3 are zero; k = ceil(0.5 * 6) = 3
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(1, 4, 5, 5)
    x[:, [1, 3]] = 0
    assert dense_flops_per_sample(net, x).item() == 2 * 6 * 4 * 9 * 25  # 10800
    gates = GateSet.for_model(net, x, keep_ratio=0.5)
    gates.attach(net)
    # conv: 2 * 3 kept out * 2 non-zero in * 9 * 25 = 2700; gate: pool 4 * 25 + linear 2 * 4 * 6 = 148
    assert gated_flops_per_sample(net, gates, x).item() == 2700 + 148


def test_the_next_layer_sees_only_the_kept_channels():
    net = _vgg_like().eval()
    x = torch.randn(2, 3, 8, 8)
    gates = GateSet.for_model(net, x, keep_ratio=0.5)
    gates.attach(net)
    seen = {}
    net[3].register_forward_pre_hook(lambda m, a: seen.update(nz=(a[0].flatten(2).abs().amax(2) > 0).sum(1)))
    net(x)
    assert seen["nz"].tolist() == [4, 4]  # ceil(0.5 * 8) of conv 0's channels, after BN and ReLU


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet32_cifar", "timm:resnet18"])
def test_gated_inference_indexes_the_weights_and_matches_the_masked_forward(name):
    from lightning_fedprune.models.registry import create_model

    torch.manual_seed(0)
    net = create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gates = GateSet.for_model(net, x, keep_ratio=0.5)
    gates.attach(net)
    calls = []
    orig = torch.nn.functional.conv2d

    def spy(inp, w, *a, **k):
        calls.append(tuple(w.shape))
        return orig(inp, w, *a, **k)

    with torch.no_grad():
        masked = net(x)
        torch.nn.functional.conv2d = spy
        try:
            with gated_inference(net, gates):
                fast = net(x)
        finally:
            torch.nn.functional.conv2d = orig
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    # every gated conv computed ceil(C_out / 2) filters
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(calls) == len(gates.sites) == len(convs)
    assert all(c[0] == math.ceil(s.out_channels / 2) for c, s in zip(calls, gates.sites))
    if name == "vgg11_bn":  # a plain chain: every conv after the first reads at most the kept channels
        # (a kept channel that ReLU zeroes everywhere is skipped too)
        assert all(c[1] <= math.ceil(s.in_channels / 2) for c, s in zip(calls[1:], gates.sites[1:]))
        assert calls[1] == (64, 32, 3, 3)  # measured: all 32 kept channels of the first conv are non-zero


def test_gate_state_is_sliced_to_a_sub_model_and_scattered_back_by_exact_index_maps():
    # Prepare: full-width gates of conv "a" (1 -> 6) and "b" (6 -> 4); the sub-model keeps
    # a's output channels [1, 2, 5] (so b's inputs [1, 2, 5]) and b's outputs [0, 3]
    full = {
        "a/linear.weight": torch.arange(6.0).view(6, 1),
        "a/linear.bias": torch.arange(6.0) + 100,
        "b/linear.weight": torch.arange(24.0).view(4, 6),
        "b/linear.bias": torch.arange(4.0) + 200,
    }
    index = {"a": (torch.tensor([1, 2, 5]), None), "b": (torch.tensor([0, 3]), torch.tensor([1, 2, 5]))}
    # Execute
    sub = slice_gate_state(full, index)
    # Assert: by hand
    assert torch.equal(sub["a/linear.weight"], torch.tensor([[1.0], [2.0], [5.0]]))
    assert torch.equal(sub["a/linear.bias"], torch.tensor([101.0, 102.0, 105.0]))
    assert torch.equal(sub["b/linear.weight"], torch.tensor([[1.0, 2.0, 5.0], [19.0, 20.0, 23.0]]))
    assert torch.equal(sub["b/linear.bias"], torch.tensor([200.0, 203.0]))
    # Execute: the client trained its sub-model's gates (here: negated), then scatters them back
    back = scatter_gate_state(full, {k: -v for k, v in sub.items()}, index)
    # Assert: kept positions carry the new values, every other position the old one; full is untouched
    w = torch.arange(24.0).view(4, 6)
    w[0, [1, 2, 5]] = torch.tensor([-1.0, -2.0, -5.0])
    w[3, [1, 2, 5]] = torch.tensor([-19.0, -20.0, -23.0])
    assert torch.equal(back["b/linear.weight"], w)
    assert torch.equal(back["b/linear.bias"], torch.tensor([-200.0, 201.0, 202.0, -203.0]))
    assert torch.equal(back["a/linear.weight"].flatten(), torch.tensor([0.0, -1.0, -2.0, 3.0, 4.0, -5.0]))
    assert torch.equal(full["b/linear.weight"], torch.arange(24.0).view(4, 6))
    # a full index (None both sides) is the identity
    ident = {"a": (None, None), "b": (None, None)}
    assert all(torch.equal(slice_gate_state(full, ident)[k], v) for k, v in full.items())
    # bad input names the key
    with pytest.raises(ModelError, match="gate state key 'b/linear.weight' has shape \\(2, 2\\), its kept channels give \\(2, 3\\)"):
        scatter_gate_state(full, {**sub, "b/linear.weight": torch.zeros(2, 2)}, index)
    with pytest.raises(ModelError, match="layer 'b' has no kept-channel index"):
        slice_gate_state(full, {"a": index["a"]})
    sites, _ = find_gate_sites(nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 2, 1)), torch.ones(1, 1, 2, 2))
    wide = widen_sites(sites, {"0": (6, 1), "1": (4, 6)})
    assert [(s.conv, s.out_channels, s.in_channels) for s in wide] == [("0", 6, 1), ("1", 4, 6)]
    with pytest.raises(ModelError, match="gate layer '1' has no full-model width"):
        widen_sites(sites, {"0": (6, 1)})
