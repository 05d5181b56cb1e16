"""FedML communication with a safe wire format: the only module that imports FedML.

:class:`FedMLEndpoint` is what the server and client processes talk through. Inside it,
:class:`_Manager` is a :class:`fedml.core.distributed.fedml_comm_manager.FedMLCommManager` with our
own message types (``lfp.hello``, ``lfp.task``, ... see :mod:`.envelope`) whose backend is one of
two communication managers implementing FedML's ``BaseCommunicationManager``:

* :class:`SafeGRPCCommManager`: FedML's GRPC service (``gRPCCommManager.sendMessage`` with its
  ``CommRequest``) carrying our envelope bytes instead of a pickled ``Message``. Unlike FedML's
  own manager it never unpickles, blocks on its queue instead of spinning, reuses one channel per
  peer, waits (with GRPC's reconnect backoff) for a peer that is not up yet, checks sizes, and
  stops its server with a grace period so no RPC hangs.
* :class:`SafeMqttS3CommManager`: FedML's MQTT_S3 manager (paho MQTT through FedML's
  ``MqttManager``, boto3 through FedML's ``S3Storage``): small envelopes travel inside the MQTT
  message (base64), larger ones as one S3 object whose key, size and SHA-256 go in the MQTT
  message. The receiver downloads on its own worker thread (never on paho's network thread),
  checks size and hash, and deletes the object once consumed; at shutdown a process deletes what
  it uploaded that nobody consumed. S3 objects hold envelope bytes, never pickles.

``fedml.init`` is never called: it posts to FedML's cloud and probes its services. The
communication managers need none of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent import futures
from types import SimpleNamespace
from typing import Any

from lightning_fedprune.core.serialization import parse_json
from lightning_fedprune.errors import FedPruneError, PayloadError
from lightning_fedprune.fedml_adapters.credentials import rank_of_common_name
from lightning_fedprune.fedml_adapters.envelope import MESSAGE_TYPES, Envelope, decode_envelope, encode_envelope, fedml_msg_type
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, GrpcAddress, TlsFiles

log = logging.getLogger(__name__)

__all__ = ["FedMLEndpoint", "TransportError", "make_endpoint", "quiet_fedml_environment"]

#: the FedML ``Message`` parameter our envelope bytes travel in
WIRE_KEY = "lfp_wire"
#: the FedML ``Message`` parameter a received, decoded envelope is handed over in
ENVELOPE_KEY = "lfp_envelope"
_WIRE_SIZE_KEY = "lfp_wire_bytes"

OnMessage = Callable[[Envelope, int], None]
OnReject = Callable[[str], None]


class TransportError(FedPruneError, RuntimeError):
    """A message could not be delivered (peer down past the timeout, broker or store unreachable)."""


def quiet_fedml_environment() -> None:
    """Environment settings that keep FedML's dependencies offline and quiet (before importing them).

    wandb stays disabled and offline, boto3 never asks the EC2 metadata service for credentials or
    a region, GRPC ignores HTTP proxies for our peers.
    """
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    # version notices FedML's pinned dependencies print at import; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*doesn't match a supported version.*")
    for noisy in ("requests", "urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = logging.getLogger()
    if not any(isinstance(f, _FedMLChatter) for f in root.filters):
        root.addFilter(_FedMLChatter())


class _FedMLChatter(logging.Filter):
    """Drops FedML's own info lines (it logs every message on the root logger); warnings pass."""

    _marker = os.sep + "fedml" + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self._marker not in record.pathname


# ============================================================================ GRPC


#: what a GRPC request adds to the envelope it carries (protobuf field tags and lengths, client id)
_GRPC_FRAMING_BYTES = 64
#: worker threads of a GRPC server: at most this many received messages are held and decoded at once
GRPC_SERVER_WORKERS = 4
#: RPCs a GRPC server takes at once (the others are refused at once and their senders retry)
GRPC_MAX_CONCURRENT_RPCS = 2 * GRPC_SERVER_WORKERS
_BUSY = "Concurrent RPC limit exceeded"
#: a send waiting for its peer's connection looks again at its channel this often (seconds)
_CONNECT_STEP_S = 0.2


def _grpc_limit(max_message_bytes: int) -> int:
    # GRPC itself refuses larger requests (RESOURCE_EXHAUSTED) before a byte of them is decoded
    return min(int(max_message_bytes) + _GRPC_FRAMING_BYTES, 2**31 - 1)


def release_memory() -> bool:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; False where there is none).

    glibc keeps freed buffers in its per-thread arenas, so without it a process that received a
    few large messages on GRPC's worker threads stays near its peak size.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None
_release_lock = threading.Lock()
_release_timer: threading.Timer | None = None


def release_memory_soon(delay_s: float = 0.2) -> None:
    """:func:`release_memory` once, ``delay_s`` from now (after GRPC freed its buffers of the call).

    Calls while one is pending are folded into it.
    """
    global _release_timer

    def run() -> None:
        global _release_timer
        with _release_lock:
            _release_timer = None
        release_memory()

    with _release_lock:
        if _release_timer is not None:
            return
        _release_timer = threading.Timer(delay_s, run)
        _release_timer.daemon = True
        _release_timer.start()


#: messages at least this large are followed by :func:`release_memory`
RELEASE_AFTER_BYTES = 1024 * 1024


def _make_grpc_comm_manager_class() -> type:
    import grpc
    from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager
    from fedml.core.distributed.communication.constants import CommunicationConstants
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc
    from fedml.core.distributed.communication.message import Message

    def _service(owner: SafeGRPCCommManager) -> Any:
        """FedML's GRPC service ``gRPCCommManager``, receiving envelope bytes (never unpickled).

        ``sendMessage`` is registered as client-streaming (the same bytes on the wire as FedML's
        unary call): the handler runs when the call starts, so a request GRPC refuses (larger
        than the limit) is still seen, logged and counted here.
        """

        def send_message(requests: Any, context: Any) -> Any:
            peer = context.peer()
            got = size = 0
            try:
                for request in requests:
                    got += 1
                    size = len(request.message)
                    owner._received(bytes(request.message), int(request.client_id), peer, context.auth_context())
                    del request
            except grpc.RpcError:
                pass  # refused by GRPC itself (logged below) or the sender went away
            except Exception as err:  # noqa: BLE001 (whatever a request causes, the server goes on)
                owner._refused(f"refused a GRPC message from {peer}: {type(err).__name__}: {err}")
                got = max(got, 1)
            if got == 0:
                owner._refused(
                    f"refused a GRPC message from {peer}: GRPC ended the call before a whole message arrived "
                    f"(larger than the limit of {owner.max_message_bytes} bytes, or the sender went away)"
                )
            if size >= RELEASE_AFTER_BYTES or got == 0:
                release_memory_soon()
            return grpc_comm_manager_pb2.CommResponse()

        def ignored(request: Any, context: Any) -> Any:
            return grpc_comm_manager_pb2.CommResponse()

        codec = {
            "request_deserializer": grpc_comm_manager_pb2.CommRequest.FromString,
            "response_serializer": grpc_comm_manager_pb2.CommResponse.SerializeToString,
        }
        return grpc.method_handlers_generic_handler(
            "gRPCCommManager",
            {
                "sendMessage": grpc.stream_unary_rpc_method_handler(send_message, **codec),
                "handleReceiveMessage": grpc.unary_unary_rpc_method_handler(ignored, **codec),
            },
        )

    class SafeGRPCCommManager(BaseCommunicationManager):
        """FedML's GRPC transport with envelope bytes on the wire (see the module docstring).

        Args:
            rank: this process's rank.
            addresses: rank -> address of every process (this one's ``bind_host``/``port`` is
                where it listens).
            max_message_bytes: larger messages are refused and logged.
            on_reject: called with the reason of every refused message.
            tls: this process's TLS files: its server and its channels use TLS with the
                deployment's CA; with ``tls.mutual`` its server requires a client certificate and
                refuses requests whose claimed rank is not the certificate's. ``None``: plaintext.
        """

        def __init__(
            self,
            *,
            rank: int,
            addresses: dict[int, GrpcAddress],
            max_message_bytes: int,
            on_reject: OnReject,
            tls: TlsFiles | None = None,
        ) -> None:
            self.rank = int(rank)
            self.tls = tls
            self.addresses = dict(addresses)
            self.max_message_bytes = int(max_message_bytes)
            self.on_reject = on_reject
            self._observers: list[Any] = []
            self._inbox: queue.Queue[tuple[Envelope, int] | None] = queue.Queue()
            # rank -> (channel, stub, when it was made); ranks whose channel is known connected;
            # when each rank was last heard from (see _peer)
            self._channels: dict[int, tuple[Any, Any, float]] = {}
            self._connected: set[int] = set()
            self._heard_at: dict[int, float] = {}
            self._lock = threading.Lock()
            self._stopped = threading.Event()
            limit = _grpc_limit(self.max_message_bytes)
            self.opts = [
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.enable_http_proxy", 0),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            me = self.addresses[self.rank]
            # no SO_REUSEPORT (gRPC's default): another process must not bind this live port and take its connections
            server_opts = [*self.opts, ("grpc.so_reuseport", 0)]
            self.server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=GRPC_SERVER_WORKERS, thread_name_prefix="lfp-grpc"),
                options=server_opts,
                maximum_concurrent_rpcs=GRPC_MAX_CONCURRENT_RPCS,
            )
            self.server.add_generic_rpc_handlers((_service(self),))
            target = f"{me.bind_host}:{me.port}"
            try:
                if tls is None:
                    bound = self.server.add_insecure_port(target)
                else:
                    creds = grpc.ssl_server_credentials(
                        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=tls.mutual
                    )
                    bound = self.server.add_secure_port(target, creds)
            except RuntimeError as err:  # grpcio raises when the port is taken
                raise TransportError(f"rank {self.rank} cannot listen on {target}: {err} (port in use?)") from None
            if not bound:
                raise TransportError(f"rank {self.rank} cannot listen on {target} (port in use?)")
            self.server.start()
            log.info("rank %d listening on %s (GRPC%s)", self.rank, target, "" if tls is None else ", TLS")

        # ---------------------------------------------------------- receiving
        def _received(self, data: bytes, claimed: int, peer: str, auth_context: Any = None) -> None:
            try:
                if self.tls is not None and self.tls.mutual:
                    names = [bytes(n).decode("ascii", "replace") for n in (auth_context or {}).get("x509_common_name") or []]
                    if {rank_of_common_name(n) for n in names} != {claimed}:
                        raise PayloadError(f"the request claims rank {claimed} but the peer's certificate names {names}")
                env = decode_envelope(data, max_bytes=self.max_message_bytes)
                if env.sender != claimed:
                    raise PayloadError(f"GRPC request says client_id={claimed} but the envelope says sender={env.sender}")
            except PayloadError as err:
                self._refused(f"refused a {len(data)}-byte GRPC message from {peer}: {err}")
                return
            with self._lock:
                self._heard_at[claimed] = time.monotonic()
            self._inbox.put((env, len(data)))

        def _refused(self, reason: str) -> None:
            log.warning("%s", reason)
            self.on_reject(reason)

        def handle_receive_message(self) -> None:
            """Deliver received envelopes to the observers until stopped (blocks; no polling)."""
            ready = Message()
            ready.sender_id = ready.receiver_id = self.rank
            for observer in self._observers:
                observer.receive_message(CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY, ready)
            while True:
                item = self._inbox.get()
                if item is None:
                    return
                env, nbytes = item
                msg = Message(fedml_msg_type(env.type), env.sender, env.receiver)
                msg.add_params(ENVELOPE_KEY, env)
                msg.add_params(_WIRE_SIZE_KEY, nbytes)
                for observer in self._observers:
                    observer.receive_message(msg.get_type(), msg)

        def stop_receive_message(self) -> None:
            if self._stopped.is_set():
                return
            self._stopped.set()
            # grace: RPCs in flight complete (or are cancelled after 1 s); nothing hangs
            self.server.stop(grace=1.0).wait(5.0)
            with self._lock:
                for channel, _, _ in self._channels.values():
                    channel.close()
                self._channels.clear()
                self._connected.clear()
            self._inbox.put(None)

        # ---------------------------------------------------------- sending
        def _peer(self, receiver: int) -> tuple[Any, Any]:
            """The channel and stub to ``receiver``.

            A channel that is not known to be connected is replaced by a fresh one when
            ``receiver`` has spoken since it was made: the peer is up now, and the old channel may
            be waiting out a reconnect backoff (GRPC's, up to ``grpc.max_reconnect_backoff_ms``
            plus 20% jitter) from before the peer's process listened. The old channel is released
            once no call uses it.
            """
            with self._lock:
                known = self._channels.get(receiver)
                if known is not None and receiver not in self._connected and self._heard_at.get(receiver, -math.inf) > known[2]:
                    log.debug("rank %d spoke since its channel was made: connecting anew", receiver)
                    known = None
                if known is None:
                    addr = self.addresses.get(receiver)
                    if addr is None:
                        raise TransportError(f"no GRPC address for rank {receiver}")
                    target = f"{addr.host}:{addr.port}"
                    if self.tls is None:
                        channel = grpc.insecure_channel(target, options=self.opts)
                    else:
                        creds = grpc.ssl_channel_credentials(
                            root_certificates=self.tls.ca, private_key=self.tls.key, certificate_chain=self.tls.cert
                        )
                        channel = grpc.secure_channel(target, creds, options=self.opts)
                    known = (channel, grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel), time.monotonic())
                    self._channels[receiver] = known
                return known[0], known[1]

        def _mark(self, receiver: int, channel: Any, connected: bool) -> None:
            with self._lock:
                current = self._channels.get(receiver)
                if current is None or current[0] is not channel:
                    return
                if connected:
                    self._connected.add(receiver)
                else:
                    self._connected.discard(receiver)

        def send_message(self, msg: Any, wait_s: float = 0.0, timeout_s: float = 60.0) -> int:
            """Send the envelope bytes of ``msg``; wait up to ``wait_s`` for the peer to come up.

            A peer that cannot be connected to fails the send after ``wait_s`` (at once when 0);
            once connected, the transfer itself may take up to ``timeout_s``. A peer busy with
            other calls (GRPC's concurrent-call limit) is tried again until ``timeout_s``.

            The wait is for the connection alone (not for the peer to answer a call, which a busy
            peer may take long to do), in short steps, so a channel replaced meanwhile (the peer
            spoke: :meth:`_peer`) is used at once.

            Returns:
                The bytes put on the wire (the protobuf request).

            Raises:
                TransportError: the peer was not reachable or the call failed.
            """
            data = msg.get(WIRE_KEY)
            receiver = int(msg.get_receiver_id())
            request = grpc_comm_manager_pb2.CommRequest(client_id=self.rank, message=data)
            start = time.monotonic()
            reach_by = start + max(0.0, float(wait_s))
            give_up = start + max(float(timeout_s), float(wait_s))
            while True:
                if self._stopped.is_set():
                    raise TransportError(f"GRPC send to rank {receiver} failed: this process's transport is stopped")
                channel, stub = self._peer(receiver)
                if wait_s > 0 and receiver not in self._connected:
                    left = reach_by - time.monotonic()
                    if left <= 0:
                        raise TransportError(f"GRPC send to rank {receiver} failed: rank {receiver} is not reachable (waited {wait_s:g} s)")
                    ready = grpc.channel_ready_future(channel)
                    try:
                        ready.result(timeout=min(_CONNECT_STEP_S, left))
                    except grpc.FutureTimeoutError:
                        ready.cancel()
                        continue
                    self._mark(receiver, channel, True)
                try:
                    stub.sendMessage(request, timeout=float(timeout_s), wait_for_ready=False)
                    self._mark(receiver, channel, True)
                    return int(request.ByteSize())
                except grpc.RpcError as err:
                    code = err.code() if hasattr(err, "code") else None
                    detail = err.details() if hasattr(err, "details") else str(err)
                    now = time.monotonic()
                    if code == grpc.StatusCode.UNAVAILABLE:
                        self._mark(receiver, channel, False)
                    unreachable = code == grpc.StatusCode.UNAVAILABLE and now < reach_by
                    busy = code == grpc.StatusCode.RESOURCE_EXHAUSTED and _BUSY in str(detail) and now < give_up
                    if self._stopped.is_set() or not (unreachable or busy):
                        raise TransportError(f"GRPC send to rank {receiver} failed: {code}: {detail}") from None
                    time.sleep(0.2 if busy else 0.05)

        def add_observer(self, observer: Any) -> None:
            self._observers.append(observer)

        def remove_observer(self, observer: Any) -> None:
            self._observers.remove(observer)

    return SafeGRPCCommManager


# ============================================================================ MQTT_S3


#: FedML's MQTT_S3 manager builds its ``MqttManager`` by the module-global name; while one of ours
#: is constructed that name is our subclass (:func:`_mqtt_manager_class`; one construction at a time)
_MQTT_BUILD_LOCK = threading.Lock()


def _mqtt_manager_class(tls: TlsFiles | None) -> type:
    """FedML's ``MqttManager`` whose paho client does all its socket I/O on its network thread and,
    with ``tls``, connects over TLS with this process's certificate (also after FedML's
    ``reconnect``, which rebuilds the paho client).

    FedML runs paho's ``loop_forever`` on a thread paho does not know about, so a publish from
    another thread would write to the socket directly while the loop reads it: harmless-looking
    on plaintext, corrupted records under TLS. A (no-op) socket-write hook makes paho queue every
    outgoing packet for its network thread instead.
    """
    import ssl

    from fedml.core.distributed.communication.mqtt.mqtt_manager import MqttManager

    class SafeMqttManager(MqttManager):
        def init_connect(self) -> None:
            super().init_connect()
            self._client.on_socket_register_write = lambda client, userdata, sock: None
            if tls is not None:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_path))
                context.load_cert_chain(str(tls.cert_path), str(tls.key_path))
                self._client.tls_set_context(context)

    return SafeMqttManager


def _make_mqtt_s3_comm_manager_class() -> type:
    from fedml.core.distributed.communication.constants import CommunicationConstants
    from fedml.core.distributed.communication.message import Message
    from fedml.core.distributed.communication.mqtt_s3 import mqtt_s3_multi_clients_comm_manager as fedml_mqtt_s3
    from fedml.core.distributed.communication.mqtt_s3.mqtt_s3_multi_clients_comm_manager import (
        MqttS3MultiClientsCommManager,
    )

    class SafeMqttS3CommManager(MqttS3MultiClientsCommManager):
        """FedML's MQTT_S3 transport with envelope bytes instead of pickles (see the module docstring).

        Topics follow FedML's: the server publishes to ``fedml_<run>_0_<rank>`` and subscribes to
        ``fedml_<run>_<rank>`` of every client rank; a client the other way round.

        Args:
            mqtt_config / s3_config: FedML's ``customized_training_*_config`` mappings.
            run_id: the run id (topics, object keys).
            rank: this process's rank; ``worker_num``: client ranks 1..worker_num.
            max_message_bytes / inline_bytes / send_timeout_s: see :class:`CommArgs`.
            on_reject: called with the reason of every refused message.
            tls: this process's TLS files: the broker connection uses TLS with this process's
                certificate (the broker takes its common name as the user name), and an
                ``https`` store is verified against the deployment's CA. ``None``: plaintext.
        """

        def __init__(
            self,
            *,
            mqtt_config: dict[str, Any],
            s3_config: dict[str, Any],
            run_id: str,
            rank: int,
            worker_num: int,
            max_message_bytes: int,
            inline_bytes: int,
            on_reject: OnReject,
            tls: TlsFiles | None = None,
        ) -> None:
            ids = list(range(1, worker_num + 1)) if rank == 0 else [rank]
            args = SimpleNamespace(client_id_list=json.dumps(ids), rank=rank, run_id=run_id, server_id=0)
            if rank != 0:
                args.client_id = rank
            self.max_message_bytes = int(max_message_bytes)
            self.inline_bytes = int(inline_bytes)
            self.on_reject = on_reject
            self.run_id = run_id
            self._fetch_q: queue.Queue[tuple[dict[str, Any], str] | None] = queue.Queue()
            self._uploaded: set[str] = set()
            self._up_lock = threading.Lock()
            self.objects_put = 0  # objects this process uploaded
            self.objects_consumed = 0  # objects it read and deleted
            self.cleanup_deletes = 0  # deletes of its own uploads at shutdown (no-ops when consumed)
            mqtt = {"MQTT_USER": None, "MQTT_PWD": None, "MQTT_KEEPALIVE": 30, **mqtt_config}
            with _MQTT_BUILD_LOCK:
                plain = fedml_mqtt_s3.MqttManager
                fedml_mqtt_s3.MqttManager = _mqtt_manager_class(tls)
                try:
                    super().__init__(mqtt, dict(s3_config), topic=run_id, client_rank=rank, client_num=worker_num, args=args)
                finally:
                    fedml_mqtt_s3.MqttManager = plain
            self.bucket = self.s3_storage.bucket_name
            self.s3 = self.s3_storage.aws_s3_client
            endpoint = str(s3_config.get("CN_S3_ENDPOINT") or "")
            if tls is not None and endpoint.startswith("https://"):
                self.s3 = _s3_client(s3_config, verify=str(tls.ca_path))
            if self.s3 is None:
                raise TransportError("the S3 client could not be created from comm_args.customized_training_s3_config")
            self._fetcher = threading.Thread(target=self._fetch_loop, name="lfp-s3-fetch", daemon=True)
            self._fetcher.start()

        # ---------------------------------------------------------- receiving
        def _on_message_impl(self, msg: Any) -> None:
            # paho's network thread: parse and hand over, never block here
            try:
                if len(msg.payload) > 4 * self.inline_bytes + 4096:
                    raise PayloadError(f"MQTT message of {len(msg.payload)} bytes is larger than any descriptor")
                obj = parse_json(bytes(msg.payload), "MQTT message")
                if not isinstance(obj, dict):
                    raise PayloadError("MQTT message is not a JSON object")
            except PayloadError as err:
                self._reject(f"refused an MQTT message on {msg.topic}: {err}")
                return
            self._fetch_q.put((obj, str(msg.topic)))

        def _fetch_loop(self) -> None:
            while True:
                item = self._fetch_q.get()
                if item is None:
                    return
                obj, topic = item
                try:
                    data = self._payload_of(obj)
                    env = decode_envelope(data, max_bytes=self.max_message_bytes)
                    if obj.get(Message.MSG_ARG_KEY_SENDER) != env.sender:
                        raise PayloadError(f"MQTT message says sender={obj.get(Message.MSG_ARG_KEY_SENDER)!r}, the envelope {env.sender}")
                except (PayloadError, TransportError) as err:
                    self._reject(f"refused a message on {topic}: {err}")
                    if isinstance(obj.get("lfp_size"), int) and obj["lfp_size"] >= RELEASE_AFTER_BYTES:
                        release_memory_soon()
                    continue
                msg = Message(fedml_msg_type(env.type), env.sender, env.receiver)
                msg.add_params(ENVELOPE_KEY, env)
                msg.add_params(_WIRE_SIZE_KEY, len(data))
                for observer in self._observers:
                    observer.receive_message(msg.get_type(), msg)

        def _payload_of(self, obj: dict[str, Any]) -> bytes:
            if "lfp_inline" in obj:
                raw = obj["lfp_inline"]
                if not isinstance(raw, str):
                    raise PayloadError("lfp_inline is not a string")
                try:
                    return base64.b64decode(raw.encode("ascii"), validate=True)
                except (ValueError, UnicodeEncodeError) as err:
                    raise PayloadError(f"lfp_inline is not base64: {err}") from None
            key, size, digest = obj.get("lfp_key"), obj.get("lfp_size"), obj.get("lfp_sha256")
            if not isinstance(key, str) or not key.startswith(f"{self.run_id}/") or ".." in key:
                raise PayloadError(f"object key {key!r} is not one of this run's")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= self.max_message_bytes:
                raise PayloadError(f"object of {size!r} bytes exceeds the limit of {self.max_message_bytes} bytes")
            if not isinstance(digest, str) or len(digest) != 64:
                raise PayloadError("the message lacks the object's SHA-256")
            try:
                head = self.s3.head_object(Bucket=self.bucket, Key=key)
                if int(head.get("ContentLength", -1)) != size:
                    raise PayloadError(f"object {key} holds {head.get('ContentLength')} bytes, the message says {size}")
                data = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read(size + 1)
            except PayloadError:
                raise
            except Exception as err:  # botocore's ClientError and connection errors
                raise TransportError(f"cannot read object {key}: {err}") from None
            finally:
                if self._delete(key):
                    self.objects_consumed += 1
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise PayloadError(f"object {key} does not match its size/SHA-256")
            return data

        def _delete(self, key: str) -> bool:
            try:
                self.s3.delete_object(Bucket=self.bucket, Key=key)
                return True
            except Exception as err:  # never let cleanup break receiving
                log.warning("could not delete object %s: %s", key, err)
                return False

        def _reject(self, reason: str) -> None:
            log.warning("%s", reason)
            self.on_reject(reason)

        # ---------------------------------------------------------- sending
        def send_message(self, msg: Any, wait_s: float = 0.0, timeout_s: float = 60.0) -> int:  # type: ignore[override]
            data = msg.get(WIRE_KEY)
            receiver = int(msg.get_receiver_id())
            if self.args.rank == 0:
                topic = f"{self._topic}{self.server_id}_{receiver}"
            else:
                topic = f"{self._topic}{msg.get_sender_id()}"
            head = {
                Message.MSG_ARG_KEY_TYPE: msg.get_type(),
                Message.MSG_ARG_KEY_SENDER: int(msg.get_sender_id()),
                Message.MSG_ARG_KEY_RECEIVER: receiver,
            }
            if len(data) <= self.inline_bytes:
                head["lfp_inline"] = base64.b64encode(data).decode("ascii")
                wire = len(data)
            else:
                key = f"{self.run_id}/{topic}/{uuid.uuid4().hex}"
                try:
                    self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
                except Exception as err:
                    raise TransportError(f"cannot upload {len(data)} bytes to the object store: {err}") from None
                with self._up_lock:
                    self._uploaded.add(key)
                self.objects_put += 1
                head.update(lfp_key=key, lfp_size=len(data), lfp_sha256=hashlib.sha256(data).hexdigest())
                wire = len(data)
            text = json.dumps(head)
            try:
                # FedML's MqttManager publishes retained and returns before the broker has the
                # message; publish plainly and wait for QoS 2 to complete, so a send that returned
                # is at the broker (and a close right after it loses nothing)
                info = self.mqtt_mgr._client.publish(topic, payload=text, qos=2, retain=False)
                info.wait_for_publish(timeout=timeout_s)
            except Exception as err:
                raise TransportError(f"MQTT publish to {topic} failed: {err}") from None
            if not info.is_published():
                raise TransportError(f"MQTT publish to {topic} was not acknowledged within {timeout_s:g} s")
            return wire + len(text)

        def stop_receive_message(self) -> None:
            try:
                super().stop_receive_message()
            finally:
                self._fetch_q.put(None)
                with self._up_lock:
                    keys, self._uploaded = sorted(self._uploaded), set()
                # S3 deletes are idempotent: objects a peer consumed are already gone
                for key in keys:
                    self.cleanup_deletes += int(self._delete(key))

        def _notify_connection_ready(self) -> None:
            ready = Message()
            for observer in self._observers:
                observer.receive_message(CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY, ready)

    return SafeMqttS3CommManager


def _s3_client(s3_config: dict[str, Any], *, verify: str) -> Any:
    """A boto3 S3 client for FedML's ``customized_training_s3_config`` that verifies the store's
    certificate against ``verify`` (a CA file)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=s3_config["CN_S3_ENDPOINT"], aws_access_key_id=s3_config["CN_S3_AKI"],
        aws_secret_access_key=s3_config["CN_S3_SAK"], region_name=s3_config.get("CN_REGION_NAME"),
        config=Config(signature_version="s3v4"), verify=verify,
    )


# ============================================================================ the FedMLCommManager


def _make_manager_class() -> type:
    from fedml.core.distributed.communication.constants import CommunicationConstants
    from fedml.core.distributed.fedml_comm_manager import FedMLCommManager

    class _Manager(FedMLCommManager):
        """FedML's communication manager with our message types and a safe backend."""

        def __init__(self, endpoint: FedMLEndpoint) -> None:
            self._endpoint = endpoint
            cfg = endpoint.cfg
            args = SimpleNamespace(run_id=cfg.run_id, rank=endpoint.rank, backend=cfg.comm_args.backend)
            super().__init__(args, comm=None, rank=endpoint.rank, size=cfg.worker_num + 1, backend=cfg.comm_args.backend)

        def _init_manager(self) -> None:
            ep, cfg = self._endpoint, self._endpoint.cfg
            c = cfg.comm_args
            if self.backend == "GRPC":
                cls = _make_grpc_comm_manager_class()
                self.com_manager = cls(
                    rank=self.rank, addresses=cfg.grpc_addresses(), max_message_bytes=c.message_limit,
                    on_reject=ep._rejected, tls=ep.tls,
                )
            elif self.backend == "MQTT_S3":
                cls = _make_mqtt_s3_comm_manager_class()
                self.com_manager = _retry(
                    lambda: cls(
                        mqtt_config=dict(c.customized_training_mqtt_config),
                        s3_config=dict(c.customized_training_s3_config),
                        run_id=cfg.run_id,
                        rank=self.rank,
                        worker_num=cfg.worker_num,
                        max_message_bytes=c.message_limit,
                        inline_bytes=c.mqtt_inline_bytes,
                        on_reject=ep._rejected,
                        tls=ep.tls,
                    ),
                    what=f"the MQTT broker at {c.customized_training_mqtt_config.get('BROKER_HOST')}:"
                    f"{c.customized_training_mqtt_config.get('BROKER_PORT')}",
                    timeout_s=c.connect_timeout_s,
                )
            else:  # settings validated it
                raise TransportError(f"unsupported backend {self.backend!r}")
            self.com_manager.add_observer(self)

        def register_message_receive_handlers(self) -> None:
            for kind in MESSAGE_TYPES:
                self.register_message_receive_handler(fedml_msg_type(kind), self._deliver)

        def receive_message(self, msg_type: Any, msg_params: Any) -> None:
            # FedML's version logs every message and raises on unknown types
            if msg_type == CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY:
                self._endpoint._connected.set()
                return
            handler = self.message_handler_dict.get(msg_type)
            if handler is None:
                self._endpoint._rejected(f"dropped a message of unknown type {msg_type!r}")
                return
            handler(msg_params)

        def _deliver(self, msg: Any) -> None:
            env = msg.get(ENVELOPE_KEY)
            nbytes = int(msg.get(_WIRE_SIZE_KEY) or 0)
            try:
                self._endpoint._on_message(env, nbytes)
            except Exception:  # a handler bug must not kill the receive loop
                log.exception("handling a %s message from rank %d failed", env.type, env.sender)

    return _Manager


def _retry(make: Callable[[], Any], *, what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            return make()
        except (ConnectionError, OSError) as err:
            if time.monotonic() >= deadline:
                raise TransportError(f"cannot reach {what} after {timeout_s:g} s: {err}") from None
            log.info("waiting for %s (%s)", what, err)
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)


class FedMLEndpoint:
    """One process's end of the deployment's communication (server: rank 0, clients: 1..N).

    Args:
        cfg: the deployment config (backend, addresses, limits).
        rank: this process's rank.

    Use::

        ep = FedMLEndpoint(cfg, rank)
        ep.start(on_message)            # on_message(envelope, wire_bytes) runs on a transport thread
        wire = ep.send(envelope)        # blocking; raises TransportError
        ep.close()

    Attributes:
        stats: counters (messages and bytes sent/received, refused messages, S3 objects).
    """

    def __init__(self, cfg: DeploymentConfig, rank: int) -> None:
        quiet_fedml_environment()
        self.cfg = cfg
        self.rank = int(rank)
        self._on_message_cb: OnMessage | None = None
        self._on_reject_cb: OnReject | None = None
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats_lock = threading.Lock()
        self.stats: dict[str, int] = {"sent": 0, "received": 0, "wire_bytes_sent": 0, "wire_bytes_received": 0, "refused": 0}
        self._auth, self.tls = cfg.require_security(self.rank)
        self._manager = _make_manager_class()(self)

    def start(self, on_message: OnMessage, on_reject: OnReject | None = None) -> None:
        """Start receiving; ``on_message(envelope, wire_bytes)`` is called for every valid envelope."""
        self._on_message_cb = on_message
        self._on_reject_cb = on_reject
        self._thread = threading.Thread(target=self._manager.run, name=f"lfp-recv-{self.rank}", daemon=True)
        self._thread.start()
        if not self._connected.wait(self.cfg.comm_args.connect_timeout_s):
            raise TransportError(f"rank {self.rank}: the {self.cfg.comm_args.backend} transport did not become ready")

    def send(self, env: Envelope, *, wait_s: float = 0.0) -> int:
        """Send one envelope; wait up to ``wait_s`` for a peer that is not up yet (GRPC).

        Returns:
            Bytes put on the transport for it.

        Raises:
            TransportError: it could not be delivered.
        """
        from fedml.core.distributed.communication.message import Message

        if self._closed:
            raise TransportError("the endpoint is closed")
        msg = Message(fedml_msg_type(env.type), env.sender, env.receiver)
        if self._auth is not None:
            env = self._auth.seal(env)
        msg.add_params(WIRE_KEY, encode_envelope(env))
        wire = self._manager.com_manager.send_message(msg, wait_s=wait_s, timeout_s=self.cfg.comm_args.send_timeout_s)
        with self._stats_lock:
            self.stats["sent"] += 1
            self.stats["wire_bytes_sent"] += int(wire)
        return int(wire)

    def close(self) -> None:
        """Stop receiving and release sockets (in-flight RPCs get a one-second grace)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.finish()
        finally:
            if self._thread is not None:
                self._thread.join(timeout=10.0)
        com = self._manager.com_manager
        for key in ("objects_put", "objects_consumed", "cleanup_deletes"):
            if hasattr(com, key):
                self.stats[key] = int(getattr(com, key))

    # ---------------------------------------------------------- from the transport threads
    def _on_message(self, env: Envelope, nbytes: int) -> None:
        if self._auth is not None:
            reason = self._auth.check(env)
            if reason is not None:
                reason = f"rank {self.rank} refused a {env.type!r} message claiming rank {env.sender}: {reason}"
                log.warning("%s", reason)
                self._rejected(reason)
                return
        with self._stats_lock:
            self.stats["received"] += 1
            self.stats["wire_bytes_received"] += nbytes
        if self._on_message_cb is not None:
            self._on_message_cb(env, nbytes)

    def _rejected(self, reason: str) -> None:
        with self._stats_lock:
            self.stats["refused"] += 1
        if self._on_reject_cb is not None:
            self._on_reject_cb(reason)


def make_endpoint(cfg: DeploymentConfig, rank: int) -> FedMLEndpoint:
    """The FedML endpoint of ``rank`` for ``cfg`` (imports FedML: 5-30 s the first time)."""
    return FedMLEndpoint(cfg, rank)
