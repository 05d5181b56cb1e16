"""The round driver: one loop for every transport.

:class:`RoundDriver` owns everything a run does between rounds and around them, whatever carries
the messages: it asks the transport which clients can be reached, applies the round rules
(:class:`~lightning_fedprune.core.rounds.RoundRules`: joins, clients sitting out a deadline miss,
clients still busy in async mode), lets the strategy build the tasks, hands them to the transport,
gives what came back to the strategy, benches late clients, evaluates the global model, writes the
round record, tells the listeners, checkpoints and resumes, stops at the target accuracy and
summarizes the run. A round::

    candidates = transport.candidates(round)                     # reachable clients
    available  = rules.eligible(candidates, round, benched, busy=transport.in_flight())
    tasks      = strategy.configure_round(round, available)
    outcome    = transport.execute(round, tasks, rules)          # results with completion times,
                                                                 # failures, bytes, seconds
    metrics    = strategy.aggregate(round, outcome.results, outcome.failures)
    bench the late clients; evaluate; record; listeners; checkpoint

Overlapped evaluation: a transport that can hand out a round's tasks and collect them later
(:meth:`OverlappingTransport.can_overlap`, e.g. the simulation with client worker processes in
sync and deadline mode) lets :meth:`RoundDriver.run` start round ``t+1`` (configure it, send its
tasks) right after aggregating round ``t``, then evaluate round ``t``'s model, write its record,
tell the listeners and write its checkpoint while the clients train, and only then collect round
``t+1``. Round ``t+1``'s tasks depend only on round ``t``'s aggregated model, so every record
(but ``wall_time``/``cpu_time``), every checkpoint and the final state are the same as without the
overlap: the strategy's state is snapshotted before round ``t+1`` is configured and round ``t``'s
checkpoint holds the snapshot; when the run stops after round ``t`` (target accuracy, Ctrl-C,
:attr:`~RoundDriver.stop_requested`) the started round is discarded (the transport waits for
it and keeps nothing of it; on an error or a second Ctrl-C it stops it at once) and the strategy
is restored from the snapshot. With the
overlap a round's ``wall_time``/``cpu_time`` count this process's seconds from the end of the
previous round's checkpoint to its record (its clients' training overlaps the previous round's
evaluation).

A transport (:class:`Transport`) only dispatches tasks and collects results: the simulation
(:mod:`lightning_fedprune.simulation`) with simulated arrival times, a FedML server
(:mod:`lightning_fedprune.fedml_adapters`) with real ones. Both end rounds by the same pure rules.

Round numbers count from 0 everywhere: records, files, checkpoints, logs, the progress bar and the
summary table (``round`` 0 is the first round; "25/30" on a progress bar counts rounds done).

Ctrl-C: while :meth:`RoundDriver.run` runs in the main thread, the first SIGINT asks the driver to
stop after the round in progress (Lightning never sees a ``KeyboardInterrupt``, which it would turn
into ``sys.exit(1)``); the driver then writes the checkpoint, tells the listeners
(``on_run_interrupted``) and raises :class:`~lightning_fedprune.errors.RunInterrupted` (a
``KeyboardInterrupt``). A second SIGINT stops at once: it raises ``KeyboardInterrupt``, or exits the
process with the code set by :func:`exit_on_second_interrupt` (the command line uses 130); the last
checkpoint is still consistent, since checkpoints are written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lightning_fedprune.core.messages import ClientFailure, ClientResult, ClientTask
from lightning_fedprune.core.rounds import RoundRules
from lightning_fedprune.core.serialization import load_state, save_state
from lightning_fedprune.errors import AllClientsFailedError, ConfigError, RunInterrupted
from lightning_fedprune.reporting import round_outcome_fields

log = logging.getLogger(__name__)

__all__ = ["RoundDriver", "RoundOutcome", "Transport", "OverlappingTransport", "CHECKPOINT_NAME", "exit_on_second_interrupt"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = 2
_ABORT = {"exit_code": None}


def exit_on_second_interrupt(exit_code: int | None) -> None:
    """Make a second Ctrl-C during :meth:`RoundDriver.run` end the process with ``exit_code``
    (``None``, the default: raise ``KeyboardInterrupt``, which suits notebooks)."""
    _ABORT["exit_code"] = exit_code


@contextlib.contextmanager
def _sigint_requests_stop(driver: RoundDriver) -> Iterator[None]:
    """While the block runs, the first SIGINT sets ``driver.stop_requested``; see the module docstring."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not ours to change (a thread, or a program with its own handler)
        return

    def stop_at_once(code: int) -> None:
        sys.stderr.write("interrupted again: stopped at once; --resume continues from the last checkpoint\n")
        sys.stderr.flush()
        os._exit(code)

    def handler(signum: int, frame: Any) -> None:
        if driver.stop_requested:
            code = _ABORT["exit_code"]
            if code is None:
                raise KeyboardInterrupt
            stop_at_once(code)
        driver.stop_requested = True
        log.warning("Ctrl-C: stopping after round %d and writing the checkpoint (Ctrl-C again stops at once)", driver.next_round)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        code = _ABORT["exit_code"]
        if driver.stop_requested and code is not None:
            # the process winds down after the interrupted run: a second Ctrl-C that comes now (even
            # while the interpreter shuts down) still ends it at once with the same code, instead of
            # a KeyboardInterrupt traceback out of some exit handler
            signal.signal(signal.SIGINT, lambda signum, frame: stop_at_once(code))
        else:
            signal.signal(signal.SIGINT, previous)


@dataclass
class RoundOutcome:
    """What a transport reports for one round.

    Attributes:
        results: the results to aggregate, each with its ``completion_time`` (seconds from
            dispatch to arrival, simulated or measured).
        failures: the round's failures (dropouts, errors, rejected results, late clients).
        seconds: how long the round took (simulated or measured).
        bytes_up / bytes_down: payload bytes received / sent in the round.
        late: clients that missed the round's deadline (the driver benches them).
        extra: further fields of the round record (deadline, staleness, wire bytes, ...).
    """

    results: list[ClientResult]
    failures: list[ClientFailure]
    seconds: float
    bytes_up: int
    bytes_down: int
    late: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    """What a :class:`RoundDriver` needs from a transport."""

    #: ``"simulation"`` or ``"fedml"``: names the checkpoint kind and the time column
    name: str

    def candidates(self, rnd: int) -> list[int]:
        """The clients that can be reached in round ``rnd`` (waiting for some if none is up)."""

    def in_flight(self) -> set[int]:
        """Clients still working on a task of an earlier round (async mode)."""

    def execute(self, rnd: int, tasks: Sequence[ClientTask], rules: RoundRules) -> RoundOutcome:
        """Send the tasks, collect until ``rules`` end the round, return what came back."""

    def state_dict(self) -> dict[str, Any]:
        """The transport's own state (client states, tasks in flight, counters)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class OverlappingTransport(Transport, Protocol):
    """A transport that can send a round's tasks and collect their outcome later (see the module docstring).

    ``execute(rnd, tasks, rules)`` must equal ``finish(start(rnd, tasks, rules))``, and nothing
    :meth:`start` does may show in :meth:`Transport.state_dict` before :meth:`finish`.
    """

    def can_overlap(self, rules: RoundRules) -> bool:
        """Whether rounds under ``rules`` may be started before the previous one is evaluated."""

    def start(self, rnd: int, tasks: Sequence[ClientTask], rules: RoundRules) -> Any:
        """Send the tasks (returns once they are on their way); the handle goes to :meth:`finish` or :meth:`discard`."""

    def finish(self, started: Any) -> RoundOutcome:
        """Collect a started round, as :meth:`Transport.execute` would have."""

    def discard(self, started: Any, *, wait: bool = True) -> None:
        """Drop everything a started round produced (clients' states included); ``wait``: let it
        end first (``False``: stop it at once, the run is being torn down by an error or a second Ctrl-C)."""


@dataclass
class _Started:
    """A round whose tasks are out (overlapped evaluation), with the strategy state before it was configured."""

    rnd: int
    tasks: list[ClientTask]
    handle: Any
    strategy_state: dict[str, Any]


def _listeners(listeners: Sequence[Any] | None) -> list[Any]:
    from lightning.pytorch.loggers import Logger

    from lightning_fedprune.reporting import LightningLoggers, RichProgress

    if listeners is None:
        from rich.console import Console

        console = Console()
        return [RichProgress(console=console)] if (console.is_terminal or console.is_jupyter) else []
    out = [x for x in listeners if not isinstance(x, Logger)]
    loggers = [x for x in listeners if isinstance(x, Logger)]
    return [*out, LightningLoggers(loggers)] if loggers else out


class RoundDriver:
    """Runs the rounds of one federated run over a transport (see the module docstring).

    Args:
        strategy: the server strategy, initialized.
        transport: the transport (simulation or FedML).
        rules: the round rules (default: synchronous rounds).
        num_clients: clients of the run.
        seed: the run seed (checked on resume).
        evaluator: evaluates the global model (``evaluate(state) -> {"loss", "accuracy", ...}``,
            ``perplexity``); ``None``: no global evaluation.
        eval_every: evaluate every this many rounds (and after the last).
        target_accuracy: stop once the global test accuracy reaches it.
        run_dir: where the checkpoint goes; ``None`` keeps nothing on disk.
        checkpoint_every: checkpoint every this many rounds (and after the last one).
        listeners: objects with optional ``on_run_start(info)``, ``on_round_end(record)``,
            ``on_run_end(summary)`` and ``on_run_interrupted(info)`` methods; Lightning loggers
            (``lightning.pytorch.loggers.Logger``) among them receive the round metrics with
            step = round (:class:`~lightning_fedprune.reporting.LightningLoggers`). ``None``: a
            rich progress bar and summary table when the output is a terminal or a notebook,
            nothing otherwise.
        overlap_eval: when the transport supports it (:class:`OverlappingTransport`), start each
            round before the previous one is evaluated and checkpointed, so that the clients train
            meanwhile (same records, checkpoints and results; see the module docstring).
            ``False``: one round after the other.
    """

    def __init__(
        self,
        *,
        strategy: Any,
        transport: Transport,
        rules: RoundRules | None = None,
        num_clients: int,
        seed: int = 0,
        evaluator: Any = None,
        eval_every: int = 1,
        target_accuracy: float | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        listeners: Sequence[Any] | None = None,
        overlap_eval: bool = True,
    ) -> None:
        if eval_every < 1:
            raise ConfigError(f"`eval_every` must be >= 1, got {eval_every}")
        if checkpoint_every < 1:
            raise ConfigError(f"`checkpoint_every` must be >= 1, got {checkpoint_every}")
        if target_accuracy is not None and not 0.0 < target_accuracy <= 1.0:
            raise ConfigError(f"`target_accuracy` must be in (0, 1], got {target_accuracy}")
        if not strategy.initialized:
            raise ConfigError(
                f"{type(strategy).__name__} is not initialized: call "
                "lightning_fedprune.runtime.initialize_strategy(strategy, module, num_clients=...) first"
            )
        self.strategy = strategy
        self.transport = transport
        self.rules = rules if rules is not None else RoundRules()
        self.num_clients = int(num_clients)
        self.rules.check_clients(self.num_clients)
        self.seed = int(seed)
        self.evaluator = evaluator
        self.eval_every = int(eval_every)
        self.target_accuracy = target_accuracy
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.listeners = _listeners(listeners)
        self.overlap_eval = bool(overlap_eval)
        #: set by Ctrl-C (or by anyone) to stop the run after the round in progress
        self.stop_requested = False
        self.history: list[dict[str, Any]] = []
        self.next_round = 0
        self._clock = 0.0
        self._wall = 0.0
        self._cpu = 0.0
        self._cum_up = 0
        self._cum_down = 0
        self._benched: dict[int, int] = {}  # client -> first round it is asked again
        self._started: _Started | None = None  # overlapped evaluation: the next round, started

    # ------------------------------------------------------------------ running
    def run(self, num_rounds: int, *, resume: bool = False) -> dict[str, Any]:
        """Run rounds until ``num_rounds`` rounds in total are done (or the target is reached).

        Args:
            num_rounds: total rounds of the run (a resumed run continues up to it).
            resume: continue from ``run_dir/checkpoint.safetensors`` when it exists.

        Returns:
            The run summary (see :func:`lightning_fedprune.reporting.summarize`).

        Raises:
            AllClientsFailedError: every client selected in a round failed.
            RunInterrupted: Ctrl-C (or :attr:`stop_requested`) stopped the run after a round; the
                checkpoint is written.
        """
        if resume:
            path = self._checkpoint_path()
            if path is not None and path.exists():
                self.load_checkpoint(path)
                log.info("resumed from %s at round %d (round numbers count from 0)", path, self.next_round)
            else:
                log.info("nothing to resume at %s; starting afresh", path)
        self._emit("on_run_start", {
            "num_rounds": int(num_rounds),
            "start_round": self.next_round,
            "strategy": type(self.strategy).__name__,
            "num_clients": self.num_clients,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "transport": self.transport.name,
        })
        stopped_early = self._reached_target()
        self.stop_requested = False
        overlap = self.overlaps()
        with _sigint_requests_stop(self):
            try:
                while self.next_round < num_rounds and not stopped_early and not self.stop_requested:
                    rnd = self.next_round
                    last = rnd == num_rounds - 1
                    record = self._run_round_overlapped(rnd, last=last) if overlap else self.run_round(rnd, last=last)
                    stopped_early = self._reached_target()
                    # listeners first: if the process dies before the checkpoint, the resumed run redoes
                    # this round and the metric writers drop what they wrote for it
                    self._emit("on_round_end", record)
                    due = (rnd + 1) % self.checkpoint_every == 0 or last or stopped_early
                    if self.run_dir is not None and (due or self.stop_requested):
                        self.save_checkpoint()
            except BaseException:
                self._discard_started(wait=False)  # an error or a second Ctrl-C: do not wait for the clients
                raise
            self._discard_started()
        if self.stop_requested and self.next_round < num_rounds and not stopped_early:
            checkpoint = self._checkpoint_path()
            self._emit("on_run_interrupted", {"next_round": self.next_round, "checkpoint": str(checkpoint) if checkpoint else None})
            raise RunInterrupted(self.next_round, str(checkpoint) if checkpoint else None)
        self.rounds_done()
        summary = self.summary(stopped_early=stopped_early)
        self._emit("on_run_end", summary)
        return summary

    def run_round(self, rnd: int, *, last: bool = False) -> dict[str, Any]:
        """Run one round and return its record (also appended to :attr:`history`)."""
        if rnd != self.next_round or self._started is not None:
            raise ConfigError(f"round {rnd} requested but the next round is {self.next_round}")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        tasks = self._configure(rnd)
        out = self.transport.execute(rnd, tasks, self.rules)
        record, agg = self._aggregate(rnd, tasks, out)
        record.update(self._evaluate_global(rnd, last))
        return self._close_record(record, out, agg, wall0, cpu0)

    def overlaps(self) -> bool:
        """Whether :meth:`run` evaluates a round while the next one trains (``overlap_eval`` and a transport that can)."""
        can = getattr(self.transport, "can_overlap", None)
        return self.overlap_eval and callable(can) and bool(can(self.rules))

    def _run_round_overlapped(self, rnd: int, *, last: bool) -> dict[str, Any]:
        """Round ``rnd`` with the overlap: collect it (started by the previous call, or now),
        aggregate, start round ``rnd + 1`` unless this is the last one or a stop is asked, then
        evaluate round ``rnd``'s model while its clients train."""
        wall0, cpu0 = time.perf_counter(), time.process_time()
        started, self._started = self._started, None
        if started is None:
            tasks = self._configure(rnd)
            started = _Started(rnd, tasks, self.transport.start(rnd, tasks, self.rules), {})
        assert started.rnd == rnd
        out = self.transport.finish(started.handle)
        record, agg = self._aggregate(rnd, started.tasks, out)
        global_state = dict(self.strategy.global_state)
        if not last and not self.stop_requested:
            # round rnd + 1 depends only on the aggregated model; the strategy's state before it
            # is configured is what round rnd's checkpoint holds (and what a discard restores)
            snapshot = copy.deepcopy(self.strategy.state_dict())
            global_state = {k: v.clone() for k, v in global_state.items()}
            nxt = rnd + 1
            try:
                tasks = self._configure(nxt)
                self._started = _Started(nxt, tasks, self.transport.start(nxt, tasks, self.rules), snapshot)
            except BaseException:
                self.strategy.load_state_dict(snapshot)
                raise
        record.update(self._evaluate_global(rnd, last, global_state))
        return self._close_record(record, out, agg, wall0, cpu0)

    def _discard_started(self, *, wait: bool = True) -> None:
        """Drop a started round (the run stops before it): the transport drains it (``wait``) or
        stops it, the strategy gets back its state from before the round was configured."""
        started, self._started = self._started, None
        if started is None:
            return
        try:
            self.transport.discard(started.handle, wait=wait)
        finally:
            self.strategy.load_state_dict(started.strategy_state)
            log.debug("round %d was started ahead and is discarded (the run stops after round %d)", started.rnd, started.rnd - 1)

    def _configure(self, rnd: int) -> list[ClientTask]:
        """The round's eligible clients, and the strategy's tasks for them (checked)."""
        available = self.rules.eligible(self.transport.candidates(rnd), rnd, benched=self._benched, busy=self.transport.in_flight())
        tasks = self.strategy.configure_round(rnd, available)
        allowed = set(available)
        bad = [t.client_id for t in tasks if t.client_id not in allowed or t.round != rnd]
        if bad:
            raise ConfigError(f"{type(self.strategy).__name__} built tasks for unavailable clients or another round: {bad}")
        return tasks

    def _aggregate(self, rnd: int, tasks: Sequence[ClientTask], out: RoundOutcome) -> tuple[dict[str, Any], dict[str, float]]:
        """Bench the late clients, aggregate the outcome, advance the clock: the record so far and the strategy's metrics."""
        for c in out.late:
            self._benched[c] = self.rules.bench_until(rnd)
        if tasks and not out.results and not (self.rules.mode == "async" and self.transport.in_flight()):
            reasons = "; ".join(f"client {f.client_id}: {f.kind}: {f.reason}" for f in out.failures[:5])
            more = f" (and {len(out.failures) - 5} more)" if len(out.failures) > 5 else ""
            raise AllClientsFailedError(f"round {rnd}: all {len(tasks)} selected clients failed, nothing to aggregate. {reasons}{more}")
        if not tasks and not out.results:
            log.warning("round %d: no client available or selected; the global model is unchanged", rnd)

        agg = self.strategy.aggregate(rnd, out.results, out.failures) if (out.results or out.failures) else {}
        self._clock += out.seconds
        self._cum_up += out.bytes_up
        self._cum_down += out.bytes_down
        record: dict[str, Any] = {
            "round": rnd,
            "sim_time": self._clock,
            "round_sim_time": out.seconds,
            "bytes_up": out.bytes_up,
            "bytes_down": out.bytes_down,
            "cum_bytes": self._cum_up + self._cum_down,
            "num_selected": len(tasks),
            "num_results": len(out.results),
            "num_failures": len(out.failures),
        }
        record.update(out.extra)
        return record, agg

    def _close_record(self, record: dict[str, Any], out: RoundOutcome, agg: Mapping[str, float], wall0: float, cpu0: float) -> dict[str, Any]:
        record.update(round_outcome_fields(out.results, out.failures, agg))
        self._wall += time.perf_counter() - wall0
        self._cpu += time.process_time() - cpu0
        record["wall_time"] = self._wall
        record["cpu_time"] = self._cpu
        self.history.append(record)
        self.next_round = int(record["round"]) + 1
        return record

    def rounds_done(self) -> None:
        """Called once the last round of :meth:`run` is done, before the summary (a transport
        that must wind down first, e.g. to report its final counters, does it here)."""

    # ------------------------------------------------------------------ pieces
    def _evaluate_global(self, rnd: int, last: bool, state: Mapping[str, Any] | None = None) -> dict[str, float]:
        ev = self.evaluator
        out = {"test_loss": math.nan, "test_accuracy": math.nan}
        perplexity = bool(getattr(ev, "perplexity", False))
        if perplexity:
            out["test_perplexity"] = math.nan
        if ev is None or not ev.available or not ((rnd + 1) % self.eval_every == 0 or last):
            return out
        res = ev.evaluate(self.strategy.global_state if state is None else state)
        out["test_loss"], out["test_accuracy"] = res["loss"], res["accuracy"]
        if perplexity:
            out["test_perplexity"] = res["perplexity"]
        return out

    def _reached_target(self) -> bool:
        if self.target_accuracy is None or not self.history:
            return False
        acc = self.history[-1].get("test_accuracy", math.nan)
        return bool(math.isfinite(acc) and acc >= self.target_accuracy)

    def summary(self, *, stopped_early: bool = False) -> dict[str, Any]:
        """The run summary (:func:`lightning_fedprune.reporting.summarize` of the history)."""
        from lightning_fedprune.reporting import summarize

        out = summarize(self.history, target_accuracy=self.target_accuracy)
        out["stopped_early"] = bool(stopped_early)
        out["run_dir"] = str(self.run_dir) if self.run_dir else None
        return out

    def _emit(self, hook: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            fn = getattr(listener, hook, None)
            if callable(fn):
                fn(payload)

    # ------------------------------------------------------------------ checkpointing
    def _checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: strategy, transport, clock, counters, history."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "kind": self.transport.name,
            "seed": self.seed,
            "num_clients": self.num_clients,
            "next_round": self.next_round,
            # with a round started ahead: the strategy as it was before that round was configured
            "strategy": self.strategy.state_dict() if self._started is None else self._started.strategy_state,
            "transport": self.transport.state_dict(),
            "clock": self._clock,
            "wall_time": self._wall,
            "cpu_time": self._cpu,
            "cum_bytes_up": self._cum_up,
            "cum_bytes_down": self._cum_down,
            "history": self.history,
            "benched": {str(c): r for c, r in self._benched.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the run's seed, clients and transport kind must match).

        Raises:
            ConfigError: a checkpoint of another format, transport, seed or client count.
        """
        self._discard_started()
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ConfigError(f"checkpoint format {state.get('format')!r} is not supported (expected {_CHECKPOINT_FORMAT})")
        if state.get("kind") != self.transport.name:
            raise ConfigError(
                f"this is a {state.get('kind')!r} checkpoint and this run uses the {self.transport.name!r} transport: "
                f"a {state.get('kind')} checkpoint cannot resume a {self.transport.name} run"
            )
        for key, mine in (("seed", self.seed), ("num_clients", self.num_clients)):
            if state.get(key) != mine:
                raise ConfigError(f"checkpoint was made with {key}={state.get(key)!r}, this run has {key}={mine!r}")
        self.strategy.load_state_dict(state["strategy"])
        self.transport.load_state_dict(state.get("transport", {}))
        self.next_round = int(state["next_round"])
        self._clock = float(state["clock"])
        self._wall = float(state["wall_time"])
        self._cpu = float(state["cpu_time"])
        self._cum_up = int(state["cum_bytes_up"])
        self._cum_down = int(state["cum_bytes_down"])
        self.history = list(state["history"])
        self._benched = {int(c): int(r) for c, r in state.get("benched", {}).items()}

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the run state (safetensors + JSON, atomically); default ``run_dir/checkpoint.safetensors``."""
        target = Path(path) if path is not None else self._checkpoint_path()
        if target is None:
            raise ConfigError("save_checkpoint needs a path or an engine with a run_dir")
        save_state(self.state_dict(), target)
        return target

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        self.load_state_dict(load_state(path))
