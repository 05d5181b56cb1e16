"""Pickle-free serialization of nested state: tensors as safetensors, everything else as JSON.

A *nested state* is what ``state_dict()`` methods of strategies, callbacks, bandits and engines
return: dicts (string keys), lists and tuples, JSON scalars and ``torch.Tensor`` leaves. It is
encoded into ONE safetensors blob whose metadata holds the JSON skeleton; each tensor leaf is
replaced in the skeleton by ``{"__tensor__": "<key>"}``. Decoding never executes code.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lightning_fedprune.errors import PayloadError

__all__ = ["flatten_state", "unflatten_state", "dumps_state", "loads_state", "save_state", "save_encoded", "load_state", "parse_json", "MAX_JSON_DEPTH"]

#: deepest nesting of arrays/objects accepted in JSON a peer sent (ours never exceed about 10)
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def parse_json(text: str | bytes | bytearray, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for text a peer sent: nesting deeper than ``max_depth`` and everything else
    that is not JSON raise :class:`PayloadError` naming ``what`` (never RecursionError or
    UnicodeDecodeError).
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise PayloadError(f"{what} is not UTF-8: {err}") from None
    if not isinstance(text, str):
        raise PayloadError(f"{what} is not text, got {type(text).__name__}")
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > max_depth:
                raise PayloadError(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise PayloadError(f"{what} is not JSON: {err}") from None

_META_KEY = "lfp_state"
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"
_FLOAT_TAG = "__float__"


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and a flat ``{key: tensor}`` dict.

    Non-finite floats are tagged so that strict JSON still carries them.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "_"
            tensors[key] = value.detach().contiguous().cpu()
            return {_TENSOR_TAG: key}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"state keys must be str, got {type(k).__name__} ({k!r}) at {path!r}")
                out[k] = walk(v, f"{path}/{k}" if path else k)
            return out
        if isinstance(value, tuple):
            return {_TUPLE_TAG: [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            return {_FLOAT_TAG: repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot serialize {type(value).__name__} at {path!r}: only tensors and JSON values")

    return walk(obj, ""), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if _TENSOR_TAG in value and len(value) == 1:
                key = value[_TENSOR_TAG]
                if not isinstance(key, str) or key not in tensors:
                    raise PayloadError(f"state refers to tensor {key!r} that the payload does not hold")
                return tensors[key]
            if _TUPLE_TAG in value and len(value) == 1:
                items = value[_TUPLE_TAG]
                if not isinstance(items, list):
                    raise PayloadError(f"a tuple in the state must hold a list, got {items!r}")
                return tuple(walk(v) for v in items)
            if _FLOAT_TAG in value and len(value) == 1:
                text = value[_FLOAT_TAG]
                if text not in ("nan", "inf", "-inf"):
                    raise PayloadError(f"a tagged float in the state must be nan, inf or -inf, got {text!r}")
                return float(text)
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(skeleton)


def dumps_state(obj: Any) -> bytes:
    """Encode a nested state into safetensors bytes (JSON skeleton in the metadata)."""
    skeleton, tensors = flatten_state(obj)
    return st_save(tensors, metadata={_META_KEY: json.dumps(skeleton, allow_nan=False)})


def loads_state(data: bytes) -> Any:
    """Decode bytes written by :func:`dumps_state`. Raises PayloadError on anything else."""
    try:
        tensors = st_load(data)
        meta = _read_metadata(data)
    except PayloadError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise PayloadError(f"not a valid safetensors payload: {err}") from err
    if _META_KEY not in meta:
        raise PayloadError(f"payload has no {_META_KEY!r} metadata: not written by lightning_fedprune")
    skeleton = parse_json(meta[_META_KEY], "state skeleton")
    return unflatten_state(skeleton, tensors)


def _read_metadata(data: bytes) -> dict[str, str]:
    """Read the safetensors header's ``__metadata__`` without touching tensor bytes."""
    if len(data) < 8:
        raise PayloadError(f"payload of {len(data)} bytes is too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise PayloadError(f"safetensors header length {n} does not fit a {len(data)}-byte payload")
    header = parse_json(data[8 : 8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise PayloadError(f"safetensors header is not a JSON object, got {type(header).__name__}")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise PayloadError("safetensors __metadata__ is not a mapping")
    return meta


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """Write a nested state to ``path`` atomically (:func:`save_encoded` of :func:`dumps_state`)."""
    save_encoded(dumps_state(obj), path)


def save_encoded(data: bytes, path: str | os.PathLike) -> None:
    """Write encoded bytes (:func:`dumps_state`'s) to ``path`` atomically: to a temporary file, then rename.

    The file is readable and writable by its owner only (0600): checkpoints and client states hold
    models, control variates and personalized weights.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> Any:
    """Read a nested state written by :func:`save_state`."""
    return loads_state(Path(path).read_bytes())
