"""The round contract's messages: :class:`ClientTask` (server -> client) and :class:`ClientResult`.

Both are small typed records of plain data. On the wire each is ONE safetensors blob: the tensors
under ``weights/<name>`` and ``extras/<name>``, everything else as a JSON header in the
safetensors metadata. Nothing is pickled, so decoding a message never runs code. Decoding
validates what it reads (kind, version, round, client id, tensor names, shapes, dtypes,
finiteness, metric ranges) and raises :class:`~lightning_fedprune.errors.PayloadError`
naming what is wrong.

Conventions:
    * ``weights``: the model tensors the client starts from (task) or ends with (result), keyed
      like the model's ``state_dict``; for pruned methods they are the *sub-model's* tensors.
    * ``extras``: algorithm tensors that are not model weights (e.g. SCAFFOLD's server control
      variate in a task, the control-variate delta in a result).
    * ``config``: JSON-able algorithm settings (proximal ``mu``, pruning plan, ratio, ...).
    * local work is either ``local_epochs`` passes over the client's data or ``local_steps``
      optimizer steps (exactly one of them is set).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lightning_fedprune.errors import PayloadError

__all__ = [
    "ClientTask",
    "ClientResult",
    "ClientMetrics",
    "ClientFailure",
    "TensorSpec",
    "tensor_spec",
    "encode_task",
    "decode_task",
    "encode_result",
    "decode_result",
    "encode_weights",
    "decode_weights",
    "all_finite",
    "MESSAGE_VERSION",
]

MESSAGE_VERSION = 1
_META_KEY = "lfp_message"
_ALLOWED_DTYPES = {
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}

#: ``{name: (shape, dtype)}`` -- what a received dict of tensors must look like.
TensorSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The :data:`TensorSpec` of a dict of tensors."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


@dataclass(frozen=True)
class ClientTask:
    """What the server asks one client to do in one round."""

    round: int
    client_id: int
    weights: dict[str, torch.Tensor]
    local_epochs: int | None = 1
    local_steps: int | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.local_epochs is None) == (self.local_steps is None):
            raise PayloadError(
                f"a ClientTask needs exactly one of local_epochs / local_steps, got "
                f"local_epochs={self.local_epochs}, local_steps={self.local_steps}"
            )
        work = self.local_epochs if self.local_epochs is not None else self.local_steps
        if not isinstance(work, int) or isinstance(work, bool) or work < 1:
            raise PayloadError(f"local work must be a positive int, got {work!r}")


@dataclass(frozen=True)
class ClientMetrics:
    """What a client measured while doing its task.

    Attributes:
        num_samples: local training samples (the FedAvg weight).
        num_steps: optimizer steps taken.
        num_examples: examples processed (samples x passes); FLOPs are charged on these.
        loss_before: mean training loss of the first local epoch (first half of the steps when
            the client ran a single epoch or a step budget).
        loss_after: mean training loss of the last local epoch (second half likewise).
        compute_seconds: process CPU time the local training took.
        flops: floating point operations of the local training (forward + backward).
        extra: further named floats (e.g. ``local_test_acc``).
    """

    num_samples: int
    num_steps: int
    num_examples: int = 0
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    compute_seconds: float = 0.0
    flops: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_steps": self.num_steps,
            "num_examples": self.num_examples,
            "loss_before": _json_float(self.loss_before),
            "loss_after": _json_float(self.loss_after),
            # a measured time: written at fixed width so payload sizes (which the simulated
            # network charges) do not depend on how many digits the measurement happened to have
            "compute_seconds": f"{float(self.compute_seconds):.9e}",
            "flops": self.flops,
            "extra": {k: _json_float(v) for k, v in self.extra.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> ClientMetrics:
        if not isinstance(data, dict):
            raise PayloadError(f"metrics must be a JSON object, got {type(data).__name__}")
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise PayloadError(f"metrics.extra must be a JSON object, got {type(extra).__name__}")
        try:
            out = cls(
                num_samples=_int(data["num_samples"], "num_samples", minimum=1),  # the aggregation weight
                num_steps=_int(data["num_steps"], "num_steps", minimum=0),
                num_examples=_int(data.get("num_examples", 0), "num_examples", minimum=0),
                loss_before=_float(data.get("loss_before"), "loss_before"),
                loss_after=_float(data.get("loss_after"), "loss_after"),
                compute_seconds=_float(_fixed(data.get("compute_seconds", 0.0), "compute_seconds"), "compute_seconds", minimum=0.0),
                flops=_float(data.get("flops", 0.0), "flops", minimum=0.0),
                extra={str(k): _float(v, f"extra.{k}") for k, v in extra.items()},
            )
        except KeyError as err:
            raise PayloadError(f"metrics lack the field {err.args[0]!r}") from None
        return out


@dataclass(frozen=True)
class ClientResult:
    """What one client sends back after its task."""

    round: int
    client_id: int
    weights: dict[str, torch.Tensor]
    metrics: ClientMetrics
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: seconds from the task's dispatch to this result's arrival, set by the transport that received
    #: it (the simulated clock, or a real clock in a deployment); never sent by the client
    completion_time: float | None = None


@dataclass(frozen=True)
class ClientFailure:
    """A client that was asked to work in a round and delivered nothing usable.

    ``reason`` is one line a person can read; ``kind`` is one of ``"error"`` (the client raised),
    ``"dropout"`` (the device went away), ``"deadline"`` (too late), ``"rejected"`` (its result
    failed validation).
    """

    round: int
    client_id: int
    kind: str
    reason: str


# ----------------------------------------------------------------------------- encode / decode


def encode_task(task: ClientTask) -> bytes:
    """Serialize a task to safetensors bytes (no pickle)."""
    header = {
        "kind": "task",
        "version": MESSAGE_VERSION,
        "round": task.round,
        "client_id": task.client_id,
        "local_epochs": task.local_epochs,
        "local_steps": task.local_steps,
        "config": task.config,
    }
    return _encode(header, task.weights, task.extras)


def encode_result(result: ClientResult) -> bytes:
    """Serialize a result to safetensors bytes (no pickle)."""
    header = {
        "kind": "result",
        "version": MESSAGE_VERSION,
        "round": result.round,
        "client_id": result.client_id,
        "metrics": result.metrics.to_json(),
        "config": result.config,
    }
    return _encode(header, result.weights, result.extras)


def decode_task(
    data: bytes,
    *,
    expect_round: int | None = None,
    expect_client: int | None = None,
    max_bytes: int | None = None,
) -> ClientTask:
    """Parse and validate bytes written by :func:`encode_task`.

    Raises:
        PayloadError: the bytes are not a task, are too large, carry another round or client,
            or hold tensors that are not finite or of an unsupported dtype.
    """
    header, weights, extras = _decode(data, "task", expect_round, expect_client, max_bytes)
    try:
        return ClientTask(
            round=header["round"],
            client_id=header["client_id"],
            weights=weights,
            extras=extras,
            local_epochs=header.get("local_epochs"),
            local_steps=header.get("local_steps"),
            config=_config(header.get("config", {})),
        )
    except TypeError as err:
        raise PayloadError(f"malformed task header: {err}") from None


def decode_result(
    data: bytes,
    *,
    expect_round: int | None = None,
    expect_client: int | None = None,
    expect_weights: TensorSpec | None = None,
    expect_extras: TensorSpec | None = None,
    max_bytes: int | None = None,
) -> ClientResult:
    """Parse and validate bytes written by :func:`encode_result`.

    Args:
        expect_round / expect_client: the round and client the receiver is waiting for.
        expect_weights / expect_extras: exact ``{name: (shape, dtype)}`` the tensors must have
            (what the server sent, or what the task's plan implies). ``None`` skips the check.
        max_bytes: reject larger payloads before parsing them.

    Raises:
        PayloadError: naming the first mismatch found.
    """
    header, weights, extras = _decode(data, "result", expect_round, expect_client, max_bytes)
    if expect_weights is not None:
        check_tensors(weights, expect_weights, what="weights")
    if expect_extras is not None:
        check_tensors(extras, expect_extras, what="extras")
    return ClientResult(
        round=header["round"],
        client_id=header["client_id"],
        weights=weights,
        extras=extras,
        metrics=ClientMetrics.from_json(header.get("metrics")),
        config=_config(header.get("config", {})),
    )


def encode_weights(weights: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize model tensors alone, with no task around them (no pickle).

    For one round's global model that several tasks share: a transport that carries them once
    sends each task with empty ``weights`` beside these bytes, and the receiver puts the decoded
    tensors into every such task.
    """
    return _encode({"kind": "weights", "version": MESSAGE_VERSION}, weights, {})


def decode_weights(data: bytes, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Parse and validate bytes written by :func:`encode_weights` (the same checks as a task's tensors).

    Raises:
        PayloadError: the bytes are not model tensors, are too large, or hold tensors that are not
            finite or of an unsupported dtype.
    """
    _header(data, "weights", max_bytes)
    weights, extras = _tensors(data, "weights")
    if extras:
        raise PayloadError(f"weights payload holds extras: {sorted(extras)[:5]}")
    return weights


def check_tensors(tensors: Mapping[str, torch.Tensor], spec: TensorSpec, *, what: str) -> None:
    """Raise PayloadError unless ``tensors`` has exactly the names, shapes and dtypes of ``spec``."""
    missing = sorted(set(spec) - set(tensors))
    unexpected = sorted(set(tensors) - set(spec))
    if missing or unexpected:
        raise PayloadError(f"{what} do not match what was expected: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise PayloadError(
                f"{what} tensor {name!r} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                f"expected {tuple(shape)} and {dtype}"
            )


# ----------------------------------------------------------------------------- internals


def _encode(header: dict[str, Any], weights: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in (("weights/", weights), ("extras/", extras)):
        for name, t in group.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
            # safetensors writes only a tensor's own bytes (a sliced view never drags its base
            # storage along, a test pins it); it needs them contiguous and on the CPU
            tensors[prefix + name] = t.detach().cpu().contiguous()
    return st_save(tensors, metadata={_META_KEY: json.dumps(header, allow_nan=False)})


def _decode(
    data: bytes, kind: str, expect_round: int | None, expect_client: int | None, max_bytes: int | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
    header = _header(data, kind, max_bytes)
    rnd = _int(header.get("round"), "round", minimum=0)
    cid = _int(header.get("client_id"), "client_id", minimum=0)
    if expect_round is not None and rnd != expect_round:
        raise PayloadError(f"{kind} is for round {rnd}, expected round {expect_round}")
    if expect_client is not None and cid != expect_client:
        raise PayloadError(f"{kind} is from/for client {cid}, expected client {expect_client}")
    weights, extras = _tensors(data, kind)
    return header, weights, extras


def _header(data: Any, kind: str, max_bytes: int | None) -> dict[str, Any]:
    """The message's JSON header, checked for kind and version."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a {kind} payload must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"{kind} payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    from lightning_fedprune.core.serialization import _read_metadata, parse_json

    meta = _read_metadata(bytes(data))
    if _META_KEY not in meta:
        raise PayloadError(f"payload has no {_META_KEY!r} header: not a lightning_fedprune message")
    header = parse_json(meta[_META_KEY], "message header")
    if not isinstance(header, dict):
        raise PayloadError("message header is not a JSON object")
    if header.get("kind") != kind:
        raise PayloadError(f"expected a {kind} message, got kind={header.get('kind')!r}")
    if header.get("version") != MESSAGE_VERSION:
        raise PayloadError(f"message version {header.get('version')!r} is not supported (this side speaks {MESSAGE_VERSION})")
    return header


def _tensors(data: bytes, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The message's ``weights/`` and ``extras/`` tensors, each of an allowed dtype and finite."""
    try:
        tensors = st_load(bytes(data))
    except Exception as err:
        raise PayloadError(f"{kind} tensors cannot be read: {err}") from None
    weights: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("weights/"):
            target, name = weights, key[len("weights/") :]
        elif key.startswith("extras/"):
            target, name = extras, key[len("extras/") :]
        else:
            raise PayloadError(f"{kind} holds tensor {key!r} outside weights/ and extras/")
        if not name:
            raise PayloadError(f"{kind} holds a tensor with an empty name")
        if t.dtype not in _ALLOWED_DTYPES:
            raise PayloadError(f"{kind} tensor {key!r} has unsupported dtype {t.dtype}")
        if t.is_floating_point() and not all_finite(t):
            raise PayloadError(f"{kind} tensor {key!r} holds NaN or infinite values")
        target[name] = t
    return weights, extras


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite (no NaN, no infinity).

    A NaN or an infinity makes any sum that includes it NaN or infinite, so a finite sum proves
    every element finite in one read of the tensor (``isfinite(t).all()`` writes and reads a mask
    as large as the tensor, ~25x slower on a large one). A sum that is not finite (a non-finite
    element, or finite elements whose sum overflows) is settled by the exact element-wise check.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _config(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"config must be a JSON object, got {type(value).__name__}")
    return value


#: the largest integer a peer may send in a header (exact in a float64, so weights stay finite)
MAX_WIRE_INT = 2**53


def _int(value: Any, name: str, *, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError(f"{name} must be an integer, got {str(value)[:80]}")
    if minimum is not None and value < minimum:
        raise PayloadError(f"{name} must be >= {minimum}, got {str(value)[:80]}")
    if abs(value) > MAX_WIRE_INT:
        raise PayloadError(f"{name} must be at most 2**53 in size, got a {len(str(abs(value)))}-digit number")
    return value


def _float(value: Any, name: str, *, minimum: float | None = None) -> float:
    if value is None:
        if minimum is not None:
            raise PayloadError(f"{name} must be a finite number >= {minimum}, got null")
        return float("nan")
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            value = float(value["__float__"])
        except (TypeError, ValueError, OverflowError):
            raise PayloadError(f"{name} must be a number, got {str(value)[:80]}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PayloadError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise PayloadError(f"{name} is too large for a float ({len(str(abs(value)))} digits)") from None
    if minimum is not None and not (math.isfinite(value) and value >= minimum):
        raise PayloadError(f"{name} must be a finite number >= {minimum}, got {value}")
    return value


def _fixed(value: Any, name: str) -> Any:
    """Parse a fixed-width decimal string written by :meth:`ClientMetrics.to_json`."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise PayloadError(f"{name} must be a number, got {value!r}") from None
    return value


def _json_float(value: float) -> Any:
    value = float(value)
    return value if math.isfinite(value) else {"__float__": repr(value)}
