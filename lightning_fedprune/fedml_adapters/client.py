"""A client process of a FedML deployment: the simulator's ClientRuntime behind a real endpoint.

The process of rank ``r`` serves the clients ``cfg.clients_of_rank(r)``. It says hello until the
server answers (so it may start before the server), trains every task it gets with the same
:class:`~lightning_fedprune.runtime.ClientRuntime` the simulator uses (all of a round's tasks of
this process in one ``Trainer.fit``), sends each result or failure back, and exits on ``finish``.

Client state that persists across rounds (SCAFFOLD's control variate, personalized layers) lives in
a :class:`~lightning_fedprune.core.ClientStore` spilled to ``<run_dir>/clients/rank_<r>/state``, so
a restarted process keeps it. Before a round's training the states it is about to change are
saved; if the same round is asked again (the server restarted mid-round), they are restored first,
so the retried round starts from the same state as the first try. After every round the trained
model of each client is written to ``<run_dir>/clients/rank_<r>/models/client_<id>.safetensors``
(communicated tensors in their trained shapes + the client's local tensors), which
:mod:`.serving` loads.

Training runs on the main thread; transport threads only hand messages over.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from pathlib import Path
from typing import Any

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import ClientFailure, decode_task, encode_result
from lightning_fedprune.core.serialization import load_state, save_state
from lightning_fedprune.errors import PayloadError
from lightning_fedprune.fedml_adapters.envelope import FAILURE, FINISH, HELLO, READY, RESULT, TASK, Envelope
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

log = logging.getLogger(__name__)

__all__ = ["FedMLClient", "client_dir", "model_path"]

_SNAPSHOT = "before_round.safetensors"


def client_dir(cfg: DeploymentConfig, rank: int) -> Path:
    """The folder of the process of ``rank``: its state, trained models and snapshot."""
    return cfg.run_dir / "clients" / f"rank_{int(rank)}"


def model_path(cfg: DeploymentConfig, client_id: int) -> Path:
    """Where the trained model of ``client_id`` is written (see the module docstring)."""
    return client_dir(cfg, cfg.rank_of_client(client_id)) / "models" / f"client_{int(client_id)}.safetensors"


class FedMLClient:
    """The client process of ``rank`` (1..``worker_num``).

    Args:
        cfg: the deployment config.
        rank: this process's rank.
        endpoint: the transport (default: the FedML endpoint of ``rank``).
        runtime: the client runtime (default: built from the recipe, see
            :func:`~lightning_fedprune.fedml_adapters.components.build_client_runtime`).

    Attributes:
        rounds_trained: rounds in which this process trained at least one task.
    """

    def __init__(self, cfg: DeploymentConfig, rank: int, *, endpoint: Any = None, runtime: Any = None) -> None:
        from lightning_fedprune.fedml_adapters.components import build_client_runtime, dataset_info

        cfg.require_services()
        self.cfg = cfg
        self.rank = int(rank)
        self.clients = cfg.clients_of_rank(self.rank)
        self.dir = client_dir(cfg, self.rank)
        self.runtime = runtime if runtime is not None else build_client_runtime(cfg, self.rank)
        self.store = ClientStore(spill_dir=self.dir / "state")
        self.info = dataset_info(cfg, self.runtime)
        self.session = uuid.uuid4().hex[:16]
        self.server_session: str | None = None
        self.rounds_trained = 0
        self._endpoint = endpoint
        self._events: queue.Queue[tuple[Envelope, int]] = queue.Queue()
        self._batch: dict[int, Any] = {}
        self._batch_key: tuple[str, int] | None = None

    # ------------------------------------------------------------------ public
    def run(self) -> int:
        """Serve tasks until the server says ``finish``.

        Returns:
            The number of rounds this process trained in.

        Raises:
            TransportError: the transport could not start, or ``device_args.max_idle_s`` passed
                without a word from a server.
        """
        if self._endpoint is None:
            from lightning_fedprune.fedml_adapters.transport import make_endpoint

            self._endpoint = make_endpoint(self.cfg, self.rank)
        c = self.cfg.comm_args
        try:
            self._endpoint.start(self._on_message)
            log.info("rank %d (clients %s) up; saying hello to the server", self.rank, self.clients)
            joined = False
            last_hello = -1e9
            last_heard = time.monotonic()
            idle = self.cfg.device_args.max_idle_s
            while True:
                now = time.monotonic()
                if not joined and now - last_hello >= c.hello_interval_s:
                    self._hello()
                    last_hello = now
                timeout = c.hello_interval_s if not joined or self._batch else (idle if idle is not None else None)
                try:
                    env, _ = self._events.get(timeout=timeout)
                except queue.Empty:
                    if self._batch:  # the rest of this round's tasks did not come: train what came
                        self._flush_batch()
                        continue
                    if idle is not None and time.monotonic() - last_heard >= idle:
                        from lightning_fedprune.fedml_adapters.transport import TransportError

                        raise TransportError(
                            f"rank {self.rank}: no word from a server for {idle:g} s (device_args.max_idle_s); giving up"
                        ) from None
                    continue
                last_heard = time.monotonic()
                reason = self._check(env)
                if reason is not None:
                    log.warning("rank %d dropped a %s message from rank %d: %s", self.rank, env.type, env.sender, reason)
                    continue
                if env.session != self.server_session and env.type in (READY, TASK):
                    if self.server_session is not None:
                        log.info("rank %d: the server restarted (a new session)", self.rank)
                    self.server_session = env.session
                    joined = False
                if env.type == READY and not env.body.get("reply"):
                    # a (re)started server announces itself: introduce ourselves
                    joined = False
                    last_hello = -1e9
                elif env.type in (READY, TASK):
                    if not joined:
                        log.info("rank %d joined the run", self.rank)
                    joined = True
                    if env.type == TASK:
                        self._take_task(env)
                elif env.type == FINISH:
                    log.info("rank %d: the server finished the run; trained in %d round(s)", self.rank, self.rounds_trained)
                    return self.rounds_trained
        finally:
            self._endpoint.close()

    # ------------------------------------------------------------------ messages
    def _on_message(self, env: Envelope, wire_bytes: int) -> None:
        self._events.put((env, wire_bytes))

    def _check(self, env: Envelope) -> str | None:
        if env.sender != 0:
            return f"only the server (rank 0) talks to clients (unknown sender {env.sender})"
        if env.receiver != self.rank:
            return f"it is addressed to rank {env.receiver}"
        if env.run_id != self.cfg.run_id:
            return f"it belongs to run {env.run_id!r}, this is {self.cfg.run_id!r}"
        if env.type not in (READY, TASK, FINISH):
            return f"a client does not take {env.type!r} messages"
        return None

    def _hello(self) -> None:
        env = Envelope(HELLO, self.rank, 0, self.cfg.run_id, self.server_session or "none", body={"clients": self.clients, "session": self.session})
        try:
            self._endpoint.send(env, wait_s=0.0)
        except Exception as err:  # the server is not up yet: try again after hello_interval_s
            log.debug("hello not delivered: %s", err)

    def _take_task(self, env: Envelope) -> None:
        cid = env.body.get("client_id")
        batch = env.body.get("batch", 1)
        try:
            if cid not in self.clients:
                raise PayloadError(f"client {cid!r} is not served by rank {self.rank} (it serves {self.clients})")
            if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= len(self.clients):
                raise PayloadError(f"batch {batch!r} is not in 1..{len(self.clients)}")
            task = decode_task(env.payload, expect_round=env.round, expect_client=cid, max_bytes=self.cfg.comm_args.message_limit)
        except PayloadError as err:
            log.warning("rank %d refused a task: %s", self.rank, err)
            return
        key = (env.session, int(env.round))  # type: ignore[arg-type]
        if self._batch_key != key:
            if self._batch:
                log.warning("rank %d: dropping %d task(s) of round %d: a newer round started", self.rank, len(self._batch), self._batch_key[1])  # type: ignore[index]
            self._batch, self._batch_key = {}, key
        self._batch[cid] = task
        if len(self._batch) >= batch:
            self._flush_batch()

    def _flush_batch(self) -> None:
        """Train the tasks collected for the current (session, round)."""
        if not self._batch or self._batch_key is None:
            return
        (session, rnd), tasks = self._batch_key, [self._batch[c] for c in sorted(self._batch)]
        self._batch, self._batch_key = {}, None
        self._train(session, rnd, tasks)

    # ------------------------------------------------------------------ training
    def _train(self, session: str, rnd: int, tasks: list[Any]) -> None:
        ids = [t.client_id for t in tasks]
        log.info("round %d: training clients %s", rnd, ids)
        self._restore_or_snapshot(rnd, ids)
        outcomes = self.runtime.run_many(tasks, self.store)
        self.rounds_trained += 1
        for task, out in zip(tasks, outcomes):
            if isinstance(out, ClientFailure):
                env = Envelope(FAILURE, self.rank, 0, self.cfg.run_id, session, rnd, body={"client_id": task.client_id, "reason": out.reason[:2000]})
            else:
                self._save_model(task, out)
                env = Envelope(RESULT, self.rank, 0, self.cfg.run_id, session, rnd, body={"client_id": task.client_id}, payload=encode_result(out))
            try:
                # the server may be restarting: wait for it as long as a peer may take to come up
                self._endpoint.send(env, wait_s=self.cfg.comm_args.connect_timeout_s)
            except Exception as err:
                log.warning("rank %d: result of client %d in round %d not delivered: %s", self.rank, task.client_id, rnd, err)
        log.info("round %d: sent %d result(s)", rnd, len(tasks))

    def _restore_or_snapshot(self, rnd: int, ids: list[int]) -> None:
        path = self.dir / _SNAPSHOT
        if path.exists():
            snap = load_state(path)
            if int(snap.get("round", -1)) == rnd:
                for cid, state in snap.get("states", {}).items():
                    self.store.put(int(cid), state)
                log.info("round %d is asked again: restored the client state it started from", rnd)
                return
        save_state({"round": rnd, "states": {str(c): self.store.get(c) for c in ids}}, path)

    def _save_model(self, task: Any, result: Any) -> None:
        from lightning_fedprune.runtime import LOCAL_STATE_KEY

        local = self.store.get(task.client_id).get(LOCAL_STATE_KEY, {})
        state = {
            "round": task.round,
            "client_id": task.client_id,
            "config": dict(task.config),
            "weights": dict(result.weights),
            "local": dict(local),
            "info": dict(self.info),
        }
        path = self.dir / "models" / f"client_{task.client_id}.safetensors"
        save_state(state, path)

