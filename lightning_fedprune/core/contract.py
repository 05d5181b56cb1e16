"""The strategy -> client contract: the names a task's and a result's ``config`` may hold, the
formats a task's weights may come in, and compact kept-channel indices.

A strategy says how its tasks are to be trained with plain JSON values in ``ClientTask.config``;
the client side reads them. Every key has one name, here, so a strategy and the callback that
reads its key cannot drift apart:

========================== ====================================================================
key                        meaning
========================== ====================================================================
``weights_format``         how ``task.weights`` are encoded (:data:`WEIGHTS_FORMATS`); default
                           ``"dense"``
``pruning_ratio``          the structured pruning ratio of a sub-model task (for reports)
``probe_loss``             evaluate the first batch before and after local training
``prox_mu``                FedProx's proximal coefficient
``upload_keep_ratio``      top-k compressed upload: the fraction of entries sent
``upload_error_feedback``  top-k compressed upload: keep what was not sent for next time
``kept``                   kept channels per group of the task's sub-model
                           (:func:`encode_kept_groups`)
``gate_keep_ratio``        FedDP: the fraction of output channels each client-local gate keeps
``gate_lasso``             FedDP: lambda of the lasso on the gates' linear outputs
``perfedavg``              Per-FedAvg: ``{"variant", "alpha", "delta", "inner_fraction",
                           "adapt_from"}`` of the client's MAML steps
========================== ====================================================================

Weight formats are a registry (:func:`register_weights_format`): the client runtime decodes a
task's weights with the codec its ``weights_format`` names, never with a chain of special cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_fedprune.errors import PayloadError

__all__ = [
    "WEIGHTS_FORMAT",
    "PRUNING_RATIO",
    "PROBE_LOSS",
    "PROX_MU",
    "UPLOAD_KEEP_RATIO",
    "UPLOAD_ERROR_FEEDBACK",
    "KEPT",
    "GATE_KEEP_RATIO",
    "GATE_LASSO",
    "PERFEDAVG",
    "UPLOAD",
    "DENSE",
    "SUBMODEL",
    "COO",
    "WeightsFormat",
    "WEIGHTS_FORMATS",
    "register_weights_format",
    "weights_format_of",
    "encode_kept_groups",
    "decode_kept_groups",
]

# task config keys
WEIGHTS_FORMAT = "weights_format"
PRUNING_RATIO = "pruning_ratio"
PROBE_LOSS = "probe_loss"
PROX_MU = "prox_mu"
UPLOAD_KEEP_RATIO = "upload_keep_ratio"
UPLOAD_ERROR_FEEDBACK = "upload_error_feedback"
KEPT = "kept"
GATE_KEEP_RATIO = "gate_keep_ratio"
GATE_LASSO = "gate_lasso"
PERFEDAVG = "perfedavg"
# result config keys
UPLOAD = "upload"

# weight formats
DENSE = "dense"
SUBMODEL = "submodel"
COO = "coo"

Shapes = Mapping[str, tuple[int, ...]]
Decode = Callable[[Mapping[str, torch.Tensor], Shapes], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightsFormat:
    """How a task's weights are encoded.

    Attributes:
        name: the ``weights_format`` value.
        decode: ``(task weights, the module's full shapes) -> tensors to load``.
        reshapes: the decoded tensors may have other shapes than the module's (a structured
            sub-model: the client reshapes its network to them).
    """

    name: str
    decode: Decode
    reshapes: bool = False


#: ``weights_format`` value -> its codec
WEIGHTS_FORMATS: dict[str, WeightsFormat] = {}


def register_weights_format(name: str, *, reshapes: bool = False) -> Callable[[Decode], Decode]:
    """Register a decoder for a ``weights_format`` (a decorator)::

        @register_weights_format("coo")
        def unpack_state(payload, shapes): ...
    """

    def deco(fn: Decode) -> Decode:
        if name in WEIGHTS_FORMATS and WEIGHTS_FORMATS[name].decode is not fn:
            raise ValueError(f"weights format {name!r} is already registered")
        WEIGHTS_FORMATS[name] = WeightsFormat(name, fn, reshapes)
        return fn

    return deco


def weights_format_of(config: Mapping[str, Any]) -> WeightsFormat:
    """The codec a task's ``config`` names (``"dense"`` when it names none).

    Raises:
        PayloadError: an unknown format.
    """
    name = config.get(WEIGHTS_FORMAT, DENSE)
    if name not in WEIGHTS_FORMATS:
        import lightning_fedprune.core.sparse  # noqa: F401  (registers "coo")

    fmt = WEIGHTS_FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise PayloadError(f"unknown weights_format {name!r}; known: {', '.join(sorted(WEIGHTS_FORMATS))}")
    return fmt


def _as_is(weights: Mapping[str, torch.Tensor], shapes: Shapes) -> Mapping[str, torch.Tensor]:
    return weights


register_weights_format(DENSE)(_as_is)
WEIGHTS_FORMATS[SUBMODEL] = WeightsFormat(SUBMODEL, _as_is, reshapes=True)


# --------------------------------------------------------------------------------------------
# kept channels per group
# --------------------------------------------------------------------------------------------


def encode_kept_groups(plan: Any) -> dict[str, Any]:
    """A plan's kept channels in a few bytes: ``{"fingerprint", "kept": [hex bit mask per group]}``.

    Without the architecture's layout (which the client can build from its own full-size model):
    put it in ``task.config[KEPT]`` so a client can line its persistent full-size tensors up with
    the round's sub-model (:func:`decode_kept_groups`).
    """
    data = plan.to_json()
    out = {"fingerprint": data["fingerprint"], "kept": data["kept"]}
    if "ratio" in data:
        out["ratio"] = data["ratio"]
    return out


def decode_kept_groups(data: Any, layout: Any) -> Any:
    """The :class:`~lightning_fedprune.core.plans.Plan` of :func:`encode_kept_groups`'s output.

    Args:
        data: the encoded kept groups (from a task's config: untrusted).
        layout: the architecture's :class:`~lightning_fedprune.core.plans.Layout` (e.g.
            ``build_planner(full_module).layout``).

    Raises:
        PayloadError: malformed data, or kept groups of another architecture.
    """
    from lightning_fedprune.core.plans import Plan

    if not isinstance(data, Mapping) or set(data) - {"fingerprint", "kept", "ratio"}:
        raise PayloadError("kept groups must be a JSON object with 'fingerprint', 'kept' and optionally 'ratio'")
    if data.get("fingerprint") != layout.fingerprint:
        raise PayloadError(
            f"kept groups are for architecture {str(data.get('fingerprint'))[:16]!r}, this model is {layout.fingerprint!r}"
        )
    full = {"format": _layout_format(), "fingerprint": layout.fingerprint, "kept": data.get("kept"), "layout": layout.to_json()}
    if "ratio" in data:
        full["ratio"] = data["ratio"]
    return Plan.from_json(full)


def _layout_format() -> Any:
    from lightning_fedprune.core.pruning.layout import LAYOUT_FORMAT

    return LAYOUT_FORMAT
