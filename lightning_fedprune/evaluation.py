"""Evaluation of a federatable module on a data loader (global test set or a client's split)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchmetrics import MeanMetric

__all__ = ["evaluate", "GlobalEvaluator"]


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader: Iterable[Any], *, perplexity: bool = False) -> dict[str, float]:
    """Mean loss and accuracy of ``module`` over ``loader`` (module left in its previous mode).

    Uses the module's ``federated_evaluate_batch`` (see :class:`FederatedModuleMixin`), which
    returns the batch's loss sum, predicted labels and targets.

    Returns:
        ``{"loss": ..., "accuracy": ..., "num_samples": ...}`` plus ``"perplexity"`` (exp of the
        mean per-token loss) when ``perplexity`` is true. Accuracy is NaN when the module returns
        no predictions.
    """
    was_training = module.training
    module.eval()
    loss = MeanMetric()
    correct = 0  # exact integer counts: a float32 mean would put 342/360 just below 0.95
    scored = 0
    count = 0
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        for batch in loader:
            if device.type != "cpu":  # a module trained on a GPU: its batches go there too
                batch = move_data_to_device(batch, device)
            loss_sum, preds, target = module.federated_evaluate_batch(batch)
            if device.type != "cpu":
                loss_sum = loss_sum.cpu()
            n = int(target.numel()) if target is not None else int(batch[0].shape[0])
            if n == 0:
                continue
            loss.update(loss_sum / n, weight=n)
            if preds is not None and target is not None:
                correct += int((preds == target).sum())
                scored += n
            count += n
    finally:
        module.train(was_training)
    if count == 0:
        return {"loss": math.nan, "accuracy": math.nan, "num_samples": 0.0}
    out = {"loss": float(loss.compute()), "num_samples": float(count)}
    out["accuracy"] = correct / scored if scored else math.nan
    if perplexity:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


class GlobalEvaluator:
    """Evaluates global models on the global test set with one module of the run's architecture.

    Args:
        module: a federated module (its weights are replaced by each evaluated state).
        loader: the global test set (``None``: nothing to evaluate, :attr:`available` is false).
        perplexity: also report perplexity (language models).
    """

    def __init__(self, module: Any, loader: Iterable[Any] | None, *, perplexity: bool = False) -> None:
        self.module = module
        self.loader = loader
        self.perplexity = bool(perplexity)

    @property
    def available(self) -> bool:
        """Whether there is a test set."""
        return self.loader is not None

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """:func:`evaluate` of the module holding ``state`` (communicated tensors)."""
        self.module.load_federated_state(state)
        return evaluate(self.module, self.loader or [], perplexity=self.perplexity)
