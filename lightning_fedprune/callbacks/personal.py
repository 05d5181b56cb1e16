"""A client's personalized model: the sub-network it trained, kept on the client.

:class:`PersonalizedModel` (client callback ``"personalized"``) stores, after every local training,
the client's trained sub-network -- its communicated tensors at the sub-model's shapes and, when
the task carries them, the kept channels per group in full-model coordinates -- in the client's
persistent state (``ctx.state["personal"]``). The transport keeps that state across rounds and
checkpoints it (a FedML client process in its own folder); it is never sent. :func:`personal_model`
reads it back.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.callbacks.base import ClientContext, FederatedCallback
from lightning_fedprune.callbacks.registry import register_client_callback
from lightning_fedprune.core.contract import KEPT

__all__ = ["PersonalizedModel", "PERSONAL_STATE_KEY", "personal_model"]

#: client-state key of the personalized model
PERSONAL_STATE_KEY = "personal"


@register_client_callback("personalized")
class PersonalizedModel(FederatedCallback):
    """Keeps each client's trained sub-network in its persistent state (see the module docstring)."""

    def on_client_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: ClientContext) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.federated_state().items()}
        entry: dict[str, Any] = {"round": int(ctx.task.round), "weights": weights}
        if KEPT in ctx.task.config:
            entry["kept"] = ctx.task.config[KEPT]
        ctx.state[PERSONAL_STATE_KEY] = entry


def personal_model(state: dict[str, Any]) -> dict[str, Any] | None:
    """The personalized model in a client's persistent state: ``{"round", "weights"[, "kept"]}`` or ``None``."""
    entry = state.get(PERSONAL_STATE_KEY)
    return entry if isinstance(entry, dict) and "weights" in entry else None
