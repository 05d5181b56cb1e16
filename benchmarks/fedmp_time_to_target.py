"""Simulated time to the CNN/MNIST target: FedMP (E-UCB) and the matched-ratio oracle against Syn-FL.

Per seed, three variants share the data, the initial model and the devices (FedMP's High
heterogeneity scenario by default: 3 workers from cluster A, 3 from B, 4 from C), on the paper's
CNN (``cnn_mnist``: two 5x5 convolutions without padding, FC 256, 317,066 parameters):

* ``Syn-FL``: FedAvg, synchronous rounds (the slowest worker ends the round);
* ``Oracle``: FedMP with fixed capability-matched ratios
  (:func:`lightning_fedprune.experiments.matched_ratios`, computed from the device profiles that
  E-UCB never sees), in the recipe's round mode;
* ``FedMP``: the recipe as it is: E-UCB ratios, deadline rounds (1.5 d at 85% of arrivals).

The local work is small (5 steps, lr 0.005, no momentum) so that reaching 90% takes a couple of
hundred rounds, giving E-UCB rounds to learn in.

    python benchmarks/fedmp_time_to_target.py [--seeds 0 1 2] [--scenario high] [--target 0.9]
        [--variants Syn-FL,Oracle,FedMP] [--resume] [--set key=value ...]

Needs MNIST under the data root. Prints per seed the table and the median ratio per cluster per
100 rounds (learned vs matched); the last line is machine-readable:
``fedmp_time_to_target eucb_speedup=<median> oracle_speedup=<median> seeds=<n>``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.experiments import compare_fedmp, format_table, plot_variants  # noqa: E402

VARIANTS = ("Syn-FL", "Oracle", "FedMP")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="high", choices=["low", "medium", "high"])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--out", default="runs/bench_fedmp_time_to_target")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs and continue interrupted ones")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every variant")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    base = RecipeConfig.from_yaml(ROOT / "recipes" / "fedmp" / "cnn_mnist.yaml")
    speedups: dict[str, list[float]] = {"FedMP": [], "Oracle": []}
    for seed in args.seeds:
        common = [
            f"seed={seed}", f"devices.scenario={args.scenario}", f"target_accuracy={args.target}", f"rounds={args.rounds}",
            "model.momentum=0.0", "model.lr=0.005", "strategy.local_steps=5", "eval_every=5", "checkpoint_every=25", *args.set,
        ]
        out = Path(args.out) / f"seed{seed}"
        cmp = compare_fedmp(
            base, common, {"FedMP": []} if "FedMP" in chosen else {}, out_dir=out,
            syn="Syn-FL" in chosen, oracle="Oracle" in chosen, resume=args.resume,
        )
        print(format_table(cmp.results, title=f"seed {seed}: CNN on MNIST, {args.scenario} heterogeneity, target {args.target:.0%}"))
        plot_variants(cmp.results, out / "accuracy_vs_time.png", target_accuracy=args.target)
        for name in speedups:
            if name in cmp.speedups:
                speedups[name].append(cmp.speedups[name])
        print(f"seed {seed}: " + ", ".join(f"{k} speed-up {v:.2f}x" for k, v in cmp.speedups.items()))
        matched = cmp.matched_by_cluster()
        print("  matched median ratio per cluster: " + ", ".join(f"{k} {v:.2f}" for k, v in matched.items()))
        for row in cmp.learned.get("FedMP", []):
            print(f"  FedMP rounds {row['rounds']}: " + ", ".join(
                f"{k} {row[k]:.2f} ({row[k] - matched[k]:+.2f})" if row[k] is not None else f"{k} -" for k in cmp.clusters))
        summary = {
            "seed": seed, "matched": cmp.matched, "matched_by_cluster": matched, "speedups": cmp.speedups,
            "learned_by_cluster": cmp.learned.get("FedMP"),
            "time_to_target": {k: r.summary.get("time_to_target") for k, r in cmp.results.items()},
            "rounds_to_target": {k: r.summary.get("reached_target_round") for k, r in cmp.results.items()},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    med = {k: statistics.median(v) if v else math.nan for k, v in speedups.items()}
    print(f"fedmp_time_to_target eucb_speedup={med['FedMP']:.2f} oracle_speedup={med['Oracle']:.2f} seeds={len(args.seeds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
