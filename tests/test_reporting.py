"""Tests of lightning_fedprune.reporting: summary math, metric files, plots and the progress bar."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from rich.console import Console

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.reporting import (
    PLOT_FILES,
    MetricsWriter,
    PlotWriter,
    RichProgress,
    format_bytes,
    format_duration,
    plot_comparison,
    plot_history,
    read_metrics,
    summarize,
)

torch.set_num_threads(1)

NAN = math.nan


def _record(rnd: int, acc: float, *, failures: int = 0) -> dict:
    """A round record as the engine makes it: 10 s and 1000 bytes per round."""
    return {
        "round": rnd,
        "sim_time": 10.0 * (rnd + 1),
        "round_sim_time": 10.0,
        "wall_time": 0.5 * (rnd + 1),
        "cpu_time": 0.4 * (rnd + 1),
        "bytes_up": 400,
        "bytes_down": 600,
        "cum_bytes": 1000 * (rnd + 1),
        "num_selected": 4,
        "num_results": 4 - failures,
        "num_failures": failures,
        "failures": [{"client_id": i, "kind": "dropout", "reason": "simulated"} for i in range(failures)],
        "test_loss": NAN if math.isnan(acc) else 1.0 - acc,
        "test_accuracy": acc,
        "local_acc_mean": NAN,
        "local_acc_min": NAN,
        "local_acc_max": NAN,
        "agg/num_results": float(4 - failures),
    }


def _history() -> list[dict]:
    # accuracies 0.5, (not evaluated), 0.8, 0.92, 0.9  -> target 0.9 first reached at round 3
    accs = [0.5, NAN, 0.8, 0.92, 0.9]
    return [_record(i, a, failures=1 if i == 1 else 0) for i, a in enumerate(accs)]


def _fake_run(listeners, records, *, start_round=0, num_rounds=None, target=None):
    """Drive listeners exactly as the engine does."""
    info = {
        "num_rounds": num_rounds if num_rounds is not None else len(records) + start_round,
        "start_round": start_round,
        "strategy": "FedAvg",
        "num_clients": 4,
        "run_dir": None,
    }
    for lst in listeners:
        lst.on_run_start(info)
    for rec in records:
        for lst in listeners:
            lst.on_round_end(rec)
    summary = summarize(records, target_accuracy=target)
    summary.update(stopped_early=False, run_dir=None)
    for lst in listeners:
        lst.on_run_end(summary)
    return summary


# ------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------


def test_summarize_target_reached():
    # Prepare
    records = _history()
    # Execute
    s = summarize(records, target_accuracy=0.9)
    # Assert: first record with acc >= 0.9 is round 3 (sim 40 s, 4000 bytes)
    assert s["rounds_run"] == 5
    assert s["reached_target_round"] == 3
    assert s["time_to_target"] == records[3]["sim_time"] == 40.0
    assert s["bytes_to_target"] == records[3]["cum_bytes"] == 4000
    assert s["best_accuracy"] == 0.92 and s["best_round"] == 3
    assert s["final"] == records[-1]
    assert s["total_sim_time"] == 50.0 and s["total_bytes"] == 5000
    assert s["total_failures"] == 1
    assert s["target_accuracy"] == 0.9


def test_summarize_target_exactly_equal_counts_as_reached():
    s = summarize([_record(0, 0.5), _record(1, 0.75)], target_accuracy=0.75)
    assert s["reached_target_round"] == 1 and s["time_to_target"] == 20.0


def test_summarize_target_not_reached_and_no_target():
    records = _history()
    s = summarize(records, target_accuracy=0.95)
    assert s["reached_target_round"] is None
    assert s["time_to_target"] is None and s["bytes_to_target"] is None
    s = summarize(records)
    assert s["target_accuracy"] is None and s["reached_target_round"] is None
    assert s["best_accuracy"] == 0.92


def test_summarize_no_evaluation_and_empty():
    s = summarize([_record(0, NAN), _record(1, NAN)], target_accuracy=0.5)
    assert s["best_accuracy"] is None and s["reached_target_round"] is None
    empty = summarize([])
    assert empty["rounds_run"] == 0 and empty["final"] is None and empty["total_bytes"] is None


def test_summarize_rejects_bad_target():
    with pytest.raises(ConfigError, match="target_accuracy"):
        summarize(_history(), target_accuracy=1.5)


def test_human_units():
    assert format_bytes(1_234_567) == "1.2 MB"
    assert format_bytes(None) == "-" and format_bytes(NAN) == "-"
    assert format_duration(42.0) == "42.0 s"
    assert format_duration(245) == "4m 05s"
    assert format_duration(3725) == "1h 02m 05s"
    assert format_duration(None) == "-"


# ------------------------------------------------------------------------------------------
# MetricsWriter / read_metrics
# ------------------------------------------------------------------------------------------


def test_metrics_writer_files(tmp_path):
    records = _history()
    _fake_run([MetricsWriter(tmp_path)], records, target=0.9)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[1])
    assert first["round"] == 1 and first["test_accuracy"] is None  # NaN written as null
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()

    back = read_metrics(tmp_path)
    assert [r["round"] for r in back] == [0, 1, 2, 3, 4]
    assert math.isnan(back[1]["test_accuracy"]) and back[3]["test_accuracy"] == 0.92
    assert back[1]["failures"] == records[1]["failures"]

    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5
    assert rows[1]["failures"] == "1" and rows[0]["failures"] == "0"  # failures as a count
    assert rows[1]["test_accuracy"] == ""  # NaN -> empty cell
    assert float(rows[3]["test_accuracy"]) == 0.92
    assert "agg/num_results" in rows[0]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reached_target_round"] == 3
    assert summary["time_to_target"] == 40.0 and summary["bytes_to_target"] == 4000
    assert summary["final"]["local_acc_mean"] is None


def test_metrics_writer_resume_drops_redone_rounds(tmp_path):
    records = _history()
    # first session: rounds 0..4 written
    _fake_run([MetricsWriter(tmp_path)], records)
    # the run resumes at round 3 (its checkpoint was after round 2): rounds 3, 4 are redone
    redone = [dict(records[3], test_accuracy=0.93), dict(records[4], test_accuracy=0.94)]
    _fake_run([MetricsWriter(tmp_path)], redone, start_round=3, num_rounds=5)

    back = read_metrics(tmp_path)
    assert [r["round"] for r in back] == [0, 1, 2, 3, 4]
    assert [r["test_accuracy"] for r in back][3:] == [0.93, 0.94]
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5  # the CSV covers both sessions


def test_metrics_writer_fresh_run_replaces_old_file(tmp_path):
    _fake_run([MetricsWriter(tmp_path)], _history())
    _fake_run([MetricsWriter(tmp_path)], _history()[:2])
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]


def test_read_metrics_skips_partial_line_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "test_accuracy": 0.5}\n{"round": 1, "te')
    assert [r["round"] for r in read_metrics(tmp_path)] == [0]


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_history_writes_three_pngs(tmp_path):
    paths = plot_history(_history(), tmp_path, target_accuracy=0.9)
    assert [p.name for p in paths] == list(PLOT_FILES)
    assert PLOT_FILES == ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "accuracy_vs_bytes.png")
    assert all(_is_png(p) for p in paths)


def test_plot_history_without_any_evaluation(tmp_path):
    paths = plot_history([_record(0, NAN)], tmp_path)
    assert all(_is_png(p) for p in paths)


def test_plot_writer_and_comparison(tmp_path):
    writer = PlotWriter(tmp_path)
    _fake_run([MetricsWriter(tmp_path), writer], _history(), target=0.9)
    assert [p.name for p in writer.paths] == list(PLOT_FILES)
    assert all(_is_png(tmp_path / name) for name in PLOT_FILES)

    out = plot_comparison({"a": _history(), "b": _history()[:3]}, tmp_path / "cmp" / "bytes.png", x="cum_bytes")
    assert _is_png(out)
    with pytest.raises(ConfigError, match="`x` can be round, sim_time, cum_bytes"):
        plot_comparison({"a": _history()}, tmp_path / "x.png", x="time")


# ------------------------------------------------------------------------------------------
# RichProgress
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("terminal", [False, True])
def test_rich_progress_fake_run(terminal):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=terminal, width=100, color_system=None)
    _fake_run([RichProgress(console=console)], _history(), target=0.9)
    text = buf.getvalue()
    assert "Run summary" in text
    assert "90.00%" in text  # final accuracy
    assert "92.00%" in text  # best accuracy
    assert "in round 3" in text  # target first reached in round 3 (rounds count from 0, as in the records)
    assert "92.00% (round 3)" in text  # best accuracy: the record of round 3
    assert "5.0 kB" in text  # total bytes, human units
    if not terminal:
        assert "round 4 (5/5 done)" in text  # one plain line per round, no redraws
        assert "\x1b[" not in text


def test_rich_progress_disabled_prints_nothing():
    buf = io.StringIO()
    _fake_run([RichProgress(console=Console(file=buf), disable=True)], _history())
    assert buf.getvalue() == ""


def test_plots_have_a_title_a_measured_time_axis_for_deployments_and_no_zero_bytes_tick(tmp_path, monkeypatch):
    from lightning_fedprune import reporting

    seen = []
    real = reporting._new_axes

    def spy(x, metric, **kw):
        fig, ax = real(x, metric, **kw)
        seen.append((x, ax))
        return fig, ax

    monkeypatch.setattr(reporting, "_new_axes", spy)
    writer = PlotWriter(tmp_path / "my_run")
    writer.on_run_start({"start_round": 0, "strategy": "FedAvg", "transport": "fedml"})
    for rec in _history():
        writer.on_round_end(rec)
    writer.on_run_end({"target_accuracy": None})
    axes = dict(seen)
    assert all(ax.get_title() == "my_run: FedAvg" for ax in axes.values())
    assert axes["sim_time"].get_xlabel() == "measured time (s)"
    assert reporting._bytes_tick(0) == "0" and reporting._bytes_tick(2500) == "2.5 kB" and reporting._bytes_tick(-1) == ""
