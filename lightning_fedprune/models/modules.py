"""Plain LightningModules wrapping the registered models (no federated logic).

:class:`ClassifierModule` trains image / vector classifiers with cross-entropy and reports
accuracy; :class:`LanguageModelModule` trains next-token language models (``lstm_lm``) and reports
perplexity. Both keep the network in ``self.model`` so that federated / pruning code can swap or
inspect it, and both log sparingly: the training loss is averaged on-device and logged once per
epoch as ``train_loss`` (no per-step ``self.log``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_fedprune.errors import ModelError
from lightning_fedprune.models.registry import create_model

__all__ = ["OPTIMIZERS", "ClassifierModule", "LanguageModelModule"]

#: Optimizers accepted by ``optimizer=``.
OPTIMIZERS = ("sgd", "adam")


def _check_nonneg(name: str, value: Any, *, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if strict else value >= 0)
    if not ok:
        bound = "> 0" if strict else ">= 0"
        raise ModelError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def _infer_num_classes(model: nn.Module) -> int:
    """Number of outputs of the model's ``classifier`` Linear (or of a timm model's head)."""
    head = dict(model.named_modules()).get("classifier")
    if isinstance(head, nn.Linear):
        return head.out_features
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            return head.out_features
    raise ModelError(
        f"Cannot tell how many classes {type(model).__name__} predicts: name its output layer "
        "'classifier' (an nn.Linear) or give the model an integer `num_classes` attribute."
    )


class _SupervisedModule(L.LightningModule):
    """Shared model construction, optimizer configuration and cheap train-loss tracking."""

    def __init__(
        self,
        model: nn.Module | str,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        optimizer: str,
        model_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            model = create_model(model, **model_kwargs)
        elif isinstance(model, nn.Module):
            if model_kwargs:
                raise ModelError(
                    f"Model keyword arguments {sorted(model_kwargs)} are only used when the model "
                    "is given by name; drop them or pass a model name instead of a module."
                )
        else:
            raise ModelError(
                "model must be an nn.Module or a registered model name, "
                f"got {type(model).__name__}."
            )
        self.lr = _check_nonneg("lr", lr, strict=True)
        self.momentum = _check_nonneg("momentum", momentum)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)
        if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
            raise ModelError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        self.optimizer_name = optimizer.lower()
        self.model = model
        self._train_loss_sum: torch.Tensor | None = None
        self._train_loss_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's output (logits)."""
        return self.model(x)

    def _track_train_loss(self, loss: torch.Tensor) -> None:
        detached = loss.detach()
        if self._train_loss_sum is None:
            self._train_loss_sum = detached
        else:
            self._train_loss_sum = self._train_loss_sum + detached
        self._train_loss_count += 1

    def on_train_epoch_end(self) -> None:
        """Log the epoch's mean training loss as ``train_loss`` (one log call per epoch)."""
        if self._train_loss_count:
            self.log("train_loss", self._train_loss_sum / self._train_loss_count)
        self._train_loss_sum, self._train_loss_count = None, 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD (``lr``, ``momentum``, ``weight_decay``) or Adam (``lr``, ``weight_decay``)."""
        params = self.model.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ModelError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer_name!r}.")


class ClassifierModule(_SupervisedModule):
    """Cross-entropy classification of ``(x, y)`` batches.

    Args:
        model: The network, or a registered model name (``"timm:<name>"`` included) built with
            ``create_model(model, **model_kwargs)``.
        lr: Learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay.
        optimizer: ``"sgd"`` or ``"adam"``.
        **model_kwargs: Passed to :func:`create_model` when ``model`` is a name.

    Logs ``train_loss`` (epoch mean), ``val_loss`` / ``val_acc`` and ``test_loss`` / ``test_acc``
    (epoch aggregates; accuracy is micro-averaged, i.e. plain accuracy).

    Raises:
        ModelError: On an unknown model name, invalid hyper-parameter or optimizer.
    """

    def __init__(
        self,
        model: nn.Module | str,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            optimizer=optimizer,
            model_kwargs=model_kwargs,
        )
        # Keep the name (useful for load_from_checkpoint) but never pickle a module.
        self.save_hyperparameters(ignore=None if isinstance(model, str) else ["model"])
        self.num_classes = _infer_num_classes(self.model)
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the cross-entropy loss of the batch."""
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self._track_train_loss(loss)
        return loss

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0])
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log ``val_loss`` and ``val_acc``."""
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log ``test_loss`` and ``test_acc``."""
        return self._eval_step(batch, "test", self.test_acc)


class LanguageModelModule(_SupervisedModule):
    """Next-token language modelling of ``(tokens, targets)`` batches (both ``LongTensor`` of the
    same shape, e.g. ``(B, T)``; targets are the tokens shifted by one).

    The loss is the cross-entropy over the flattened ``(B*T, V)`` logits. Gradient clipping is
    the Trainer's job (e.g. ``Trainer(gradient_clip_val=0.25)``; classic PTB SGD uses ``lr=20``).

    Args:
        model: The network, or a registered model name (default ``"lstm_lm"``).
        lr: Learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay.
        optimizer: ``"sgd"`` or ``"adam"``.
        **model_kwargs: Passed to :func:`create_model` when ``model`` is a name.

    Logs ``train_loss`` (epoch mean), ``val_loss`` / ``val_ppl`` and ``test_loss`` / ``test_ppl``
    (token-weighted epoch mean loss and its exponential).

    Raises:
        ModelError: On an unknown model name, invalid hyper-parameter or optimizer.
    """

    def __init__(
        self,
        model: nn.Module | str = "lstm_lm",
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            optimizer=optimizer,
            model_kwargs=model_kwargs,
        )
        self.save_hyperparameters(ignore=None if isinstance(model, str) else ["model"])
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    def _loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        tokens, targets = batch
        logits = self.model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, targets.numel()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the mean per-token cross-entropy of the batch."""
        loss, _ = self._loss(batch)
        self._track_train_loss(loss)
        return loss

    def _eval_step(self, batch: Any, stage: str, metric: MeanMetric) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        metric.update(loss.detach(), weight=n_tokens)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=n_tokens)
        return loss

    def _log_perplexity(self, stage: str, metric: MeanMetric) -> None:
        if metric.update_count:
            self.log(f"{stage}_ppl", torch.exp(metric.compute()))
        metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log ``val_loss``; ``val_ppl`` is logged at the end of the epoch."""
        return self._eval_step(batch, "val", self.val_nll)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_ppl = exp(token-weighted mean validation loss)``."""
        self._log_perplexity("val", self.val_nll)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log ``test_loss``; ``test_ppl`` is logged at the end of the epoch."""
        return self._eval_step(batch, "test", self.test_nll)

    def on_test_epoch_end(self) -> None:
        """Log ``test_ppl = exp(token-weighted mean test loss)``."""
        self._log_perplexity("test", self.test_nll)
