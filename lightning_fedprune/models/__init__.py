"""Models for lightning_fedprune: a name-based registry, the model families used by the FedMP,
PruneFL, FedDP and NestFL experiments, and plain LightningModules wrapping them.

>>> from lightning_fedprune.models import create_model, model_info, list_models
>>> model = create_model("conv_femnist")            # or "timm:resnet18", num_classes=10
>>> info = model_info("conv_femnist")
>>> model(info.example_input(2)).shape
torch.Size([2, 62])

Entrypoints live in one module per family (``mlp``, ``cnn``, ``alexnet``, ``vgg``, ``resnet``,
``lstm``, ``har``); importing this package registers them all.
"""

from __future__ import annotations

# Importing the family modules registers their entrypoints.
from lightning_fedprune.models import alexnet, cnn, har, lstm, mlp, resnet, vgg  # noqa: F401
from lightning_fedprune.models.modules import ClassifierModule, LanguageModelModule
from lightning_fedprune.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_description,
    model_info,
    register_model,
)

__all__ = [
    "ModelInfo",
    "register_model",
    "create_model",
    "model_info",
    "list_models",
    "model_description",
    "ClassifierModule",
    "LanguageModelModule",
]
