"""Sensitivity of FedMP's E-UCB: local steps, discount, granularity and heterogeneity.

For every scenario (Low / Medium / High) and number of local steps tau, one cell runs Syn-FL,
the capability-matched fixed-ratio oracle and one FedMP variant per (lambda, theta), all on the
paper's CNN (``cnn_mnist``, recipes/fedmp/cnn_mnist.yaml: deadline rounds, bounded reward), small
learning rate (0.005, no momentum) so that 90% takes long enough to learn in, up to ``--rounds``
rounds (500 by default). It reports per cell E-UCB's speed-up against Syn-FL next to the oracle's
(and the fraction of the oracle's speed-up E-UCB reaches), and how close the learned ratios come
to the matched ones: the median ratio per cluster per 100 rounds. Runs evaluate every
``max(1, 25 // tau)`` rounds (every 5th at tau 5, every round from tau 20, where 90% takes
10-50 rounds), so a time to target is exact to that many rounds.

    python recipes/fedmp/sensitivity.py                     # the whole grid (3 x 3 x 6 FedMP runs; hours)
    python recipes/fedmp/sensitivity.py --quick             # one cell, 3 rounds (a smoke run)
    python recipes/fedmp/sensitivity.py --scenarios high --taus 5 --discounts 0.99 --thetas 0.05

Options: ``--seed``, ``--rounds N``, ``--target``, ``--out runs/fedmp_sensitivity``,
``--resume`` (finished runs are reused), ``--set key=value`` (every variant), ``--fedmp-set
key=value`` (the FedMP variants only, and part of their labels), e.g. ``--fedmp-set
strategy.options.start_low=true``.
Writes under ``--out`` one folder per cell (``<scenario>_tau<tau>``) with its ``table.txt``, an
accuracy-vs-time plot and ``ratios_<scenario>_tau<tau>.png`` (learned per-cluster medians against
the matched ratios), and ``table.txt`` with every cell of the invocation. Cells can run in
separate invocations (side by side, or a few variants at a time with ``--resume``): each cell's
own table is written by the invocation that ran it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.experiments import compare_fedmp, format_table, plot_variants  # noqa: E402

GRID = {"scenarios": ["low", "medium", "high"], "taus": [5, 20, 50], "discounts": [0.95, 0.99, 0.995], "thetas": [0.01, 0.05]}
QUICK = {"scenarios": ["high"], "taus": [5], "discounts": [0.995], "thetas": [0.05]}


def _label(discount: float, theta: float, extra: list[str]) -> str:
    return " ".join([f"FedMP l={discount} th={theta}", *(kv.split(".")[-1] for kv in extra)])


def eval_every(tau: int) -> int:
    """Rounds between evaluations: a time to target is only as exact as this (τ = 5 reaches 90% in
    about 100-300 rounds: every 5th; τ ≥ 20 in 10-50: every round)."""
    return max(1, 25 // tau)


def _speedup(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "- (target not reached)"


def _share(value: float, oracle: float) -> str:
    return f", {value / oracle:.0%} of it" if math.isfinite(value) and math.isfinite(oracle) and oracle > 0 else ""


def _plot_ratios(cmp, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"A": "tab:green", "B": "tab:orange", "C": "tab:red"}
    matched = cmp.matched_by_cluster()
    for label, rows in cmp.learned.items():
        for cluster in cmp.clusters:
            xs = [int(r["rounds"].split("-")[0]) + 50 for r in rows if r[cluster] is not None]
            ys = [r[cluster] for r in rows if r[cluster] is not None]
            ax.plot(xs, ys, marker="o", alpha=0.6, color=colors.get(cluster), label=f"{label} {cluster}")
    for cluster, value in matched.items():
        ax.axhline(value, ls="--", color=colors.get(cluster), label=f"matched {cluster}")
    ax.set_xlabel("round (middle of each 100-round window)")
    ax.set_ylabel("median pruning ratio")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_cell(scenario: str, tau: int, args: argparse.Namespace, grid: dict) -> list[str]:
    base = RecipeConfig.from_yaml(HERE / "cnn_mnist.yaml")
    common = [
        f"seed={args.seed}", f"devices.scenario={scenario}", f"strategy.local_steps={tau}", f"rounds={args.rounds}",
        f"target_accuracy={args.target}", "model.momentum=0.0", "model.lr=0.005", f"eval_every={eval_every(tau)}", "checkpoint_every=25",
        *(["data.eval_batch_size=2000"] if args.quick else []), *args.set,
    ]
    variants = {
        _label(d, t, args.fedmp_set): [f"strategy.options.discount={d}", f"strategy.options.theta={t}", *args.fedmp_set]
        for d in grid["discounts"] for t in grid["thetas"]
    }
    out = Path(args.out) / f"{scenario}_tau{tau}"
    cmp = compare_fedmp(base, common, variants, out_dir=out, resume=args.resume)
    title = f"{scenario} heterogeneity, tau={tau}"
    plot_variants(cmp.results, out / "accuracy_vs_time.png", target_accuracy=args.target)
    _plot_ratios(cmp, out / f"ratios_{scenario}_tau{tau}.png", title)
    lines = [format_table(cmp.results, title=f"{title}, target {args.target:.0%}")]
    oracle = cmp.speedups.get("Oracle", math.nan)
    matched = cmp.matched_by_cluster()
    lines.append("  matched median ratio: " + ", ".join(f"{k} {v:.2f}" for k, v in matched.items()))
    for label in variants:
        s = cmp.speedups.get(label, math.nan)
        lines.append(f"  {label}: speed-up {_speedup(s)} (oracle {_speedup(oracle)}{_share(s, oracle)})")
        for row in cmp.learned.get(label, []):
            lines.append(f"    rounds {row['rounds']}: " + ", ".join(
                f"{k} {row[k]:.2f} ({row[k] - matched[k]:+.2f})" if row[k] is not None else f"{k} -" for k in cmp.clusters))
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one cell (high, tau 5, lambda 0.995, theta 0.05), 3 rounds")
    parser.add_argument("--scenarios", nargs="+", choices=GRID["scenarios"], default=None)
    parser.add_argument("--taus", nargs="+", type=int, default=None)
    parser.add_argument("--discounts", nargs="+", type=float, default=None)
    parser.add_argument("--thetas", nargs="+", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="horizon (default 500; 3 with --quick)")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--out", default="runs/fedmp_sensitivity")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="every variant")
    parser.add_argument("--fedmp-set", action="append", default=[], metavar="KEY=VALUE", help="the FedMP variants only (named in their labels)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    grid = dict(QUICK if args.quick else GRID)
    for key in GRID:
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 500
    lines = []
    for scenario in grid["scenarios"]:
        for tau in grid["taus"]:
            cell = run_cell(scenario, tau, args, grid)
            print("\n".join(cell), flush=True)
            lines += cell
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
