"""Simulated time to the CNN/MNIST target: FedMP against Syn-FL (FedAvg) in one run.

Both variants share the seed, the data, the initial model and the devices (FedMP's High
heterogeneity scenario by default: 3 workers from cluster A, 3 from B, 4 from C). The default
settings use small local work (5 steps, lr 0.005) so that reaching 90% takes on the order of a
hundred rounds, giving E-UCB rounds to learn in.

    python benchmarks/fedmp_time_to_target.py [--scenario high] [--target 0.9] [--set key=value ...]

Needs MNIST under the data root. The last line is machine-readable:
``fedmp_time_to_target scenario=high synfl_s=.. fedmp_s=.. speedup=..``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.experiments import format_table, plot_variants, run_variants  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="high", choices=["low", "medium", "high"])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", default="runs/bench_fedmp_time_to_target")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to both variants")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = RecipeConfig.from_yaml(ROOT / "recipes" / "fedmp" / "cnn_mnist.yaml")
    common = [
        f"devices.scenario={args.scenario}", f"target_accuracy={args.target}", f"rounds={args.rounds}",
        "model.momentum=0.0", "model.lr=0.005", "strategy.local_steps=5", "eval_every=5", "checkpoint_every=50", *args.set,
    ]
    results = run_variants(
        base,
        {"Syn-FL": ["strategy.name=fedavg", "strategy.options={}", *common], "FedMP": common},
        out_dir=args.out,
    )
    print(format_table(results, title=f"CNN on MNIST, {args.scenario} heterogeneity, target {args.target:.0%}"))
    plot_variants(results, Path(args.out) / "accuracy_vs_time.png", target_accuracy=args.target)
    syn, fedmp = (results[k].summary.get("time_to_target") for k in ("Syn-FL", "FedMP"))
    speedup = syn / fedmp if syn and fedmp else float("nan")
    print(f"fedmp_time_to_target scenario={args.scenario} synfl_s={syn} fedmp_s={fedmp} speedup={speedup:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
