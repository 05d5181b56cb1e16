"""Run several variants of one recipe and compare them (the paper experiments' driver).

A *variant* is a label and a list of ``key=value`` overrides of a base recipe (the same syntax as
``python -m lightning_fedprune run RECIPE --set key=value``)::

    base = RecipeConfig.from_yaml("recipes/fedmp/cnn_mnist.yaml")
    results = run_variants(base, {
        "Syn-FL": ["strategy.name=fedavg"],
        "FedMP": ["strategy.name=fedmp"],
    }, out_dir="runs/table3")
    print(format_table(results, paper={"Syn-FL": "93.83%", "FedMP": "97.17%"}))
    plot_variants(results, "runs/table3/accuracy_vs_time.png", x="sim_time")

Each variant runs in its own folder under ``out_dir`` with the usual metrics, plots and
checkpoint, so an interrupted comparison resumes where it stopped (``resume=True``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_fedprune.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["VariantResult", "run_variants", "format_table", "plot_variants", "metric_at_time"]


@dataclass
class VariantResult:
    """One variant's outcome: its label, overrides, run summary and round records."""

    label: str
    overrides: tuple[str, ...]
    summary: dict[str, Any]
    history: list[dict[str, Any]]


def _slug(label: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label.strip())
    return out.strip("_") or "variant"


def run_variants(
    base: Any,
    variants: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    progress: bool = False,
) -> dict[str, VariantResult]:
    """Run every variant of ``base`` (a :class:`~lightning_fedprune.config.RecipeConfig`).

    Args:
        base: the base recipe.
        variants: label -> overrides (``"key=value"`` strings) applied to ``base``.
        out_dir: each variant runs in ``out_dir/<label>``.
        resume: continue variants from their checkpoints.
        progress: show a progress bar per run.

    Returns:
        label -> :class:`VariantResult`, in the order given.
    """
    from lightning_fedprune.config import default_listeners
    from lightning_fedprune.simulation import build_run

    if not variants:
        raise ConfigError("`variants` is empty: give at least one {label: [overrides]}")
    out = Path(out_dir)
    results: dict[str, VariantResult] = {}
    for label, overrides in variants.items():
        run_dir = out / _slug(label)
        cfg = base.apply_overrides([*overrides, f"run_dir={run_dir}"])
        engine, rounds = build_run(cfg, listeners=default_listeners(run_dir, progress=progress))
        log.info("variant %r: %s", label, " ".join(overrides) or "(base recipe)")
        summary = engine.run(rounds, resume=resume)
        results[label] = VariantResult(label, tuple(overrides), summary, list(engine.history))
    return results


def _fmt(value: Any, kind: str) -> str:
    from lightning_fedprune.reporting import format_bytes, format_duration

    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "time":
        return format_duration(value)
    if kind == "bytes":
        return format_bytes(value)
    if kind == "acc":
        return f"{100 * value:.2f}%"
    if kind == "ppl":
        return f"{value:.1f}"
    return str(value)


def metric_at_time(history: Sequence[Mapping[str, Any]], budget: float, metric: str = "test_accuracy") -> float | None:
    """The last evaluated ``metric`` of a run whose simulated time is within ``budget`` seconds."""
    value = None
    for rec in history:
        v = rec.get(metric)
        if rec.get("sim_time", math.inf) <= budget and isinstance(v, float) and math.isfinite(v):
            value = v
    return value


def format_table(
    results: Mapping[str, VariantResult],
    *,
    paper: Mapping[str, str] | None = None,
    paper_header: str = "paper",
    title: str = "",
    perplexity: bool = False,
    budget: float | None = None,
) -> str:
    """A plain-text table: per variant the target round / time / bytes, best and final metric,
    the metric at a simulated-time ``budget`` (when given), and the paper's number beside ours
    (``paper``: label -> the paper's value as text)."""
    metric = "perplexity" if perplexity else "accuracy"
    header = ["variant", "rounds", "to target (round)", "time to target", "bytes to target", f"best {metric}", f"final {metric}"]
    if budget is not None:
        header.append(f"{metric} @ {_fmt(budget, 'time')}")
    if paper:
        header.append(paper_header)
    rows = [header]
    for label, res in results.items():
        s = res.summary
        final = s.get("final") or {}
        if perplexity:
            ppl = [r.get("test_perplexity") for r in res.history if isinstance(r.get("test_perplexity"), float)]
            ppl = [p for p in ppl if math.isfinite(p)]
            best, last = (min(ppl) if ppl else None), (ppl[-1] if ppl else None)
            kind = "ppl"
        else:
            best, last, kind = s.get("best_accuracy"), final.get("test_accuracy"), "acc"
        row = [
            label,
            str(s.get("rounds_run", "-")),
            _fmt(s.get("reached_target_round"), "int"),
            _fmt(s.get("time_to_target"), "time"),
            _fmt(s.get("bytes_to_target"), "bytes"),
            _fmt(best, kind),
            _fmt(last, kind),
        ]
        if budget is not None:
            key = "test_perplexity" if perplexity else "test_accuracy"
            row.append(_fmt(metric_at_time(res.history, budget, key), kind))
        if paper:
            row.append(paper.get(label, "-"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [title] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_variants(
    results: Mapping[str, VariantResult],
    out_path: str | os.PathLike[str],
    *,
    x: str = "sim_time",
    metric: str = "test_accuracy",
    target_accuracy: float | None = None,
) -> Path:
    """One line per variant (``metric`` against ``round``, ``sim_time`` or ``cum_bytes``)."""
    from lightning_fedprune.reporting import plot_comparison

    return plot_comparison({k: v.history for k, v in results.items()}, out_path, x=x, metric=metric, target_accuracy=target_accuracy)
