"""Tests of lightning_fedprune.models.registry: names, kwargs, example inputs, timm, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedprune.errors import ModelError
from lightning_fedprune.models import create_model, list_models, model_info, register_model, registry

EXPECTED = {
    "alexnet_cifar",
    "cnn_digits",
    "cnn_har",
    "cnn_mnist",
    "cnn_mnist_large",
    "conv_femnist",
    "conv_fmnist",
    "lenet300_100",
    "lstm_lm",
    "mlp",
    "resnet32_cifar",
    "vgg11_bn",
    "vgg19_bn",
}


def test_list_models_is_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert set(names) == EXPECTED


def test_unknown_name_lists_choices_and_timm():
    with pytest.raises(ModelError) as exc:
        create_model("resnet32")
    msg = str(exc.value)
    assert "resnet32_cifar" in msg  # close-match suggestion and the full list
    assert "cnn_mnist" in msg and "lstm_lm" in msg
    assert "timm:<name>" in msg
    assert isinstance(exc.value, ValueError)
    with pytest.raises(ModelError, match="timm:<name>"):
        model_info("nope")
    with pytest.raises(ModelError):
        create_model(None)  # type: ignore[arg-type]


def test_unknown_kwarg_lists_accepted_arguments():
    with pytest.raises(ModelError, match=r"unexpected argument\(s\) num_class\b.*Accepted: num_classes, in_channels"):
        create_model("cnn_mnist", num_class=10)
    with pytest.raises(ModelError, match="unexpected"):
        model_info("cnn_mnist", foo=1)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("cnn_mnist", {"num_classes": 0}, "num_classes must be a positive integer"),
        ("mlp", {"hidden": (10, -1)}, r"hidden\[1\]"),
        ("mlp", {"in_features": 2.5}, "in_features"),
        ("alexnet_cifar", {"dropout": 1.0}, "dropout"),
        ("lstm_lm", {"embed_dim": 8, "hidden_size": 16, "tie_weights": True}, "tie_weights"),
    ],
)
def test_invalid_values_raise_model_error(name, kwargs, match):
    with pytest.raises(ModelError, match=match):
        create_model(name, **kwargs)


def test_example_input_follows_kwargs():
    assert model_info("cnn_mnist").example_input(2).shape == (2, 1, 28, 28)
    assert model_info("cnn_mnist", in_channels=3).example_input(4).shape == (4, 3, 28, 28)
    assert model_info("mlp", in_features=20).example_input(3).shape == (3, 20)
    assert model_info("vgg11_bn", in_channels=1).example_input(1).shape == (1, 1, 32, 32)
    assert model_info("resnet32_cifar", input_size=(3, 16, 16)).example_input(2).shape == (2, 3, 16, 16)
    # Info-only kwargs are ignored by create_model, so one dict can feed both.
    kwargs = {"num_classes": 5, "input_size": (3, 16, 16)}
    model = create_model("resnet32_cifar", **kwargs)
    assert model(model_info("resnet32_cifar", **kwargs).example_input(2)).shape == (2, 5)


def test_language_model_example_input():
    info = model_info("lstm_lm", vocab_size=50)
    x = info.example_input(2)
    assert x.dtype == torch.long and x.shape == (2, 35)
    assert int(x.min()) >= 0 and int(x.max()) < 50
    assert model_info("lstm_lm", seq_len=7).example_input(3).shape == (3, 7)
    assert model_info("lstm_lm", batch_first=False).example_input(3).shape == (35, 3)
    assert info.task == "language_model" and info.unprunable == ("classifier", "embedding")


def test_info_only_kwargs_are_checked():
    with pytest.raises(ModelError, match="seq_len"):
        model_info("cnn_mnist", seq_len=10)
    with pytest.raises(ModelError, match="input_size"):
        model_info("lstm_lm", input_size=(3, 32, 32))
    with pytest.raises(ModelError, match="input_size"):
        model_info("cnn_mnist", input_size=(1, 0, 28))
    with pytest.raises(ModelError, match="seq_len"):
        model_info("lstm_lm", seq_len=0)
    with pytest.raises(ModelError, match="batch_size"):
        model_info("mlp").example_input(0)


def test_example_input_is_deterministic_and_leaves_global_rng_alone():
    info = model_info("mlp")
    state = torch.get_rng_state()
    a, b = info.example_input(2), info.example_input(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_model_info_fn_rebuilds_the_same_architecture():
    info = model_info("mlp", in_features=8, hidden=(4,), num_classes=3)
    model = info.fn(in_features=8, hidden=(4,), num_classes=3)
    assert model(info.example_input(2)).shape == (2, 3)
    assert info.name == "mlp" and info.task == "classification" and info.unprunable == ("classifier",)


def test_register_model_custom_entrypoint(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model(input_shape=(5,), unprunable="head")
    def toy_linear(out: int = 2) -> nn.Module:
        model = nn.Sequential()
        model.add_module("head", nn.Linear(5, out))
        return model

    assert "toy_linear" in list_models()
    info = model_info("toy_linear")
    assert info.unprunable == ("head",)
    assert create_model("toy_linear", out=3)(info.example_input(2)).shape == (2, 3)

    with pytest.raises(ModelError, match="exactly one"):
        register_model()
    with pytest.raises(ModelError, match="task"):
        register_model(input_shape=(1,), task="regression")


def test_register_model_rejects_duplicate_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def mlp() -> nn.Module:  # same name as a built-in model
        return nn.Identity()

    with pytest.raises(ModelError, match="already registered"):
        register_model(input_shape=(1,))(mlp)


def test_timm_resnet18():
    model = create_model("timm:resnet18", num_classes=10)
    info = model_info("timm:resnet18", num_classes=10)
    x = info.example_input(2)
    assert x.shape == (2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert info.name == "timm:resnet18" and info.task == "classification"
    assert info.unprunable == ("fc",)
    modules = dict(model.named_modules())
    assert all(name in modules for name in info.unprunable)
    assert isinstance(modules["fc"], nn.Linear) and modules["fc"].out_features == 10
    assert model_info("timm:resnet18", input_size=(3, 64, 64)).example_input(1).shape == (1, 3, 64, 64)


def test_timm_in_channels_translation_and_errors():
    model = create_model("timm:resnet18", num_classes=4, in_channels=1)
    info = model_info("timm:resnet18", num_classes=4, in_channels=1)
    assert info.example_input(2).shape == (2, 1, 32, 32)
    assert model(info.example_input(2)).shape == (2, 4)
    with pytest.raises(ModelError, match="timm.list_models"):
        create_model("timm:not_a_real_net")
    with pytest.raises(ModelError, match="pretrained=False"):
        create_model("timm:resnet18", pretrained=True)
    with pytest.raises(ModelError, match="resnet18"):
        create_model("timm:resnet18", not_an_arg=1)
