"""Structured pruning plans on torch-pruning dependency graphs.

* :class:`Planner` traces a model once and makes plans (FedMP's L1 rule, absolute counts,
  explicit indices, nested plans);
* :class:`Plan` is data (kept channels per group + the architecture's index maps): extract,
  recover, sparse / residual models, composition, JSON;
* :func:`resize_module` reshapes a module in place to a plan's sub-model shapes.

``Plan``, ``Layout`` and ``resize_module`` need only torch; ``Planner`` imports torch-pruning
(which imports timm, ~2 s), so it is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from lightning_fedprune.core.pruning.layout import Layout
from lightning_fedprune.core.pruning.plan import Plan
from lightning_fedprune.core.pruning.resize import resize_module

__all__ = ["Planner", "Plan", "Layout", "resize_module", "matches_unprunable"]


def __getattr__(name: str) -> Any:
    if name in ("Planner", "matches_unprunable"):
        from lightning_fedprune.core.pruning import planner

        return getattr(planner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
