"""Server optimizers compared on the CIFAR-10 subset (ResNet-32, 10 clients, Dirichlet(0.5)).

FedAvg against FedAvgM, FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021), each a wrapper around the same FedAvg aggregate (``strategy.wrappers``)::

    python recipes/server_optimizers.py                 # 30 rounds each (CPU: hours; see --quick)
    python recipes/server_optimizers.py --quick         # 4 rounds of 10 local steps each: a smoke run
    python recipes/server_optimizers.py --inner fedmp   # the same optimizers around FedMP's R2SP aggregate

Options: ``--out runs/server_optimizers``, ``--rounds N``, ``--set key=value`` (every variant),
``--resume``. Writes one run folder per variant and ``accuracy_vs_round.png`` beside them.
Server learning rates follow the ranges the paper found best on CIFAR-10 (10^-2 for Adam/Yogi,
10^-1 for Adagrad, tau = 10^-3; server momentum 0.9 with learning rate 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.experiments import format_table, plot_variants, run_variants  # noqa: E402

VARIANTS = {
    "FedAvg": [],
    "FedAvgM": ["strategy.wrappers=[{name: fedavgm, options: {server_lr: 1.0, momentum: 0.9}}]"],
    "FedAdagrad": ["strategy.wrappers=[{name: fedadagrad, options: {server_lr: 0.1, tau: 0.001}}]"],
    "FedAdam": ["strategy.wrappers=[{name: fedadam, options: {server_lr: 0.01, tau: 0.001}}]"],
    "FedYogi": ["strategy.wrappers=[{name: fedyogi, options: {server_lr: 0.01, tau: 0.001}}]"],
}
QUICK = ["rounds=4", "strategy.local_steps=10"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds of 10 local steps (a smoke run)")
    parser.add_argument("--inner", default="fedavg", help="the wrapped strategy (fedavg, fedmp, prunefl, ...)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default="runs/server_optimizers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = RecipeConfig.from_yaml(HERE / "cifar10_subset_fedavg.yaml")
    extra = [*(QUICK if args.quick else []), f"strategy.name={args.inner}", *args.overrides]
    if args.rounds is not None:
        extra.append(f"rounds={args.rounds}")
    base = base.apply_overrides(extra)
    results = run_variants(base, VARIANTS, out_dir=args.out, resume=args.resume, progress=True)
    print(format_table(results, title=f"Server optimizers around {args.inner} on the CIFAR-10 subset (ResNet-32)"))
    plot_variants(results, Path(args.out) / "accuracy_vs_round.png", x="round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
