"""Make any LightningModule federatable.

Mix :class:`FederatedModuleMixin` into a LightningModule (before ``LightningModule`` in the bases)
to say which tensors are communicated, which stay on the client, which layers must never be
pruned, and what an example input looks like. ``training_step`` is not touched::

    class MyModule(FederatedModuleMixin, L.LightningModule):
        federated_local_keys = ("head.*",)        # personalised head stays on the client
        federated_unprunable = ("head",)           # never structurally pruned
        ...

Without overriding anything, every ``state_dict`` entry is communicated, the module named
``classifier`` (if any) is unprunable, and evaluation assumes ``(inputs, targets)`` batches and a
forward that returns logits (``(B, C)`` or ``(B, T, C)`` for sequence models).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lightning_fedprune.errors import ConfigError

__all__ = ["FederatedModuleMixin", "EvalOutput"]

EvalOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]

# attributes Lightning sets on the module around every hook call; nn.Module.__setattr__ is slow
_FAST_ATTRS = frozenset({"_current_fx_name"})


class FederatedModuleMixin:
    """Declares how a LightningModule takes part in federated training.

    Class attributes (override in your module):
        federated_local_keys: glob patterns of ``state_dict`` keys that never leave the client
            (personalization layers, gates). Default: none.
        federated_unprunable: qualified module names that structured pruning must not touch
            (default: ``("classifier",)`` when such a module exists).
        federated_example_input_shape: shape of ONE input sample, used to build an example batch
            for graph tracing and FLOP counting when ``example_input_array`` is not set.
    """

    federated_local_keys: tuple[str, ...] = ()
    federated_unprunable: tuple[str, ...] = ("classifier",)
    federated_example_input_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ speed
    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning assigns `_current_fx_name` (a str) several times per training step; skip
        # nn.Module's parameter/buffer/module bookkeeping for it (it is never one of those).
        if name in _FAST_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ which tensors travel
    def is_local_key(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pat) for pat in self.federated_local_keys)

    def federated_state(self) -> dict[str, torch.Tensor]:
        """The communicated tensors (``state_dict`` minus local keys), detached, not copied."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if not self.is_local_key(k)}

    def local_state(self) -> dict[str, torch.Tensor]:
        """The tensors that stay on the client (copies)."""
        return {k: v.detach().clone() for k, v in self.state_dict(keep_vars=True).items() if self.is_local_key(k)}

    def trainable_names(self) -> tuple[str, ...]:
        """Names of the communicated tensors that are trainable parameters."""
        return tuple(n for n, p in self.named_parameters() if p.requires_grad and not self.is_local_key(n))

    def load_federated_state(self, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy ``state`` into the module's tensors in place (parameters keep their identity).

        Raises:
            ConfigError: a key is unknown, a communicated key is missing (``strict``) or a shape
                differs.
        """
        own = self.state_dict(keep_vars=True)
        unknown = [k for k in state if k not in own]
        if unknown:
            raise ConfigError(f"state has keys the module does not: {unknown[:5]}")
        if strict:
            missing = [k for k in own if k not in state and not self.is_local_key(k)]
            if missing:
                raise ConfigError(f"state lacks communicated keys of the module: {missing[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                target = own[k]
                if target.shape != v.shape:
                    raise ConfigError(f"tensor {k!r} has shape {tuple(v.shape)}, the module expects {tuple(target.shape)}")
                target.copy_(v)

    # ------------------------------------------------------------------ training
    def federated_extra_loss(self) -> torch.Tensor | None:
        """A scalar term the client runtime adds to the loss of every training step (``None``:
        nothing; the default). Override to regularize local training (e.g. a lasso on gate
        outputs recorded in ``forward``) without touching ``training_step``."""
        return None

    # ------------------------------------------------------------------ tracing
    def federated_example_input(self, batch: Any = None) -> Any:
        """An example input batch for tracing and FLOP counting (batch size 1).

        Uses ``example_input_array`` if set, else ``federated_example_input_shape``, else the
        first element of ``batch`` (a training batch) when given.
        """
        example = getattr(self, "example_input_array", None)
        if example is not None:
            return example
        if self.federated_example_input_shape is not None:
            return torch.zeros((1, *self.federated_example_input_shape))
        if batch is not None:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(x, torch.Tensor):
                return x[:1]
        raise ConfigError(
            f"{type(self).__name__} has no example input: set `example_input_array` or "
            "`federated_example_input_shape`"
        )

    # ------------------------------------------------------------------ evaluation
    def federated_evaluate_batch(self, batch: Any) -> EvalOutput:
        """Loss SUM, predicted labels and targets of one evaluation batch.

        Default: ``(inputs, targets)`` batches, logits from ``self(inputs)``, cross-entropy.
        Sequence outputs ``(B, T, C)`` are flattened over time. Override for other tasks; return
        ``(loss_sum, None, None)`` when accuracy makes no sense.
        """
        x, y = batch[0], batch[1]
        logits = self(x)
        if logits.dim() > 2:
            logits = logits.reshape(-1, logits.shape[-1])
            y = y.reshape(-1)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        return loss_sum, logits.argmax(dim=-1), y
