"""Clients trained in parallel worker processes, with the same runtime code and the same results.

:class:`ParallelClients` trains a round's tasks side by side in a pool of worker processes, each a
fork of this process holding its own copy of the :class:`~lightning_fedprune.runtime.ClientRuntime`
(one torch thread each). Only encoded bytes cross the process boundary, never a pickle. A round's
message to a worker is a sequence of frames on its pipe:

* a small header (:func:`~lightning_fedprune.core.serialization.dumps_state`, JSON only): how many
  shared weight sets and tasks follow;
* each weight set that several of the worker's tasks share (one round's global model), ONCE
  (:func:`~lightning_fedprune.core.messages.encode_weights`);
* per task: the task (:func:`~lightning_fedprune.core.messages.encode_task`, with empty weights when
  it uses a shared set) and the client's persistent state exactly as the store holds it
  (:meth:`~lightning_fedprune.core.client_store.ClientStore.get_encoded`, never re-encoded).

The answer comes client by client, as each client's training ends (a thread of the worker sends
it, so the worker trains on while the parent is busy): a header (the client; a failure, or a
result), the result as the client would send it
(:func:`~lightning_fedprune.core.messages.encode_result`) and the client's updated state bytes;
then a last header, ``done`` (or ``error``: every client of the share fails). The parent decodes
each result once, validated: :meth:`ParallelClients.collect` hands each result to the transport as
it comes, so it is decoded while the workers train the other clients, and returns the bytes, which
the transport validates as any received result. A worker's clients' states are saved once it has
answered them all.

The client store stays in the parent, so a client may be served by any worker in any round (its
SCAFFOLD control variate, personalized layers or gates travel with its task). Every random choice
of a client's training derives from (seed, round, client), so the results are bit-identical to
the sequential runtime's (only ``compute_seconds`` differ), whichever worker trains a client.

Scheduling: each worker trains its share in one ``Trainer.fit`` (Lightning's fixed cost is paid
once per worker and round). Shares are balanced by estimated work, longest first (LPT): a task's
work is its local passes (epochs x the client's samples, or steps x batch size) times its model's
tensor elements, so sub-models and small clients are packed around large ones. A worker starts
with the first two thirds of its share (longest first); the rest are held back and handed out,
longest first, to whichever worker asks first (a worker asks once the last task it holds has
started, and takes the answer into the same fit): a worker that gets less of the CPU (it shares a
core with this process's evaluation, or with another job) trains fewer clients. Answers are
collected in the order clients finish, so decoding one overlaps the others' training; the caller
may do its own work between :meth:`~ParallelClients.submit` and :meth:`~ParallelClients.collect`
(the round driver evaluates the previous round's model there), or drop the round with
:meth:`~ParallelClients.discard`.

Workers are forked (``fork`` start method, POSIX): the runtime, its module and its data are
inherited, not sent (a ``spawn`` start would have to pickle them). A worker that dies is a counted
failure of the clients it was training (``kind="error"``), and a fresh worker takes its place.

Accelerators: a worker trains on the device given to it (``"cpu"`` or ``"cuda:<i>"``, see
:func:`resolve_devices`). CUDA cannot be used in a forked child of a process that initialized
CUDA, so this process must not touch CUDA before the workers start: devices are counted with NVML
(which does not initialize CUDA) and the pool refuses to start CUDA workers after CUDA was
initialized here. This path is written for GPU machines but has not yet been measured on one.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import multiprocessing as mp
import os
import queue
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.messages import (
    ClientFailure,
    ClientResult,
    ClientTask,
    decode_result,
    decode_task,
    decode_weights,
    encode_result,
    encode_task,
    encode_weights,
)
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.trainer_utils import ACCELERATORS

log = logging.getLogger(__name__)

__all__ = ["ParallelClients", "resolve_workers", "resolve_devices", "cuda_device_count", "balanced_shares"]

_STOP = b"stop"
_NEED = dumps_state({"need": True})  # a worker asks for one more task of the round


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


def cuda_device_count() -> int:
    """CUDA devices visible to this process, counted without initializing CUDA here.

    torch counts them with NVML when ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (Lightning sets it on
    import; set here too), so forked workers can still initialize CUDA themselves.
    """
    if not torch.backends.cuda.is_built():
        return 0
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        return int(torch.cuda.device_count())
    except Exception:  # no driver, no NVML
        return 0


def resolve_devices(accelerator: str, workers: int | str | None, *, workers_per_gpu: int = 1, cuda_devices: int | None = None) -> list[str]:
    """One device per client worker: ``"cpu"`` or ``"cuda:<i>"``.

    Args:
        accelerator: ``"cpu"``; ``"cuda"`` (every worker on a GPU; CUDA must be available);
            ``"auto"`` (``"cuda"`` when a GPU is visible, else ``"cpu"``).
        workers: an int >= 1, or ``"auto"``: the usable cores on CPU, ``workers_per_gpu`` x the GPUs on CUDA.
        workers_per_gpu: workers that share each GPU; worker ``w`` uses GPU ``(w // workers_per_gpu) % gpus``.
        cuda_devices: the GPU count (default: :func:`cuda_device_count`).

    Raises:
        ConfigError: an unknown ``accelerator``, ``workers_per_gpu`` < 1, or ``"cuda"`` without a GPU.
    """
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"`accelerator` can be {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if isinstance(workers_per_gpu, bool) or not isinstance(workers_per_gpu, int) or workers_per_gpu < 1:
        raise ConfigError(f"`workers_per_gpu` must be an integer >= 1, got {workers_per_gpu!r}")
    if accelerator == "cpu":
        return ["cpu"] * resolve_workers(workers)
    gpus = cuda_device_count() if cuda_devices is None else int(cuda_devices)
    if gpus == 0:
        if accelerator == "cuda":
            raise ConfigError(
                "`accelerator: cuda` was asked for but no CUDA device is visible to this process "
                f"(torch {torch.__version__}, CUDA build: {torch.backends.cuda.is_built()}). "
                "HINT: use `accelerator: auto` to fall back to the CPU, or `accelerator: cpu`"
            )
        return ["cpu"] * resolve_workers(workers)
    n = gpus * workers_per_gpu if workers == "auto" else resolve_workers(workers)
    return [f"cuda:{(w // workers_per_gpu) % gpus}" for w in range(n)]


def balanced_shares(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Task indices per worker: longest task first to the least loaded worker (LPT), each share in task order.

    Deterministic: ties go to the earlier task and the lower worker. Empty shares are dropped.
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [0.0] * max(1, workers)
    shares: list[list[int]] = [[] for _ in loads]
    for i in order:
        w = min(range(len(loads)), key=lambda k: (loads[k], k))
        loads[w] += costs[i]
        shares[w].append(i)
    return [sorted(s) for s in shares if s]


def _accepts(runtime: Any, name: str) -> bool:
    """Whether ``runtime.run_many`` takes the keyword ``name`` (a wrapper of the runtime may not)."""
    try:
        params = inspect.signature(runtime.run_many).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _Sender:
    """Sends a worker's answers from a thread, message by message, in order; also asks for more tasks.

    A frame larger than the pipe's buffer blocks its writer until the parent reads it, and the
    parent reads only when it waits for the round (after its own work, e.g. an evaluation): the
    worker's training goes on meanwhile. The parent's answer to a request for one more task is
    read here too, as soon as it comes (the parent must never wait for a worker that trains).
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[tuple[bytes, ...] | None] = queue.SimpleQueue()
        #: the parent's answers to :meth:`ask`: ``(header, frames)``, ``None`` when the pipe broke
        self.answers: queue.SimpleQueue[tuple[Any, list[bytes]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="lfp-client-worker-sender", daemon=True)
        self.thread.start()

    def send(self, *frames: bytes) -> None:
        self.queue.put(frames)

    def ask(self) -> None:
        """Ask the parent for one more task; its answer comes in :attr:`answers`."""
        self.queue.put(())

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        broken = False
        while True:
            frames = self.queue.get()
            if frames is None:
                return
            if broken:
                if not frames:
                    self.answers.put(None)
                continue
            try:
                for frame in frames or (_NEED,):
                    self.conn.send_bytes(frame)
                if not frames:  # a request: its answer, then the task's two frames if there is one
                    head = loads_state(self.conn.recv_bytes())
                    self.answers.put((head, [self.conn.recv_bytes(), self.conn.recv_bytes()] if "task" in head else []))
            except Exception:  # the parent is gone: the worker's next read ends it
                broken = True
                if not frames:
                    self.answers.put(None)


def _worker_main(conn: Any, runtime: Any, device: str) -> None:
    """A worker's loop: read a round's frames, train the tasks with the inherited runtime, answer
    each client's outcome as soon as it is known, ask for more tasks while the round has some."""
    torch.set_num_threads(1)
    unusable = None  # why this worker cannot train: every client it is given fails with it
    if device != "cpu":
        try:
            runtime.use_device(device)
        except Exception as err:
            unusable = f"worker device {device!r}: {_describe(err)}"
    streams = _accepts(runtime, "on_outcome")
    sender = _Sender(conn)
    try:
        while True:
            try:
                head = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if head == _STOP:
                return
            try:
                plan = loads_state(head)
                frames = [conn.recv_bytes() for _ in range(int(plan["shared"]) + 2 * len(plan["tasks"]))]
            except Exception as err:  # the frames cannot be told apart any more: answer, then stop
                sender.send(dumps_state({"error": _describe(err)}))
                return
            # a request for one more task is on its way ("out"); tasks held and answered this round;
            # no more to get ("over")
            asking = {"out": False, "held": 0, "answered": 0, "over": not (streams and plan.get("more"))}

            def ask_ahead() -> None:
                # one task ahead: ask once the last task held has started, so that the task goes
                # to whichever worker needs one first
                if not asking["out"] and not asking["over"] and asking["answered"] >= asking["held"] - 1:
                    sender.ask()
                    asking["out"] = True

            try:
                if unusable is not None:
                    raise RuntimeError(unusable)
                shared = [decode_weights(frames[g]) for g in range(int(plan["shared"]))]
                rest = frames[len(shared):]
                store = ClientStore()

                def receive(spec: Any, task_frame: bytes, state_frame: bytes, store: ClientStore = store, shared: list = shared) -> ClientTask:
                    task = decode_task(task_frame, expect_round=int(spec["round"]), expect_client=int(spec["client"]))
                    if int(spec["shared"]) >= 0:
                        task = dataclasses.replace(task, weights=shared[int(spec["shared"])])
                    store.put_encoded(task.client_id, state_frame)
                    return task

                tasks = [receive(spec, rest[2 * k], rest[2 * k + 1]) for k, spec in enumerate(plan["tasks"])]
                asking["held"] = len(tasks)
                del frames, rest

                def report(task: ClientTask, outcome: ClientResult | ClientFailure, store: ClientStore = store) -> None:
                    if isinstance(outcome, ClientFailure):
                        head, blob = {"client": task.client_id, "failure": {"kind": outcome.kind, "reason": outcome.reason}}, b""
                    else:
                        head, blob = {"client": task.client_id, "result": True}, encode_result(outcome)
                    sender.send(dumps_state(head), blob, store.get_encoded(task.client_id))
                    asking["answered"] += 1
                    ask_ahead()

                def more(receive: Any = receive) -> ClientTask | None:
                    # the answer to the request sent one task ahead (asked now if it was not yet)
                    ask_ahead()
                    if not asking["out"]:
                        return None
                    answer = sender.answers.get()
                    asking["out"] = False
                    if answer is None:
                        raise OSError("the pipe to the parent broke")
                    head, task_frames = answer
                    if "task" not in head:
                        asking["over"] = True
                        return None
                    task = receive(head["task"], *task_frames)
                    asking["held"] += 1
                    ask_ahead()
                    return task

                if not asking["over"]:
                    ask_ahead()
                    runtime.run_many(tasks, store, on_outcome=report, more=more)
                    asking["over"] = True
                    while (extra := more()) is not None:  # handed out but left untrained: the parent waits for it
                        report(extra, ClientFailure(extra.round, extra.client_id, "error", "the worker's runtime did not train it"))
                elif streams:
                    runtime.run_many(tasks, store, on_outcome=report)
                else:
                    for task, outcome in zip(tasks, runtime.run_many(tasks, store)):
                        report(task, outcome)
                sender.send(dumps_state({"done": True}))
            except Exception as err:  # report, never die: the parent counts the failure
                if asking["out"] and sender.answers.get() is None:  # the answer to a request is read first
                    return
                sender.send(dumps_state({"error": _describe(err)}))
    finally:
        sender.close()


def _describe(err: BaseException) -> str:
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(err).__name__}: {err}{where}"[:2000]


class _Answers:
    """What one worker answered so far for its share of a round."""

    def __init__(self, worker: int, share: list[ClientTask]) -> None:
        self.worker = worker
        self.share = share
        self.tasks = {t.client_id: t for t in share}
        self.got: dict[int, tuple[bytes | ClientFailure, bytes]] = {}

    def add(self, task: ClientTask) -> None:
        self.share.append(task)
        self.tasks[task.client_id] = task


class _Worker:
    def __init__(self, ctx: Any, runtime: Any, index: int, device: str) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.conn = parent
        self.device = device
        self.proc = ctx.Process(target=_worker_main, args=(child, runtime, device), name=f"lfp-client-worker-{index}", daemon=True)
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
    """Runs a round's tasks in worker processes (see the module docstring).

    Args:
        runtime: the client runtime every worker inherits (built, not yet used for training).
        workers: worker processes (>= 1); ignored when ``devices`` is given.
        devices: one device per worker (``"cpu"``, ``"cuda:<i>"``; :func:`resolve_devices`);
            default: every worker on the CPU.
        max_message_bytes: results larger than this are failures of kind ``"rejected"``.

    Raises:
        ConfigError: ``workers`` < 1, no ``fork`` start method on this platform, or CUDA workers
            asked for after this process initialized CUDA.
    """

    def __init__(self, runtime: Any, workers: int = 1, *, devices: Sequence[str] | None = None, max_message_bytes: int | None = None) -> None:
        self.runtime = runtime
        self.devices = list(devices) if devices is not None else ["cpu"] * resolve_workers(workers)
        if not self.devices:
            raise ConfigError("parallel clients need at least one worker device")
        self.workers = len(self.devices)
        self.max_message_bytes = max_message_bytes
        if "fork" not in mp.get_all_start_methods():
            raise ConfigError("parallel clients need the 'fork' start method (POSIX); use `workers: 1` here")
        self._ctx = mp.get_context("fork")
        self._pool: list[_Worker] = []
        self._pending: list[tuple[int, list[ClientTask], BaseException | None]] = []
        self._held: list[tuple[ClientTask, tuple[dict[str, Any], bytes, bytes]]] = []  # tasks to hand out on request
        # workers ask for more tasks only with a runtime that takes them mid-fit (a wrapper may not)
        self._hands_out = _accepts(runtime, "more") and _accepts(runtime, "on_outcome")

    # the runtime's own attributes (module, data, seed) read through
    def __getattr__(self, name: str) -> Any:
        if name == "runtime":
            raise AttributeError(name)
        return getattr(self.runtime, name)

    def _start(self, w: int) -> _Worker:
        device = self.devices[w]
        if device.startswith("cuda") and torch.cuda.is_initialized():
            raise ConfigError(
                "CUDA was initialized in this process before the client workers started, and a forked worker "
                "cannot use it. HINT: do not move models or tensors to the GPU in the process that runs the engine "
                "(the workers do that), or use `accelerator: cpu`"
            )
        return _Worker(self._ctx, self.runtime, w, device)

    def _ensure(self, n: int) -> None:
        while len(self._pool) < n:
            self._pool.append(self._start(len(self._pool)))

    def task_cost(self, task: ClientTask) -> float:
        """Estimated work of a task: local passes x samples x model tensor elements (see the module docstring)."""
        data = self.runtime.data
        if task.local_steps is not None:
            examples = task.local_steps * int(getattr(data, "batch_size", 1) or 1)
        else:
            examples = (task.local_epochs or 1) * int(data.num_train_samples(task.client_id))
        size = sum(int(t.numel()) for t in task.weights.values())
        return float(max(1, examples)) * float(max(1, size))

    # -------------------------------------------------------------- the round
    def submit(self, tasks: Sequence[ClientTask], store: ClientStore) -> None:
        """Hand a round's tasks to the workers (returns once they have them; :meth:`collect` the outcomes).

        Each worker gets its share (see the module docstring) but the last third of it, longest
        task first; the tasks held back are handed out, longest first, to the workers that ask
        for more while :meth:`collect` runs.
        """
        if self._pending:
            raise RuntimeError("collect() the previous tasks before submitting new ones")
        tasks = list(tasks)
        if not tasks:
            return
        ids = [t.client_id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"one task per client and round: duplicate client ids in {ids}")
        costs = [self.task_cost(t) for t in tasks]
        shares = balanced_shares(costs, min(self.workers, len(tasks)))
        self._ensure(len(shares))
        order = {i: k for k, i in enumerate(sorted(range(len(tasks)), key=lambda i: (-costs[i], i)))}  # longest first
        firsts, held = [], []
        for share in shares:
            share = sorted(share, key=order.__getitem__)
            keep = max(1, math.ceil(len(share) * 2 / 3)) if self._hands_out else len(share)
            firsts.append(share[:keep])
            held += share[keep:]
        held.sort(key=order.__getitem__)
        # a weight set that several tasks share (one round's global model) goes to every worker once
        uses: dict[int, int] = {}
        for t in tasks:
            uses[id(t.weights)] = uses.get(id(t.weights), 0) + 1
        groups = list(dict.fromkeys(id(t.weights) for t in tasks if uses[id(t.weights)] > 1 and t.weights))
        # every message is encoded before any is sent: a task that cannot be encoded stops the
        # round before a worker holds half a message
        encoded_groups = [encode_weights(next(t.weights for t in tasks if id(t.weights) == key)) for key in groups]
        encoded = {i: self._task_frames(tasks[i], store, groups) for i in range(len(tasks))}
        self._held = [(tasks[i], encoded[i]) for i in held]
        for w, first in enumerate(firsts):
            head = dumps_state({"shared": len(groups), "tasks": [encoded[i][0] for i in first], "more": bool(held)})
            frames = [head, *encoded_groups, *(f for i in first for f in encoded[i][1:])]
            self._pending.append((w, [tasks[i] for i in first], self._send(w, frames)))

    def _task_frames(self, t: ClientTask, store: ClientStore, groups: list[int]) -> tuple[dict[str, Any], bytes, bytes]:
        """A task's spec, its bytes (without the weights when they are a shared set) and its client's state."""
        g = groups.index(id(t.weights)) if id(t.weights) in groups else -1
        spec = {"round": t.round, "client": t.client_id, "shared": g}
        return spec, encode_task(dataclasses.replace(t, weights={}) if g >= 0 else t), store.get_encoded(t.client_id)

    def _send(self, w: int, frames: list[bytes]) -> BaseException | None:
        conn = self._pool[w].conn
        try:
            for frame in frames:
                conn.send_bytes(frame)
        except (OSError, ValueError) as err:  # a dead worker: its clients fail in collect()
            return err
        return None

    def collect(self, store: ClientStore | None, on_result: Callable[[int, bytes], None] | None = None) -> dict[int, bytes | ClientFailure]:
        """Wait for the submitted tasks: per client, its encoded result (as the client sent it) or a failure.

        A worker answers each client as soon as its training ends; answers are read in the order
        they come. ``on_result(client_id, blob)`` is called with each result as it comes (while
        other clients still train), a hint to process it early: the returned outcomes are what
        counts (a worker that fails after answering some clients fails its whole share). The
        clients' updated states go to ``store`` once a worker has answered all its clients
        (``None``: they are dropped, see :meth:`discard`).
        """
        pending, self._pending = self._pending, []
        out: dict[int, bytes | ClientFailure] = {}
        waiting: dict[Any, _Answers] = {}
        for w, share, err in pending:
            if err is not None:
                out.update(self._dead(w, share, err))
            else:
                waiting[self._pool[w].conn] = _Answers(w, list(share))
        try:
            while waiting:
                for conn in wait(list(waiting)):
                    answers = waiting[conn]
                    done = self._receive(answers, store, on_result if store is not None else None)
                    if done is not None:
                        del waiting[conn]
                        out.update(done)
        except BaseException:  # e.g. Ctrl-C: workers still training would answer the next round with this one's outcomes
            self._held = []
            for answers in waiting.values():
                self._pool[answers.worker].proc.kill()
            self.close()
            raise
        held, self._held = self._held, []
        for task, _ in held:  # no worker asked for them: every worker failed
            out[task.client_id] = ClientFailure(task.round, task.client_id, "error", "no client worker could take this client: every worker failed")
        return out

    def discard(self, *, wait: bool = True) -> None:
        """Drop the submitted tasks' outcomes: the clients' states are not updated.

        ``wait``: let the workers finish and read their answers (a worker that died meanwhile is
        replaced, as in :meth:`collect`); ``False``: kill the workers that hold tasks and stop the
        pool at once (it starts again on the next :meth:`submit`).
        """
        if wait:
            self.collect(None)
            return
        pending, self._pending = self._pending, []
        self._held = []
        if pending:
            for w, _, _ in pending:
                self._pool[w].proc.kill()
            self.close()

    def run_encoded(self, tasks: Sequence[ClientTask], store: ClientStore) -> list[bytes | ClientFailure]:
        """:meth:`submit` then :meth:`collect`: one outcome per task, in task order."""
        self.submit(tasks, store)
        got = self.collect(store)
        return [got[t.client_id] for t in tasks]

    def run_many(self, tasks: Sequence[ClientTask], store: ClientStore) -> list[ClientResult | ClientFailure]:
        """Train ``tasks`` in the workers; one outcome per task, in task order (as ``ClientRuntime.run_many``)."""
        out: list[ClientResult | ClientFailure] = []
        for task, o in zip(tasks, self.run_encoded(tasks, store)):
            if isinstance(o, ClientFailure):
                out.append(o)
                continue
            try:
                out.append(decode_result(o, expect_round=task.round, expect_client=task.client_id, max_bytes=self.max_message_bytes))
            except PayloadError as err:
                out.append(ClientFailure(task.round, task.client_id, "rejected", str(err)))
        return out

    def _dead(self, w: int, share: list[ClientTask], err: BaseException) -> dict[int, ClientFailure]:
        worker = self._pool[w]
        worker.proc.join(timeout=5)
        code = worker.proc.exitcode
        log.warning("client worker %d died (exit code %s) while training clients %s; starting a new one",
                    w, code, [t.client_id for t in share])
        worker.stop()
        self._pool[w] = self._start(w)
        reason = f"the worker process training this client died (exit code {code}: {type(err).__name__})"
        return {t.client_id: ClientFailure(t.round, t.client_id, "error", reason) for t in share}

    def _receive(
        self, answers: _Answers, store: ClientStore | None, on_result: Callable[[int, bytes], None] | None
    ) -> dict[int, bytes | ClientFailure] | None:
        """Read one message of a worker's answer; the share's outcomes once it is complete, else ``None``."""
        w, share = answers.worker, answers.share
        conn = self._pool[w].conn
        try:
            head = loads_state(conn.recv_bytes())
            if "error" in head:
                return {t.client_id: ClientFailure(t.round, t.client_id, "error", str(head["error"])) for t in share}
            if head.get("done"):
                missing = [t.client_id for t in share if t.client_id not in answers.got]
                if missing:
                    raise PayloadError(f"the worker answered no outcome for clients {missing}")
                out: dict[int, bytes | ClientFailure] = {}
                for task in share:
                    outcome, state = answers.got[task.client_id]
                    if store is not None:
                        store.put_encoded(task.client_id, state)
                    out[task.client_id] = outcome
                return out
            if head.get("need"):
                if self._held and store is not None:
                    task, (spec, task_frame, state_frame) = self._held.pop(0)
                    answers.add(task)
                    for frame in (dumps_state({"task": spec}), task_frame, state_frame):
                        conn.send_bytes(frame)
                else:  # nothing left (or the round is dropped)
                    conn.send_bytes(dumps_state({"none": True}))
                return None
            cid = int(head["client"])
            blob, state = conn.recv_bytes(), conn.recv_bytes()
            task = answers.tasks.get(cid)
            if task is None or cid in answers.got:
                raise PayloadError(f"the worker answered client {cid}, which it was not training or had answered")
            failure = head.get("failure")
            outcome = blob if failure is None else ClientFailure(task.round, cid, str(failure["kind"]), str(failure["reason"]))
        except (EOFError, OSError, PayloadError, KeyError, TypeError, ValueError) as err:
            return self._dead(w, share, err)
        answers.got[cid] = (outcome, state)
        if on_result is not None and failure is None:
            on_result(cid, blob)
        return None

    def close(self) -> None:
        """Stop the workers (they are started again on the next :meth:`submit`)."""
        for worker in self._pool:
            worker.stop()
        self._pool = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
