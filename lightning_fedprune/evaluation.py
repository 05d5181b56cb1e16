"""Evaluation of a federatable module on a data loader (global test set or a client's split)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torchmetrics import MeanMetric

__all__ = ["evaluate"]


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
    try:
        for batch in loader:
            loss_sum, preds, target = module.federated_evaluate_batch(batch)
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
