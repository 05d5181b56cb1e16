"""forward_flops: torch-pruning's count for ordinary layers, analytic LSTMs, sub-models, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_fedprune.core.flops import forward_flops, lstm_flops_per_token
from lightning_fedprune.core.plans import Planner, resize_module
from lightning_fedprune.errors import ModelError
from lightning_fedprune.models import create_model, model_info


@pytest.mark.parametrize("name", ["mlp", "cnn_mnist", "vgg11_bn", "resnet32_cifar"])
def test_matches_torch_pruning_count(name):
    model = create_model(name)
    x = model_info(name).example_input(1)
    macs, _ = tp.utils.count_ops_and_params(model, x)
    assert forward_flops(model, x) == 2 * macs
    x3 = torch.cat([x, x, x])
    macs3, _ = tp.utils.count_ops_and_params(model, x3)  # torch-pruning divides by the batch size
    assert forward_flops(model, x3) == 3 * 2 * macs3
    assert forward_flops(model, x3, per_example=True) == 2 * macs3
    # (not exactly 3x batch 1: torch-pruning counts a Linear's bias adds once per forward)
    assert forward_flops(model, x3) == pytest.approx(3 * 2 * macs, rel=1e-2)


def test_hand_computed_small_cnn():
    # conv 1->2 (3x3, bias) on 4x4 -> 2x2; ReLU; Linear 8 -> 3 (bias)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    # conv: 9*1*2 MACs x 4 positions + 2*4 bias = 80; relu: 8; linear: 8*3 + 3 = 27
    assert forward_flops(model, torch.zeros(1, 1, 4, 4)) == 2 * (80 + 8 + 27)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_is_analytic(batch_first):
    V, E, H, B, T = 30, 6, 5, 3, 7
    model = create_model("lstm_lm", vocab_size=V, embed_dim=E, hidden_size=H, num_layers=2, batch_first=batch_first)
    tokens = model_info("lstm_lm", vocab_size=V, embed_dim=E, hidden_size=H, batch_first=batch_first, seq_len=T).example_input(B)
    per_token = 2 * 4 * H * (E + H) + 2 * 4 * H * (H + H)
    assert lstm_flops_per_token(model.lstm) == per_token
    classifier = 2 * (B * T * H * V + V)  # torch-pruning's Linear rule: MACs + bias adds
    assert forward_flops(model, tokens) == B * T * per_token + classifier


def test_sub_model_flops_shrink_and_model_is_untouched():
    model = create_model("vgg11_bn")
    model.features[1].train()
    model.classifier.eval()
    x = model_info("vgg11_bn").example_input(1)
    planner = Planner.from_module(model, x, unprunable=("classifier",))
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = forward_flops(model, x)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics too
    sub = copy.deepcopy(model)
    resize_module(sub, planner.plan(model.state_dict(), 0.5).sub_shapes())
    ratio = forward_flops(sub, x) / full
    assert 0.2 < ratio < 0.3  # conv MACs scale with kept_in * kept_out ~ 1/4


def test_failing_forward_raises_model_error():
    with pytest.raises(ModelError, match="forward of Linear failed"):
        forward_flops(nn.Linear(3, 2), torch.zeros(1, 4))
