"""Helpers for the worker-process tests of the simulation."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from lightning_fedprune.callbacks import FederatedCallback


class CrashingRuntime:
    """A runtime wrapper whose worker process dies (exit code 7) while it trains ``client`` in
    ``round``; in the process that built it (the engine's), it only delegates."""

    def __init__(self, inner: Any, *, client: int = 1, round: int = 0) -> None:
        self.inner, self.client, self.round = inner, client, round
        self.parent = os.getpid()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_many(self, tasks: Any, store: Any) -> Any:
        if os.getpid() != self.parent and any(t.client_id == self.client and t.round == self.round for t in tasks):
            os._exit(7)
        return self.inner.run_many(tasks, store)


class DyingAfterFirstOutcome:
    """A runtime wrapper whose worker process dies (exit code 9) right after it answered its first
    client of ``round`` (the answer may reach the parent or not); elsewhere it only delegates."""

    def __init__(self, inner: Any, *, round: int = 0) -> None:
        self.inner, self.round = inner, round
        self.parent = os.getpid()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_many(self, tasks: Any, store: Any, *, on_outcome: Any = None) -> Any:
        if os.getpid() == self.parent or on_outcome is None or not any(t.round == self.round for t in tasks):
            return self.inner.run_many(tasks, store, on_outcome=on_outcome)

        def die_after(task: Any, outcome: Any) -> None:
            on_outcome(task, outcome)
            time.sleep(0.5)  # the worker's sender thread sends the answer meanwhile
            os._exit(9)

        return self.inner.run_many(tasks, store, on_outcome=die_after)


class SlowWorker(FederatedCallback):
    """Client callback that makes the worker process named ``lfp-client-worker-<worker>`` slow
    (``seconds`` per client); other processes are not slowed."""

    def __init__(self, worker: int, seconds: float) -> None:
        self.name, self.seconds = f"lfp-client-worker-{worker}", seconds

    def on_client_start(self, trainer: Any, pl_module: Any, ctx: Any) -> None:
        if multiprocessing.current_process().name == self.name:
            time.sleep(self.seconds)
