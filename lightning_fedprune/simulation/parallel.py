"""Clients trained in parallel worker processes, with the same runtime code and the same results.

:class:`ParallelClients` is a drop-in for ``runtime.run_many(tasks, store)``: a pool of worker
processes, each a fork of this process holding its own copy of the
:class:`~lightning_fedprune.runtime.ClientRuntime` (one torch thread each), trains a round's tasks
side by side. Only bytes cross the process boundary, never a pickle:

* to a worker: its share of the round's tasks (:func:`~lightning_fedprune.core.messages.encode_task`)
  and the persistent states of those clients, in one safetensors message;
* back: each result (:func:`~lightning_fedprune.core.messages.encode_result`, validated on
  decoding) or failure, and the clients' updated states.

The client store stays in the parent, so a client may be served by any worker in any round (its
SCAFFOLD control variate, personalized layers or gates travel with its task). Every random choice
of a client's training derives from (seed, round, client), so the results are bit-identical to
the sequential runtime's (only ``compute_seconds`` differ). A worker that dies is a counted
failure of the clients it was training (``kind="error"``), and a fresh worker takes its place.

Workers are forked (``fork`` start method, POSIX): the runtime, its module and its data are
inherited, not sent. Tasks are split into contiguous, equal-count shares in task order.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask, decode_result, decode_task, encode_result, encode_task
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.errors import ConfigError, PayloadError

log = logging.getLogger(__name__)

__all__ = ["ParallelClients", "resolve_workers"]

_STOP = b"stop"


def resolve_workers(workers: int | str | None) -> int:
    """The number of worker processes: an int >= 1, or ``"auto"`` (the usable CPU cores)."""
    if workers is None:
        return 1
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"`workers` must be an integer >= 1 or 'auto', got {workers!r}")
    return workers


def _blob(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _worker_main(conn: Any, runtime: Any) -> None:
    """A worker's loop: decode a share of tasks, train them with the inherited runtime, answer."""
    torch.set_num_threads(1)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if data == _STOP:
            return
        try:
            msg = loads_state(data)
            tasks = [decode_task(t.numpy().tobytes()) for t in msg["tasks"]]
            store = ClientStore()
            for task, state in zip(tasks, msg["states"]):
                store.put(task.client_id, state)
            outcomes = runtime.run_many(tasks, store)
            out: dict[str, Any] = {"outcomes": [], "states": []}
            for task, o in zip(tasks, outcomes):
                if isinstance(o, ClientFailure):
                    out["outcomes"].append({"failure": {"kind": o.kind, "reason": o.reason}})
                else:
                    out["outcomes"].append({"result": _blob(encode_result(o))})
                out["states"].append(store.get(task.client_id))
            reply = dumps_state(out)
        except Exception as err:  # report, never die: the parent counts the failure
            tb = traceback.extract_tb(err.__traceback__)
            where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
            reply = dumps_state({"error": f"{type(err).__name__}: {err}{where}"[:2000]})
        conn.send_bytes(reply)


class _Worker:
    def __init__(self, ctx: Any, runtime: Any, index: int) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.conn = parent
        self.proc = ctx.Process(target=_worker_main, args=(child, runtime), name=f"lfp-client-worker-{index}", daemon=True)
        self.proc.start()
        child.close()

    def stop(self) -> None:
        try:
            self.conn.send_bytes(_STOP)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class ParallelClients:
    """Runs a round's tasks in ``workers`` processes (see the module docstring).

    Args:
        runtime: the client runtime every worker inherits (built, not yet used for training).
        workers: worker processes (>= 1).
        max_message_bytes: results larger than this are failures of kind ``"rejected"``.

    Raises:
        ConfigError: ``workers`` < 1, or no ``fork`` start method on this platform.
    """

    def __init__(self, runtime: Any, workers: int, *, max_message_bytes: int | None = None) -> None:
        self.runtime = runtime
        self.workers = resolve_workers(workers)
        self.max_message_bytes = max_message_bytes
        if "fork" not in mp.get_all_start_methods():
            raise ConfigError("parallel clients need the 'fork' start method (POSIX); use `workers: 1` here")
        self._ctx = mp.get_context("fork")
        self._pool: list[_Worker] = []

    # the runtime's own attributes (module, data, seed) read through
    def __getattr__(self, name: str) -> Any:
        if name == "runtime":
            raise AttributeError(name)
        return getattr(self.runtime, name)

    def _ensure(self, n: int) -> None:
        while len(self._pool) < n:
            self._pool.append(_Worker(self._ctx, self.runtime, len(self._pool)))

    def run_many(self, tasks: Sequence[ClientTask], store: ClientStore) -> list[ClientResult | ClientFailure]:
        """Train ``tasks`` in the workers; one outcome per task, in task order (as ``ClientRuntime.run_many``)."""
        tasks = list(tasks)
        if not tasks:
            return []
        n = min(self.workers, len(tasks))
        self._ensure(n)
        base, extra = divmod(len(tasks), n)
        shares, start = [], 0
        for w in range(n):
            size = base + (1 if w < extra else 0)
            shares.append(tasks[start:start + size])
            start += size
        for w, share in enumerate(shares):
            msg = {"tasks": [_blob(encode_task(t)) for t in share], "states": [store.get(t.client_id) for t in share]}
            self._pool[w].conn.send_bytes(dumps_state(msg))
        outcomes: dict[int, ClientResult | ClientFailure] = {}
        for w, share in enumerate(shares):
            for task, out in zip(share, self._receive(w, share, store)):
                outcomes[task.client_id] = out
        return [outcomes[t.client_id] for t in tasks]

    def _receive(self, w: int, share: list[ClientTask], store: ClientStore) -> list[ClientResult | ClientFailure]:
        worker = self._pool[w]
        try:
            reply = loads_state(worker.conn.recv_bytes())
        except (EOFError, OSError, PayloadError) as err:
            worker.proc.join(timeout=5)
            code = worker.proc.exitcode
            log.warning("client worker %d died (exit code %s) while training clients %s; starting a new one",
                        w, code, [t.client_id for t in share])
            worker.stop()
            self._pool[w] = _Worker(self._ctx, self.runtime, w)
            reason = f"the worker process training this client died (exit code {code}: {type(err).__name__})"
            return [ClientFailure(t.round, t.client_id, "error", reason) for t in share]
        if "error" in reply:
            return [ClientFailure(t.round, t.client_id, "error", str(reply["error"])) for t in share]
        out: list[ClientResult | ClientFailure] = []
        for task, o, state in zip(share, reply["outcomes"], reply["states"]):
            store.put(task.client_id, state)
            if "failure" in o:
                out.append(ClientFailure(task.round, task.client_id, str(o["failure"]["kind"]), str(o["failure"]["reason"])))
                continue
            try:
                out.append(decode_result(
                    o["result"].numpy().tobytes(), expect_round=task.round, expect_client=task.client_id,
                    max_bytes=self.max_message_bytes,
                ))
            except PayloadError as err:
                out.append(ClientFailure(task.round, task.client_id, "rejected", str(err)))
        return out

    def close(self) -> None:
        """Stop the workers (they are started again on the next :meth:`run_many`)."""
        for worker in self._pool:
            worker.stop()
        self._pool = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
