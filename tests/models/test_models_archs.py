"""Tests of every registered architecture: shapes, layer names, traceability, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_fedprune.models import create_model, list_models, model_info

# Small configurations where the defaults are needlessly large for a unit test.
SMALL_KWARGS = {
    "lstm_lm": {"vocab_size": 50, "embed_dim": 16, "hidden_size": 16},
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_registered_model(name):
    kwargs = SMALL_KWARGS.get(name, {})
    model = create_model(name, **kwargs)
    info = model_info(name, **kwargs)
    assert model.training
    modules = dict(model.named_modules())

    # The output layer is uniformly called `classifier`.
    assert isinstance(modules.get("classifier"), nn.Linear)
    for unprunable in info.unprunable:
        assert unprunable in modules, f"{name}: unprunable {unprunable!r} is not a module"

    example = info.example_input(2)
    with torch.no_grad():
        out = model(example)
    if info.task == "language_model":
        assert example.dtype == torch.long
        assert out.shape == (*example.shape, kwargs["vocab_size"])
    else:
        assert example.dtype == torch.float32
        assert out.shape == (2, modules["classifier"].out_features)

    if not any(isinstance(m, nn.LSTM) for m in model.modules()):
        tp.DependencyGraph().build_dependency(model, example_inputs=example)
        model.train()  # building the graph leaves the model in eval mode


def test_num_classes_and_in_channels_are_honoured():
    for name in ("cnn_mnist", "cnn_mnist_large", "conv_fmnist", "conv_femnist", "alexnet_cifar", "vgg11_bn", "resnet32_cifar"):
        kwargs = {"num_classes": 7, "in_channels": 3}
        if name == "alexnet_cifar":
            kwargs["hidden"] = (32,)
        model = create_model(name, **kwargs)
        assert model(model_info(name, **kwargs).example_input(2)).shape == (2, 7), name
    assert create_model("conv_femnist").classifier.out_features == 62


def test_mlp_and_lenet_parameter_counts():
    # mlp (digits): 64*300+300 + 300*100+100 + 100*10+10 = 19,500 + 30,100 + 1,010
    assert n_params(create_model("mlp")) == 50_610
    # LeNet-300-100: 784*300+300 + 300*100+100 + 100*10+10 = 235,500 + 30,100 + 1,010
    assert n_params(create_model("lenet300_100")) == 266_610
    assert n_params(create_model("mlp", hidden=())) == 64 * 10 + 10


def test_cnn_mnist_parameter_count():
    conv1 = 1 * 32 * 5 * 5 + 32  # 832
    conv2 = 32 * 64 * 5 * 5 + 64  # 51,264
    fc = 64 * 4 * 4 * 256 + 256  # 262,400 (28 -> 24 -> 12 -> 8 -> 4)
    classifier = 256 * 10 + 10  # 2,570
    assert conv1 + conv2 + fc + classifier == 317_066
    assert n_params(create_model("cnn_mnist")) == 317_066


def test_cnn_mnist_large_parameter_count():
    conv1 = 1 * 32 * 5 * 5 + 32  # 832
    conv2 = 32 * 64 * 5 * 5 + 64  # 51,264
    fc = 64 * 7 * 7 * 512 + 512  # 1,606,144 (padding 2: 28 -> 28 -> 14 -> 14 -> 7)
    classifier = 512 * 10 + 10  # 5,130
    assert conv1 + conv2 + fc + classifier == 1_663_370
    assert n_params(create_model("cnn_mnist_large")) == 1_663_370


def test_prunefl_models_match_table_1():
    # Conv-FashionMNIST: conv 18.8K / FC 722.6K / all 741.4K
    model = create_model("conv_fmnist")
    conv = sum(n_params(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    fc = sum(n_params(m) for m in model.modules() if isinstance(m, nn.Linear))
    assert conv == (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) == 18_816
    assert fc == (2304 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10) == 722_610
    assert model.fc[0].in_features == 2304
    # Conv-FEMNIST: conv 103.4K / FC 2654.8K / all 2,758,142 (the paper's exact figure)
    model = create_model("conv_femnist")
    conv = sum(n_params(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    fc = sum(n_params(m) for m in model.modules() if isinstance(m, nn.Linear))
    assert conv == (1 * 32 * 25 + 32) + (32 * 128 * 25 + 128) == 103_360
    assert fc == (2048 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 62 + 62) == 2_654_782
    assert n_params(model) == 2_758_142


def test_resnet32_layer_counts():
    model = create_model("resnet32_cifar")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    shortcut_convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and ".shortcut." in n]
    # 1 stem + 3 stages * 5 blocks * 2 convs = 31 main-path convs, + 2 projection shortcuts
    assert len(convs) == 33 and len(shortcut_convs) == 2 and len(linears) == 1
    assert len(convs) - len(shortcut_convs) + len(linears) == 32  # the "32" in ResNet-32
    assert all(m.kernel_size == (1, 1) for m in shortcut_convs)
    assert n_params(model) == 466_906


def test_vgg_layer_counts_and_prunefl_head():
    for name, n_convs in (("vgg11_bn", 8), ("vgg19_bn", 16)):
        model = create_model(name)
        assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_convs
        assert model.classifier.in_features == 512
    # PruneFL's VGG-11 head: FC 512x512x512x10 = 530.4K parameters (Table 1)
    model = create_model("vgg11_bn", fc_layers=(512, 512))
    fc = sum(n_params(m) for m in model.modules() if isinstance(m, nn.Linear))
    assert fc == 2 * (512 * 512 + 512) + 512 * 10 + 10 == 530_442


def test_lstm_lm_details():
    model = create_model("lstm_lm", vocab_size=30, embed_dim=8, hidden_size=8, tie_weights=True)
    assert model.classifier.weight is model.embedding.weight
    x = torch.randint(0, 30, (3, 5))
    assert model(x).shape == (3, 5, 30)
    model = create_model("lstm_lm", vocab_size=30, embed_dim=8, hidden_size=12, batch_first=False, num_layers=1)
    assert model(x.t()).shape == (5, 3, 30)
    # Defaults: 2-layer, 200-wide LSTM on a 10k vocabulary
    # embedding 10000*200 + LSTM 2 * 4*(200*200 + 200*200 + 2*200) + decoder 200*10000 + 10000
    assert n_params(create_model("lstm_lm")) == 2_000_000 + 643_200 + 2_010_000
