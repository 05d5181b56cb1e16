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

__all__ = [
    "VariantResult",
    "run_variants",
    "format_table",
    "plot_variants",
    "metric_at_time",
    "matched_ratios",
    "match_ratios",
    "round_time_table",
    "client_ratio_medians",
    "FedMPComparison",
    "compare_fedmp",
    "SYN_FL",
]

#: overrides that turn a FedMP recipe into Syn-FL: FedAvg with its own synchronous rounds
SYN_FL = ("strategy.name=fedavg", "strategy.options={}", "engine.mode=sync")


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


def round_time_table(cfg: Any, *, step: float = 0.01, max_ratio: float = 0.95) -> tuple[list[float], list[list[float]]]:
    """Every simulated worker's round time at every pruning ratio of a grid.

    The time of worker ``c`` at ratio ``r`` is :func:`~lightning_fedprune.core.devices.round_time`
    of the sub-model's bytes both ways and its training FLOPs for one round of the recipe's
    local work (``strategy.local_steps`` steps of ``data.batch_size`` examples), on the recipe's
    devices, for the recipe's initial model.

    Returns:
        ``(grid, seconds)``: the ratios ``0, step, 2 step, ... <= max_ratio`` and
        ``seconds[c][i]``, worker ``c``'s round time at ``grid[i]``.

    Raises:
        ConfigError: ``strategy.local_steps`` is not set, the strategy has no pruning planner, or
            a bad ``step`` / ``max_ratio``.
    """
    import copy

    from lightning_fedprune.config import build_parts
    from lightning_fedprune.core.devices import round_time
    from lightning_fedprune.core.plans import resize_module
    from lightning_fedprune.runtime import count_flops_per_example

    if not (0.0 < step <= max_ratio < 1.0):
        raise ConfigError(f"`step` and `max_ratio` must satisfy 0 < step <= max_ratio < 1, got step={step}, max_ratio={max_ratio}")
    steps = cfg.strategy.local_steps
    if steps is None:
        raise ConfigError("matched_ratios needs `strategy.local_steps` (the local work of one round)")
    parts = build_parts(cfg)
    planner = getattr(parts.strategy, "planner", None)
    if planner is None:
        raise ConfigError(f"matched_ratios needs a strategy that sends sub-models (e.g. fedmp), got {cfg.strategy.name!r}")
    state = parts.strategy.global_state
    example = parts.module.federated_example_input()
    examples = steps * cfg.data.batch_size
    grid = [round(i * step, 10) for i in range(int(max_ratio / step + 1e-9) + 1)]
    cost = []  # (payload bytes, training FLOPs) per grid point
    for ratio in grid:
        plan = planner.plan(state, ratio)
        sub = plan.extract(state)
        payload = sum(t.numel() * t.element_size() for t in sub.values())
        module = copy.deepcopy(parts.module)
        resize_module(module, plan.sub_shapes())
        cost.append((payload, 3.0 * count_flops_per_example(module, example) * examples))
    seconds = [[round_time(dev, flops=f, bytes_down=b, bytes_up=b) for b, f in cost] for dev in parts.devices]
    return grid, seconds


def matched_ratios(cfg: Any, *, step: float = 0.01, max_ratio: float = 0.95) -> dict[int, float]:
    """The capability-matched fixed pruning ratios of a recipe's simulated devices (an oracle).

    Every worker gets the smallest ratio on the grid of :func:`round_time_table` whose simulated
    round time is at most ``T*``, the round time of the fastest worker with the full model; a
    worker that cannot reach ``T*`` gets the largest ratio of the grid. This is the equilibrium
    Eq. 8 aims at (every worker finishes with the others, with as little pruning as that allows)
    computed from the device profiles that FedMP itself never sees. The recipe's strategy must
    send sub-models (e.g. ``fedmp``); its local work must be ``strategy.local_steps``.

    Returns:
        client id -> ratio.

    Raises:
        ConfigError: as :func:`round_time_table`.
    """
    return match_ratios(*round_time_table(cfg, step=step, max_ratio=max_ratio))


def match_ratios(grid: Sequence[float], seconds: Sequence[Sequence[float]]) -> dict[int, float]:
    """The rule of :func:`matched_ratios` on a :func:`round_time_table`: each worker's smallest
    ratio of ``grid`` whose time is at most the fastest worker's time at ``grid[0]`` (else the
    last ratio)."""
    t_star = min(row[0] for row in seconds)
    out = {}
    for c, row in enumerate(seconds):
        fits = [r for r, t in zip(grid, row) if t <= t_star * (1 + 1e-9)]
        out[c] = fits[0] if fits else grid[-1]
    return out


def client_ratio_medians(
    history: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[int]], *, window: int = 100
) -> list[dict[str, Any]]:
    """Median pruning ratio per group of clients per ``window`` rounds, from FedMP's round records.

    Reads the ``agg/ratio/<client>`` fields (the ratio each client trained at, late ones included).

    Returns:
        one row per window: ``{"rounds": "0-99", <group>: median or None, ...}``.
    """
    import statistics

    if window < 1:
        raise ConfigError(f"`window` must be >= 1, got {window}")
    rows: list[dict[str, Any]] = []
    if not history:
        return rows
    last = max(int(rec["round"]) for rec in history)
    for start in range(0, last + 1, window):
        recs = [r for r in history if start <= int(r["round"]) < start + window]
        row: dict[str, Any] = {"rounds": f"{start}-{min(start + window, last + 1) - 1}"}
        for name, clients in groups.items():
            vals = [float(r[f"agg/ratio/{c}"]) for r in recs for c in clients if f"agg/ratio/{c}" in r]
            row[name] = statistics.median(vals) if vals else None
        rows.append(row)
    return rows


@dataclass
class FedMPComparison:
    """One seed's comparison of FedMP variants with Syn-FL and the matched-ratio oracle.

    Attributes:
        results: label -> :class:`VariantResult` (``"Syn-FL"``, ``"Oracle"``, the FedMP labels).
        matched: client id -> the oracle's ratio (:func:`matched_ratios`).
        clusters: cluster name -> client ids (FedMP's device scenarios).
        speedups: label -> Syn-FL's time to target / the label's (NaN when either did not reach it
            or Syn-FL was not run).
        learned: FedMP label -> :func:`client_ratio_medians` rows (median ratio per cluster per
            100 rounds).
    """

    results: dict[str, VariantResult]
    matched: dict[int, float]
    clusters: dict[str, list[int]]
    speedups: dict[str, float]
    learned: dict[str, list[dict[str, Any]]]

    def matched_by_cluster(self) -> dict[str, float]:
        """The oracle's median ratio per cluster."""
        import statistics

        return {k: statistics.median(self.matched[c] for c in v) for k, v in self.clusters.items()}


def compare_fedmp(
    base: Any,
    common: Sequence[str],
    fedmp_variants: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike[str],
    syn: bool = True,
    oracle: bool = True,
    resume: bool = False,
) -> FedMPComparison:
    """Run Syn-FL (:data:`SYN_FL`), the oracle (FedMP with :func:`matched_ratios`) and FedMP
    variants of a FedMP recipe on FedMP's device scenarios, and compare their times to target.

    Args:
        base: a FedMP recipe (:class:`~lightning_fedprune.config.RecipeConfig`) with
            ``devices.scenario`` set (after ``common``).
        common: overrides applied to every variant (seed, scenario, local work, ...).
        fedmp_variants: label -> overrides of a FedMP variant (``[]``: the recipe as it is).
        out_dir: each variant runs in ``out_dir/<label>``.
        syn / oracle: run Syn-FL / the oracle (skip one to run the variants piecewise with
            ``resume``).
        resume: reuse finished runs and continue interrupted ones.

    Raises:
        ConfigError: the recipe has no FedMP device scenario, or a bad variant.
    """
    from lightning_fedprune.core.devices import fedmp_device_specs

    cfg = base.apply_overrides(list(common))
    if cfg.devices.scenario is None:
        raise ConfigError("compare_fedmp needs `devices.scenario` (low, medium or high) to name the clusters")
    clusters: dict[str, list[int]] = {}
    for d in fedmp_device_specs(cfg.devices.scenario, seed=cfg.seed):
        clusters.setdefault(d.cluster, []).append(d.client)
    matched = matched_ratios(cfg)
    variants: dict[str, list[str]] = {}
    if syn:
        variants["Syn-FL"] = [*SYN_FL, *common]
    if oracle:
        ratios = ", ".join(f"{c}: {r}" for c, r in matched.items())
        variants["Oracle"] = [*common, f"strategy.options.fixed_ratios={{{ratios}}}"]
    for label, overrides in fedmp_variants.items():
        if label in ("Syn-FL", "Oracle"):
            raise ConfigError(f"FedMP variant label {label!r} is taken; choose another")
        variants[label] = [*common, *overrides]
    results = run_variants(base, variants, out_dir=out_dir, resume=resume) if variants else {}
    syn_time = results["Syn-FL"].summary.get("time_to_target") if "Syn-FL" in results else None
    speedups = {}
    for label, res in results.items():
        if label != "Syn-FL":
            t = res.summary.get("time_to_target")
            speedups[label] = syn_time / t if syn_time and t else math.nan
    learned = {label: client_ratio_medians(results[label].history, clusters) for label in fedmp_variants if label in results}
    return FedMPComparison(results, matched, clusters, speedups, learned)
