"""What people see of a run: a progress bar, metric files, plots and a summary.

Everything here is a *listener* of the round driver: an object with any of the methods
``on_run_start(info)``, ``on_round_end(record)``, ``on_run_end(summary)`` and
``on_run_interrupted(info)`` (Ctrl-C)::

    engine = SimulationEngine(..., listeners=[RichProgress(), MetricsWriter(run_dir), PlotWriter(run_dir)])

A round ``record`` is a flat JSON-able dict (``round``, ``sim_time``, ``cum_bytes``,
``test_accuracy``, ``failures``, ``agg/<name>``, ...); metrics that were not measured in a round
are NaN. On disk, NaN is written as ``null`` and read back as NaN by :func:`read_metrics`.

Round numbers count from 0 (``round`` 0 is the first round) in records, files, progress lines and
tables alike. Time fields: ``sim_time`` is cumulative seconds since the run started (simulated, or
measured in a deployment), ``round_sim_time`` the round's own; ``wall_time`` / ``cpu_time`` are the
server process's cumulative wall-clock / CPU seconds. ``agg/train_loss_before`` /
``agg/train_loss_after`` are the clients' sample-weighted mean training loss over their first /
last local epoch (one epoch: first / second half of the local steps), measured while training on
different batches, so ``after`` may exceed ``before``; per client they are in ``client_metrics``.

Files written in ``run_dir``:

* ``metrics.jsonl``: one record per line, appended every round (a resumed run first drops the
  lines of the rounds it will redo);
* ``metrics.csv``: the same records as flat columns (``failures`` as a count), at run end;
* ``summary.json``: the engine's run summary, at run end;
* ``accuracy_vs_round.png``, ``accuracy_vs_sim_time.png``, ``accuracy_vs_bytes.png``: at run end.

:func:`summarize` is the pure function the engine uses to build its summary.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal as _decimal_size
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightning_fedprune.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "round_outcome_fields",
    "METRICS_FILE",
    "CSV_FILE",
    "SUMMARY_FILE",
    "PLOT_FILES",
    "PLOT_X_AXES",
    "MetricsWriter",
    "PlotWriter",
    "RichProgress",
    "LOGGERS",
    "LightningLoggers",
    "make_logger",
    "logger_options",
    "format_bytes",
    "format_duration",
    "plot_comparison",
    "plot_history",
    "read_metrics",
    "summarize",
]

METRICS_FILE = "metrics.jsonl"
#: optional per-client fields of ``client_metrics`` (copied from ``ClientMetrics.extra`` when present)
PROBE_FIELDS = ("probe_loss_before", "probe_loss_after")
CSV_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"

#: x axes of the plots: record key -> (axis label, file name suffix)
PLOT_X_AXES: dict[str, tuple[str, str]] = {
    "round": ("round", "round"),
    "sim_time": ("simulated time", "sim_time"),
    "cum_bytes": ("communicated bytes (up + down)", "bytes"),
}
#: the files :func:`plot_history` writes for ``test_accuracy``
PLOT_FILES = tuple(f"accuracy_vs_{suffix}.png" for _, suffix in PLOT_X_AXES.values())


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` (recursively), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), allow_nan=False, separators=(",", ":"))


def format_bytes(num_bytes: float | None) -> str:
    """Decimal human units: ``1234567 -> '1.2 MB'``; ``None``/NaN -> ``'-'``."""
    if not _finite(num_bytes):
        return "-"
    return _decimal_size(int(num_bytes))


def format_duration(seconds: float | None) -> str:
    """``42.0 -> '42.0 s'``, ``245 -> '4m 05s'``, ``3725 -> '1h 02m 05s'``; ``None``/NaN -> ``'-'``."""
    if not _finite(seconds):
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.3g} s" if s < 10 else f"{s:.1f} s"
    total = int(round(s))
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _format_acc(value: Any) -> str:
    return f"{100 * value:.2f}%" if _finite(value) else "-"


def _num_failures(record: Mapping[str, Any]) -> int:
    failures = record.get("failures")
    if isinstance(failures, (list, tuple)):
        return len(failures)
    n = record.get("num_failures")
    return int(n) if _finite(n) else 0


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def round_outcome_fields(results: Sequence[Any], failures: Sequence[Any], agg: Mapping[str, float]) -> dict[str, Any]:
    """The round-record fields every transport derives from a round's outcome.

    ``failures`` (reasons per client), the clients' local test accuracy (mean, min, max over the
    finite values of ``metrics.extra["local_test_acc"]``), the strategy's aggregation metrics
    under ``agg/<name>`` and each client's training metrics under ``client_metrics``
    (:func:`client_metrics_fields`).
    """
    local = [r.metrics.extra["local_test_acc"] for r in results if "local_test_acc" in r.metrics.extra]
    local = [v for v in local if math.isfinite(v)]
    out: dict[str, Any] = {
        "failures": [{"client_id": f.client_id, "kind": f.kind, "reason": f.reason} for f in failures],
        "local_acc_mean": sum(local) / len(local) if local else math.nan,
        "local_acc_min": min(local) if local else math.nan,
        "local_acc_max": max(local) if local else math.nan,
    }
    out.update({f"agg/{k}": float(v) for k, v in agg.items()})
    out["client_metrics"] = client_metrics_fields(results)
    return out


def client_metrics_fields(results: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Per-client training metrics of a round, keyed by client id (as text, as in JSON).

    ``loss_before`` / ``loss_after``: the client's mean training loss over its first / last local
    epoch (with a single epoch: the first / second half of its local steps), measured while
    training on different batches, so ``loss_after`` may exceed ``loss_before`` on a noisy round;
    ``num_samples``; ``completion_time``: seconds from dispatch to arrival (simulated or measured);
    and the paired probe losses ``probe_loss_before`` / ``probe_loss_after`` when the client
    measured them (FedMP's reward asks for them).
    """
    out: dict[str, dict[str, float]] = {}
    for r in results:
        m = r.metrics
        fields = {
            "loss_before": float(m.loss_before),
            "loss_after": float(m.loss_after),
            "num_samples": float(m.num_samples),
            "completion_time": float(r.completion_time) if r.completion_time is not None else math.nan,
        }
        for key in PROBE_FIELDS:
            if key in m.extra:
                fields[key] = float(m.extra[key])
        out[str(r.client_id)] = fields
    return out


def summarize(records: Sequence[Mapping[str, Any]], target_accuracy: float | None = None) -> dict[str, Any]:
    """Summarize a run's round records (pure function; records in round order).

    Args:
        records: the round records (see the module docstring); NaN accuracies are ignored.
        target_accuracy: accuracy in ``(0, 1]`` to reach, or ``None``.

    Returns:
        ``{"rounds_run", "final", "best_accuracy", "best_round", "target_accuracy",
        "reached_target_round", "time_to_target", "bytes_to_target", "total_sim_time",
        "total_bytes", "total_failures"}``. ``reached_target_round`` is the ``round`` of the
        first record whose ``test_accuracy >= target_accuracy``; ``time_to_target`` and
        ``bytes_to_target`` are that record's ``sim_time`` and ``cum_bytes``. They, the best
        accuracy and ``final`` are ``None`` when they do not exist.

    Raises:
        ConfigError: if ``target_accuracy`` is not ``None`` or a number in ``(0, 1]``.
    """
    if target_accuracy is not None and not (_finite(target_accuracy) and 0.0 < target_accuracy <= 1.0):
        raise ConfigError(f"`target_accuracy` must be null or a number in (0, 1], got {target_accuracy!r}")
    best_acc: float | None = None
    best_round: int | None = None
    reached: Mapping[str, Any] | None = None
    for rec in records:
        acc = rec.get("test_accuracy")
        if not _finite(acc):
            continue
        if best_acc is None or acc > best_acc:
            best_acc, best_round = float(acc), rec.get("round")
        if reached is None and target_accuracy is not None and acc >= target_accuracy:
            reached = rec
    final = dict(records[-1]) if records else None

    def _get(rec: Mapping[str, Any] | None, key: str) -> Any:
        if rec is None:
            return None
        v = rec.get(key)
        return v if _finite(v) else None

    return {
        "rounds_run": len(records),
        "final": final,
        "best_accuracy": best_acc,
        "best_round": best_round,
        "target_accuracy": None if target_accuracy is None else float(target_accuracy),
        "reached_target_round": None if reached is None else reached.get("round"),
        "time_to_target": _get(reached, "sim_time"),
        "bytes_to_target": _get(reached, "cum_bytes"),
        "total_sim_time": _get(final, "sim_time"),
        "total_bytes": _get(final, "cum_bytes"),
        "total_failures": sum(_num_failures(r) for r in records),
    }


# --------------------------------------------------------------------------------------------
# metric files
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # a run killed mid-write leaves a partial last line: skip it, keep the rest
                log.warning("%s:%d is not valid JSON (interrupted write?); skipping it", path, lineno)
    return records


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The round records of ``run_dir/metrics.jsonl``, in file order.

    Top-level ``null`` values (NaN when written) come back as ``float('nan')``; an unreadable
    (partially written) line is skipped with a warning.

    Raises:
        ConfigError: if the file does not exist.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"no metrics at {path}: is {run_dir} the run_dir of a run that finished a round?")
    records = _read_jsonl(path)
    return [{k: (math.nan if v is None else v) for k, v in rec.items()} for rec in records]


def _csv_value(key: str, value: Any) -> Any:
    if key == "failures" and isinstance(value, (list, tuple)):
        return len(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (dict, list, tuple)):
        return _dumps(value)
    return value


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    columns: list[str] = []
    for rec in records:
        columns.extend(k for k in rec if k not in columns)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for rec in records:
            writer.writerow([_csv_value(c, rec.get(c)) for c in columns])
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    """Writes ``metrics.jsonl`` every round and ``metrics.csv`` + ``summary.json`` at run end.

    Args:
        run_dir: folder of the run (created if missing).

    On ``on_run_start`` with ``start_round == k``, lines of an existing ``metrics.jsonl`` whose
    round is ``>= k`` are dropped first (all of them for a fresh run, ``k == 0``), so a resumed
    run never duplicates a round. The CSV is rebuilt from the whole jsonl, so it covers the
    rounds of earlier sessions too.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE

    def on_run_start(self, info: Mapping[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = int(info.get("start_round") or 0)
        if not self.path.exists():
            return
        if start <= 0:
            self.path.unlink()
            return
        kept = [r for r in _read_jsonl(self.path) if isinstance(r.get("round"), int) and r["round"] < start]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(_dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_dumps(record) + "\n")

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records = _read_jsonl(self.path) if self.path.exists() else []
        _write_csv(self.run_dir / CSV_FILE, records)
        _write_json(self.run_dir / SUMMARY_FILE, summary)


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no pyplot, no global backend change, no display needed)
# --------------------------------------------------------------------------------------------


def _metric_label(metric: str) -> tuple[str, str]:
    """(axis label, file stem) of a record key."""
    if metric == "test_accuracy":
        return "test accuracy", "accuracy"
    if metric == "test_perplexity":
        return "test perplexity", "perplexity"
    stem = metric.replace("/", "_")
    return metric, stem


def _check_x(x: str) -> None:
    if x not in PLOT_X_AXES:
        raise ConfigError(f"`x` can be {', '.join(PLOT_X_AXES)}, got {x!r}")


def _points(records: Iterable[Mapping[str, Any]], x: str, metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        xv, yv = rec.get(x), rec.get(metric)
        if _finite(xv) and _finite(yv):
            xs.append(float(xv))
            ys.append(float(yv))
    return xs, ys


def _bytes_tick(value: float, _pos: Any = None) -> str:
    """A bytes-axis tick label: ``'0'`` at zero, human units above, nothing below."""
    if value == 0:
        return "0"
    return format_bytes(value) if value > 0 else ""


def _new_axes(x: str, metric: str, *, title: str | None = None, measured: bool = False) -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    label = PLOT_X_AXES[x][0]
    if x == "sim_time":
        label = ("measured time" if measured else label) + " (s)"
    ax.set_xlabel(label)
    ax.set_ylabel(_metric_label(metric)[0])
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    if x == "cum_bytes":
        ax.xaxis.set_major_formatter(FuncFormatter(_bytes_tick))
    return fig, ax


def _finish_axes(fig: Any, ax: Any, path: Path, *, empty: bool, target: float | None, legend: bool) -> Path:
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    if empty:
        ax.text(0.5, 0.5, "no evaluated rounds", ha="center", va="center", transform=ax.transAxes)
    if legend or target is not None:
        ax.legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_history(
    records: Sequence[Mapping[str, Any]],
    run_dir: str | os.PathLike[str],
    *,
    metric: str = "test_accuracy",
    target_accuracy: float | None = None,
    title: str | None = None,
    measured: bool = False,
) -> list[Path]:
    """Plot ``metric`` against round, simulated time and cumulative bytes.

    Writes ``accuracy_vs_round.png``, ``accuracy_vs_sim_time.png`` and ``accuracy_vs_bytes.png``
    (``perplexity_vs_*`` for ``metric="test_perplexity"``) into ``run_dir``; rounds where the
    metric is NaN (not evaluated) are skipped. A dashed line marks ``target_accuracy`` when given
    and the metric is the accuracy. ``title`` goes above each plot (:class:`PlotWriter`: the run's
    name and strategy); ``measured`` labels the time axis "measured time" (a deployment's clocks).

    Returns:
        The paths written, in the order above.
    """
    run_dir = Path(run_dir)
    stem = _metric_label(metric)[1]
    target = target_accuracy if metric == "test_accuracy" and _finite(target_accuracy) else None
    paths = []
    for x, (_, suffix) in PLOT_X_AXES.items():
        fig, ax = _new_axes(x, metric, title=title, measured=measured)
        xs, ys = _points(records, x, metric)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, linewidth=1.5)
        paths.append(_finish_axes(fig, ax, run_dir / f"{stem}_vs_{suffix}.png", empty=not xs, target=target, legend=False))
    return paths


def plot_comparison(
    named_histories: Mapping[str, Sequence[Mapping[str, Any]]],
    out_path: str | os.PathLike[str],
    x: str = "round",
    *,
    metric: str = "test_accuracy",
    target_accuracy: float | None = None,
    title: str | None = None,
) -> Path:
    """One plot with one line per run, e.g. ``{"fedavg": read_metrics(a), "fedprox": read_metrics(b)}``.

    Args:
        named_histories: label -> that run's records.
        out_path: the PNG to write (folders are created).
        x: ``"round"``, ``"sim_time"`` or ``"cum_bytes"``.
        metric: the record key on the y axis.
        target_accuracy: draw a dashed line at this accuracy.
        title: a title above the plot.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: on an unknown ``x`` or an empty ``named_histories``.
    """
    _check_x(x)
    if not named_histories:
        raise ConfigError("`named_histories` is empty: pass {label: records, ...} with at least one run")
    fig, ax = _new_axes(x, metric, title=title)
    any_points = False
    for label, records in named_histories.items():
        xs, ys = _points(records, x, metric)
        any_points |= bool(xs)
        ax.plot(xs, ys, linewidth=1.5, label=str(label))
    target = target_accuracy if _finite(target_accuracy) else None
    return _finish_axes(fig, ax, Path(out_path), empty=not any_points, target=target, legend=True)


class PlotWriter:
    """Calls :func:`plot_history` at run end (covering earlier sessions of a resumed run).

    Language-model runs (records with ``test_perplexity``) also get ``perplexity_vs_*.png``.

    Args:
        run_dir: folder of the run.
        metric: the record key to plot (``"test_accuracy"``; ``"test_perplexity"`` for
            language models).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, metric: str = "test_accuracy") -> None:
        self.run_dir = Path(run_dir)
        self.metric = metric
        self._start = 0
        self._records: list[dict[str, Any]] = []
        self._title: str | None = None
        self._measured = False
        self.paths: list[Path] = []

    def on_run_start(self, info: Mapping[str, Any]) -> None:
        self._start = int(info.get("start_round") or 0)
        self._records = []
        self._measured = info.get("transport") == "fedml"
        strategy = str(info.get("strategy") or "")
        self._title = f"{self.run_dir.name}: {strategy}" if strategy else self.run_dir.name

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        self._records.append(dict(record))

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        records = self._records
        if self._start > 0 and (self.run_dir / METRICS_FILE).is_file():
            earlier = [r for r in read_metrics(self.run_dir) if _finite(r.get("round")) and r["round"] < self._start]
            records = earlier + records
        style = {"title": self._title, "measured": self._measured}
        self.paths = plot_history(records, self.run_dir, metric=self.metric, target_accuracy=summary.get("target_accuracy"), **style)
        if self.metric != "test_perplexity" and any(_finite(r.get("test_perplexity")) for r in records):
            self.paths += plot_history(records, self.run_dir, metric="test_perplexity", **style)
        log.debug("wrote plots %s", [str(p) for p in self.paths])


# --------------------------------------------------------------------------------------------
# progress for people
# --------------------------------------------------------------------------------------------


class RichProgress:
    """A rich progress bar of the rounds, then a summary table.

    On a terminal the bar shows round ``i/N``, the latest test accuracy (perplexity for language
    models), simulated time, cumulative bytes and failures. Without a terminal (CI logs, files)
    nothing is redrawn: one plain line is printed every ``max(1, N // 20)`` rounds and at the last
    round instead. At run end a table gives rounds, final/best accuracy, time and bytes to target,
    total simulated time, total bytes and failures.

    Args:
        console: where to print (default: a new :class:`rich.console.Console` on stdout).
        disable: print nothing at all.
    """

    def __init__(self, console: Console | None = None, disable: bool = False) -> None:
        self.console = console if console is not None else Console()
        self.disable = bool(disable)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._total = 0
        self._start = 0
        self._failures = 0
        self._last_acc: float | None = None
        self._last_ppl: float | None = None
        self._strategy = ""
        self._measured = False

    # -------------------------------------------------------------- listener hooks
    def on_run_start(self, info: Mapping[str, Any]) -> None:
        if self.disable:
            return
        self._total = int(info.get("num_rounds") or 0)
        self._start = int(info.get("start_round") or 0)
        self._failures = 0
        self._last_acc = self._last_ppl = None
        self._strategy = str(info.get("strategy") or "")
        self._measured = info.get("transport") == "fedml"
        head = f"{self._strategy}: {info.get('num_clients', '?')} clients, {self._total} rounds"
        if self._start:
            head += f", resuming at round {self._start} ({self._start} done; rounds count from 0)"
        if info.get("run_dir"):
            head += f" -> {info['run_dir']}"
        self.console.print(head, markup=False, highlight=False)
        if not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            refresh_per_second=1,  # only the elapsed time moves between rounds; each round redraws at once
        )
        self._progress.start()
        self._task = self._progress.add_task(self._strategy or "rounds", total=self._total, completed=self._start, stats="")
        self._progress.refresh()

    def _stats(self, record: Mapping[str, Any]) -> str:
        parts = []
        if self._last_ppl is not None:
            parts.append(f"ppl {self._last_ppl:.2f}")
        else:
            parts.append(f"acc {_format_acc(self._last_acc)}")
        parts.append(f"{'time' if self._measured else 'sim'} {format_duration(record.get('sim_time'))}")
        parts.append(format_bytes(record.get("cum_bytes")))
        if self._failures:
            parts.append(f"failures {self._failures}")
        return " | ".join(parts)

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        if self.disable:
            return
        acc, ppl = record.get("test_accuracy"), record.get("test_perplexity")
        if _finite(acc):
            self._last_acc = float(acc)
        if _finite(ppl):
            self._last_ppl = float(ppl)
        self._failures += _num_failures(record)
        rnd = int(record.get("round", 0))
        done = rnd + 1
        stats = self._stats(record)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, stats=stats)
            self._progress.refresh()
            return
        every = max(1, self._total // 20)
        if done % every == 0 or done >= self._total or done == self._start + 1:
            width = len(str(self._total or done))
            self.console.print(f"round {rnd:>{width}} ({done:>{width}}/{self._total} done)  {stats}", markup=False, highlight=False)

    def on_run_interrupted(self, info: Mapping[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        if self.disable:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.console.print(self.summary_table(summary))

    # -------------------------------------------------------------- table
    def summary_table(self, summary: Mapping[str, Any]) -> Table:
        """The run-end table of ``summary`` (the engine's summary dict)."""
        final = summary.get("final") or {}
        table = Table(title=f"Run summary{': ' + self._strategy if self._strategy else ''}", show_header=False)
        table.add_column("", style="bold")
        table.add_column("", justify="right")
        target = summary.get("target_accuracy")
        table.add_row("Rounds run", str(summary.get("rounds_run", "-")) + (" (stopped early)" if summary.get("stopped_early") else ""))
        table.add_row("Final accuracy", _format_acc(final.get("test_accuracy")))
        if _finite(final.get("test_perplexity")):
            table.add_row("Final perplexity", f"{final['test_perplexity']:.2f}")
        best = _format_acc(summary.get("best_accuracy"))
        if summary.get("best_round") is not None and best != "-":
            best += f" (round {int(summary['best_round'])})"
        table.add_row("Best accuracy", best)
        if target is not None:
            reached = summary.get("reached_target_round")
            table.add_row("Target accuracy", _format_acc(target))
            table.add_row("Reached target", "no" if reached is None else f"in round {int(reached)}")
            table.add_row("Time to target", format_duration(summary.get("time_to_target")))
            table.add_row("Bytes to target", format_bytes(summary.get("bytes_to_target")))
        table.add_row("Total measured time" if self._measured else "Total simulated time", format_duration(final.get("sim_time")))
        table.add_row("Total bytes", format_bytes(final.get("cum_bytes")))
        if _finite(final.get("wall_time")):
            table.add_row("Wall time", format_duration(final.get("wall_time")))
        failures = summary.get("total_failures")
        table.add_row("Failures", str(failures if _finite(failures) else self._failures))
        if summary.get("run_dir"):
            table.add_row("Run folder", str(summary["run_dir"]))
        return table


# --------------------------------------------------------------------------------------------
# Lightning loggers
# --------------------------------------------------------------------------------------------

#: logger name in recipes -> class in ``lightning.pytorch.loggers``
LOGGERS: dict[str, str] = {
    "csv": "CSVLogger",
    "tensorboard": "TensorBoardLogger",
    "mlflow": "MLFlowLogger",
    "wandb": "WandbLogger",
}
#: what each logger needs installed (besides lightning)
_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _logger_class(name: str) -> type:
    if name not in LOGGERS:
        raise ConfigError(f"unknown logger {name!r}; valid: {', '.join(LOGGERS)}")
    import lightning.pytorch.loggers as loggers

    return getattr(loggers, LOGGERS[name])


def logger_options(name: str) -> list[str]:
    """The keyword arguments of the Lightning logger ``name`` (``csv``, ``tensorboard``, ...).

    Raises:
        ConfigError: an unknown name (listing the valid ones).
    """
    import inspect

    params = inspect.signature(_logger_class(name).__init__).parameters
    return [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]


def make_logger(name: str, options: Mapping[str, Any] | None = None, *, run_dir: str | os.PathLike[str]) -> Any:
    """A Lightning logger from a recipe's ``loggers`` entry; it writes under ``run_dir`` unless
    ``options`` say otherwise (``save_dir``; MLflow's ``tracking_uri``).

    Defaults: ``csv`` -> ``<run_dir>/csv/version_<n>/metrics.csv``; ``tensorboard`` ->
    ``<run_dir>/tensorboard/``; ``mlflow`` -> ``<run_dir>/mlruns`` with the run folder's name as
    experiment; ``wandb`` -> ``<run_dir>/wandb`` with the run folder's name as run name.

    Raises:
        ConfigError: an unknown logger or option, or a logger whose package is not installed.
    """
    cls = _logger_class(name)
    options = dict(options or {})
    valid = logger_options(name)
    for key in options:
        if key not in valid:
            raise ConfigError(f"unknown option {key!r} for the {name} logger ({cls.__name__}); valid: {', '.join(valid)}")
    run_dir = Path(run_dir)
    defaults: dict[str, Any] = {
        "csv": {"save_dir": str(run_dir), "name": "csv"},
        "tensorboard": {"save_dir": str(run_dir), "name": "tensorboard"},
        "mlflow": {"save_dir": str(run_dir / "mlruns"), "experiment_name": run_dir.name},
        "wandb": {"save_dir": str(run_dir), "name": run_dir.name},
    }[name]
    if name == "mlflow" and "tracking_uri" in options:
        defaults.pop("save_dir")
    try:
        return cls(**{**defaults, **options})
    except ModuleNotFoundError as err:
        package = _LOGGER_PACKAGES.get(name, name)
        raise ConfigError(f"the {name} logger needs the `{package}` package: pip install {package} ({err})") from None


def _numeric(value: Any) -> bool:
    return _finite(value) and not isinstance(value, bool)


class LightningLoggers:
    """Sends round records to Lightning loggers (``CSVLogger``, ``TensorBoardLogger``,
    ``MLFlowLogger``, ``WandbLogger``, or any ``lightning.pytorch.loggers.Logger``), with step = round.

    Every finite number of a round record is logged under its record key (``test_accuracy``,
    ``test_loss``, ``sim_time``, ``round_sim_time``, ``cum_bytes``, ``agg/<name>`` such as
    ``agg/mean_ratio``, ...); each client's training metrics under
    ``client_<id>/<metric>`` (``client_3/loss_after``; see :func:`client_metrics_fields`). The
    run's settings (``hparams``, else the run info) go to ``log_hyperparams`` at the start, the
    summary's numbers under ``summary/<name>`` at the end, then the loggers are finalized.

    Args:
        loggers: the Lightning loggers.
        hparams: the run's settings (e.g. the recipe as a dict).
    """

    def __init__(self, loggers: Sequence[Any], *, hparams: Mapping[str, Any] | None = None) -> None:
        self.loggers = list(loggers)
        self.hparams = dict(hparams) if hparams is not None else None
        self._last_step = 0

    def on_run_start(self, info: Mapping[str, Any]) -> None:
        params = self.hparams if self.hparams is not None else dict(info)
        for lg in self.loggers:
            lg.log_hyperparams(_jsonable(params))

    def on_round_end(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("round", 0))
        metrics = {k: float(v) for k, v in record.items() if k != "round" and _numeric(v)}
        for cid, values in (record.get("client_metrics") or {}).items():
            metrics.update({f"client_{cid}/{k}": float(v) for k, v in values.items() if _numeric(v)})
        self._last_step = step
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        numbers = {f"summary/{k}": float(v) for k, v in summary.items() if _numeric(v)}
        for lg in self.loggers:
            if numbers:
                lg.log_metrics(numbers, step=self._last_step)
            lg.finalize("success")

    def on_run_interrupted(self, info: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.finalize("interrupted")
