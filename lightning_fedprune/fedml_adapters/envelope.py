"""The wire format of the FedML transports: one self-describing envelope per message, no pickle.

FedML's own communication managers pickle whole ``Message`` objects, so any peer that reaches a
port can run code on the receiver. Our managers put exactly one *envelope* on the wire instead::

    MAGIC (4 bytes "LFPM") | VERSION (1 byte) | header length (4 bytes, big-endian) | header | payload

The header is a small JSON object (type, sender rank, receiver rank, run id, server session,
round, a JSON ``body`` and the payload length); the payload is opaque bytes -- for tasks and
results the safetensors blob of :func:`~lightning_fedprune.core.messages.encode_task` /
:func:`~lightning_fedprune.core.messages.encode_result`, which is decoded (and validated) later by
the party that knows what it expects. Decoding an envelope only parses JSON and slices bytes.

Message types (:data:`MESSAGE_TYPES`):

* ``hello`` (client -> server): "I am up"; body ``{"clients": [ids it serves], "session": its own id}``.
* ``ready`` (server -> client): "I know you"; answers a hello, and is announced by a (re)started
  server to every rank so that live clients say hello again.
* ``task`` (server -> client): payload = an encoded :class:`~lightning_fedprune.core.ClientTask`;
  body ``{"client_id", "batch"}`` (``batch``: how many tasks this rank gets this round, so the
  client can train them in one ``Trainer.fit``).
* ``result`` (client -> server): payload = an encoded :class:`~lightning_fedprune.core.ClientResult`.
* ``failure`` (client -> server): body ``{"client_id", "reason"}``: local training raised.
* ``finish`` (server -> client): the run is over; the client process exits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from lightning_fedprune.core.serialization import parse_json
from lightning_fedprune.errors import PayloadError

__all__ = [
    "Envelope",
    "MESSAGE_TYPES",
    "MAGIC",
    "ENVELOPE_VERSION",
    "MAX_HEADER_BYTES",
    "encode_envelope",
    "decode_envelope",
    "fedml_msg_type",
    "HELLO",
    "READY",
    "TASK",
    "RESULT",
    "FAILURE",
    "FINISH",
    "Authenticator",
    "rank_key",
]

MAGIC = b"LFPM"
ENVELOPE_VERSION = 1
#: a header is a few hundred bytes; anything near this is not ours
MAX_HEADER_BYTES = 64 * 1024
_PREFIX = len(MAGIC) + 1 + 4

HELLO, READY, TASK, RESULT, FAILURE, FINISH = "hello", "ready", "task", "result", "failure", "finish"
MESSAGE_TYPES = (HELLO, READY, TASK, RESULT, FAILURE, FINISH)
#: message types that carry a payload (all others must have an empty one)
_WITH_PAYLOAD = (TASK, RESULT)
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def fedml_msg_type(kind: str) -> str:
    """The FedML ``Message`` type string of one of our message types (``"lfp.task"``, ...)."""
    return f"lfp.{kind}"


@dataclass(frozen=True)
class Envelope:
    """One message between a server (rank 0) and a client process (rank >= 1).

    Attributes:
        type: one of :data:`MESSAGE_TYPES`.
        sender / receiver: FedML ranks.
        run_id: the deployment's run id; messages of another run are rejected.
        session: the server process's session id (random per server start); a result echoes the
            session of its task, so results meant for a crashed server are told apart.
        round: the round the message belongs to (``None`` for hello/ready/finish).
        body: small JSON-able fields of the message type.
        payload: opaque bytes (an encoded task or result), empty for control messages.
    """

    type: str
    sender: int
    receiver: int
    run_id: str
    session: str
    round: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""
    auth: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_header_fields(
            {
                "type": self.type,
                "sender": self.sender,
                "receiver": self.receiver,
                "run": self.run_id,
                "session": self.session,
                "round": self.round,
                "body": self.body,
            }
        )
        if not isinstance(self.payload, (bytes, bytearray)):
            raise PayloadError(f"envelope payload must be bytes, got {type(self.payload).__name__}")
        if self.payload and self.type not in _WITH_PAYLOAD:
            raise PayloadError(f"a {self.type!r} message carries no payload, got {len(self.payload)} bytes")


def encode_envelope(env: Envelope) -> bytes:
    """The envelope's bytes (see the module docstring)."""
    header = {
        "type": env.type,
        "sender": env.sender,
        "receiver": env.receiver,
        "run": env.run_id,
        "session": env.session,
        "round": env.round,
        "body": env.body,
        "payload_bytes": len(env.payload),
    }
    if env.auth is not None:
        header["auth"] = env.auth
    raw = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise PayloadError(f"envelope header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES} bytes")
    return b"".join((MAGIC, bytes([ENVELOPE_VERSION]), len(raw).to_bytes(4, "big"), raw, bytes(env.payload)))


def decode_envelope(data: Any, *, max_bytes: int | None = None) -> Envelope:
    """Parse and check the bytes of one envelope; never executes anything.

    Args:
        data: the received bytes.
        max_bytes: reject larger messages before looking inside.

    Raises:
        PayloadError: naming why the bytes are not a valid envelope (too large, a pickle or other
            foreign bytes, a malformed header, a length that does not add up).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not data.startswith(MAGIC):
        what = "a Python pickle" if data[:1] == b"\x80" else "foreign bytes"
        raise PayloadError(f"not a lightning_fedprune envelope ({what}, starts with {data[:8]!r}); refused without unpickling")
    if len(data) < _PREFIX:
        raise PayloadError(f"message of {len(data)} bytes is too short for an envelope")
    version = data[len(MAGIC)]
    if version != ENVELOPE_VERSION:
        raise PayloadError(f"envelope version {version} is not supported (this side speaks {ENVELOPE_VERSION})")
    n = int.from_bytes(data[len(MAGIC) + 1 : _PREFIX], "big")
    if n <= 0 or n > MAX_HEADER_BYTES or _PREFIX + n > len(data):
        raise PayloadError(f"envelope header length {n} does not fit a {len(data)}-byte message")
    header = parse_json(data[_PREFIX : _PREFIX + n], "envelope header")
    if not isinstance(header, dict):
        raise PayloadError("envelope header is not a JSON object")
    _check_header_fields(header)
    payload = data[_PREFIX + n :]
    declared = header.get("payload_bytes")
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != len(payload):
        raise PayloadError(f"envelope declares {declared!r} payload bytes but carries {len(payload)}")
    return Envelope(
        type=header["type"],
        sender=header["sender"],
        receiver=header["receiver"],
        run_id=header["run"],
        session=header["session"],
        round=header.get("round"),
        body=header.get("body") or {},
        payload=payload,
        auth=_check_auth(header.get("auth")),
    )


def _check_header_fields(header: dict[str, Any]) -> None:
    kind = header.get("type")
    if kind not in MESSAGE_TYPES:
        raise PayloadError(f"unknown message type {kind!r}; known: {', '.join(MESSAGE_TYPES)}")
    for key in ("sender", "receiver"):
        v = header.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1_000_000:
            raise PayloadError(f"envelope {key} must be a rank in [0, 1000000), got {v!r}")
    for key in ("run", "session"):
        v = header.get(key)
        if not isinstance(v, str) or not _TOKEN.match(v):
            raise PayloadError(f"envelope {key} must be 1-128 characters of [A-Za-z0-9_.:-], got {v!r}")
    rnd = header.get("round")
    if rnd is not None and (not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0):
        raise PayloadError(f"envelope round must be null or an integer >= 0, got {rnd!r}")
    if kind in (TASK, RESULT, FAILURE) and rnd is None:
        raise PayloadError(f"a {kind!r} message needs a round")
    body = header.get("body", {})
    if body is not None and not isinstance(body, dict):
        raise PayloadError(f"envelope body must be a JSON object, got {type(body).__name__}")


def _check_auth(auth: Any) -> dict[str, Any] | None:
    if auth is None:
        return None
    if not isinstance(auth, dict) or set(auth) != {"ctr", "mac"}:
        raise PayloadError("envelope auth must be an object with 'ctr' and 'mac'")
    ctr, mac = auth["ctr"], auth["mac"]
    if not isinstance(ctr, int) or isinstance(ctr, bool) or not 0 <= ctr < 2**63:
        raise PayloadError(f"envelope auth counter must be an integer in [0, 2**63), got {ctr!r:.40}")
    if not isinstance(mac, str) or not re.fullmatch(r"[0-9a-f]{64}", mac):
        raise PayloadError("envelope auth mac must be 64 hex digits")
    return {"ctr": ctr, "mac": mac}


def rank_key(master: bytes, rank: int) -> bytes:
    """The secret key of the channel between the server and client rank ``rank``, from the
    deployment's master key (a client holds only its own)."""
    return hmac.new(master, f"lightning_fedprune rank {int(rank)}".encode(), hashlib.sha256).digest()


def _mac(key: bytes, env: Envelope, ctr: int) -> str:
    fields = {
        "type": env.type, "sender": env.sender, "receiver": env.receiver, "run": env.run_id, "session": env.session,
        "round": env.round, "body": env.body, "payload_bytes": len(env.payload), "ctr": ctr,
    }
    msg = json.dumps(fields, sort_keys=True, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return hmac.new(key, msg + bytes(env.payload), hashlib.sha256).hexdigest()


class Authenticator:
    """Per-client message authentication: an HMAC-SHA256 over every envelope and a counter.

    Every message between the server and client rank ``r`` is sealed with the channel key
    ``rank_key(master, r)`` (:meth:`seal`): ``auth = {"ctr", "mac"}``, the counter strictly
    increasing per sender (nanoseconds since the epoch, bumped when equal). A receiver accepts a
    message only when the MAC over its header fields, counter and payload checks out with the key
    of the rank it claims to come from, and its counter is above the last one accepted from that
    rank (:meth:`check`): forged, altered, impersonated and replayed messages are refused. The
    server holds the master key (it derives every client's key); a client holds only its own key.

    Args:
        rank: this process's rank.
        master: the deployment's master key (the server, or one-machine runs).
        key: this client's own key (``rank_key(master, rank)``), for a client holding nothing more.

    Raises:
        ConfigError: no key, or a client key for the server.
    """

    def __init__(self, rank: int, *, master: bytes | None = None, key: bytes | None = None) -> None:
        from lightning_fedprune.errors import ConfigError

        self.rank = int(rank)
        if master is None and (key is None or self.rank == 0):
            raise ConfigError("the server needs the deployment's master key; a client needs its own key or the master key")
        self._master = master
        self._key = key if key is not None else (rank_key(master, self.rank) if self.rank != 0 and master else None)
        self._last_sent = 0
        self._last_seen: dict[int, int] = {}
        self._lock = threading.Lock()

    def client_key_file(self) -> dict[str, Any]:
        """The key file of this client, holding only its own key (``{"rank": r, "key": hex}``).

        Raises:
            ConfigError: this is the server (rank 0), which has no channel key of its own.
        """
        from lightning_fedprune.errors import ConfigError

        if self._key is None:
            raise ConfigError("rank 0 holds the master key, not a client key")
        return {"rank": self.rank, "key": self._key.hex()}

    def _key_with(self, peer: int) -> bytes | None:
        if self.rank == 0:
            return rank_key(self._master, peer) if self._master is not None and peer != 0 else None
        return self._key if peer == 0 else None

    def seal(self, env: Envelope) -> Envelope:
        """``env`` with its ``auth`` (counter and MAC with the channel key to ``env.receiver``)."""
        peer = env.receiver if self.rank == 0 else 0
        key = self._key_with(peer)
        if key is None:
            raise PayloadError(f"rank {self.rank} holds no key for rank {peer}")
        with self._lock:
            ctr = max(time.time_ns(), self._last_sent + 1)
            self._last_sent = ctr
        return replace(env, auth={"ctr": ctr, "mac": _mac(key, env, ctr)})

    def check(self, env: Envelope) -> str | None:
        """``None`` when ``env`` is authentic and fresh, else the reason it is refused."""
        if env.auth is None:
            return "it carries no authentication (this deployment authenticates every message)"
        key = self._key_with(env.sender)
        if key is None:
            return f"rank {env.sender} has no key on rank {self.rank}"
        if not hmac.compare_digest(_mac(key, env, env.auth["ctr"]), env.auth["mac"]):
            return f"its authentication does not check out for rank {env.sender} (forged, altered or another key)"
        with self._lock:
            if env.auth["ctr"] <= self._last_seen.get(env.sender, -1):
                return f"it replays an earlier message of rank {env.sender} (counter not increasing)"
            self._last_seen[env.sender] = env.auth["ctr"]
        return None
