"""The FedML transports' wire envelope: round trips, and refusal of everything that is not one."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from lightning_fedprune.errors import PayloadError
from lightning_fedprune.fedml_adapters.envelope import (
    ENVELOPE_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    Envelope,
    decode_envelope,
    encode_envelope,
    fedml_msg_type,
)


def _env(**kw) -> Envelope:
    args = dict(type="result", sender=2, receiver=0, run_id="run-1", session="abc123", round=4, body={"client_id": 7}, payload=b"\x00\x01payload")
    args.update(kw)
    return Envelope(**args)


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return MAGIC + bytes([ENVELOPE_VERSION]) + len(h).to_bytes(4, "big") + h + payload


class _Boom:
    """Unpickling this would create a file: the envelope decoder must never get that far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_round_trip_keeps_every_field():
    env = _env()
    data = encode_envelope(env)
    assert data.startswith(MAGIC)
    back = decode_envelope(data)
    assert back == env
    assert fedml_msg_type("task") == "lfp.task"


def test_control_message_round_trip_and_payload_rules():
    hello = Envelope("hello", 3, 0, "r", "none", body={"clients": [2, 5], "session": "s1"})
    assert decode_envelope(encode_envelope(hello)) == hello
    with pytest.raises(PayloadError, match="carries no payload"):
        Envelope("hello", 3, 0, "r", "none", payload=b"x")
    with pytest.raises(PayloadError, match="needs a round"):
        Envelope("task", 0, 1, "r", "s", round=None)


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Boom(str(marker)))
    with pytest.raises(PayloadError, match="a Python pickle.*refused without unpickling"):
        decode_envelope(blob)
    assert not marker.exists()
    # the payload is live: unpickling it really would have created the file
    pickle.loads(blob).close()
    assert marker.exists()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"GET / HTTP/1.1\r\n", "foreign bytes"),
        (MAGIC + b"\x01", "too short"),
        (MAGIC + b"\x09" + (10).to_bytes(4, "big") + b"{}" * 5, "version 9 is not supported"),
        (MAGIC + b"\x01" + (999).to_bytes(4, "big") + b"{}", "does not fit"),
        (MAGIC + b"\x01" + (3).to_bytes(4, "big") + b"{x}", "not JSON"),
        (MAGIC + b"\x01" + (2).to_bytes(4, "big") + b"[]", "not a JSON object"),
    ],
)
def test_malformed_bytes_are_refused(data, match):
    with pytest.raises(PayloadError, match=match):
        decode_envelope(data)


def test_header_fields_are_validated():
    good = dict(type="ready", sender=0, receiver=1, run="r", session="s", round=None, body={}, payload_bytes=0)
    assert decode_envelope(_raw(good)).type == "ready"
    for key, value, match in [
        ("type", "exec", "unknown message type 'exec'"),
        ("sender", -1, "sender must be a rank"),
        ("receiver", True, "receiver must be a rank"),
        ("run", "../etc", "run must be 1-128 characters"),
        ("session", "", "session must be"),
        ("round", -3, "round must be null or an integer"),
        ("body", [1], "body must be a JSON object"),
        ("payload_bytes", 5, "declares 5 payload bytes but carries 0"),
    ]:
        with pytest.raises(PayloadError, match=match):
            decode_envelope(_raw({**good, key: value}))


def test_size_limits():
    env = _env(payload=os.urandom(5000))
    data = encode_envelope(env)
    assert decode_envelope(data, max_bytes=len(data)) == env
    with pytest.raises(PayloadError, match=f"message of {len(data)} bytes exceeds the limit of {len(data) - 1} bytes"):
        decode_envelope(data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadError, match="header of .* exceeds"):
        encode_envelope(_env(body={"x": "y" * MAX_HEADER_BYTES}))
    with pytest.raises(PayloadError, match="must be bytes"):
        decode_envelope("text")  # type: ignore[arg-type]
