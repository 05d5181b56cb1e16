"""NestFL's experiments at CPU scale: our numbers beside the paper's claims, plus plots.

    python recipes/nestfl/experiments.py fig2 [--dataset digits|har|mnist|cifar10_subset] [--noniid 0.8]
        test accuracy vs rounds: NestFL against FedAvg, Per-FedAvg (FO and HF), HeteroFL (fix and
        dynamic rates) and Hermes, and NestFL's ablations (plain sample weighting; a fixed per-device rate table)
    python recipes/nestfl/experiments.py fig3 [--dataset ...]
        normalized communication cost vs normalized training time (measured payload bytes and
        the simulated clock), for the same variants
    python recipes/nestfl/experiments.py all

Options: ``--quick`` (a smoke run), ``--clients N`` (5 as in the paper; 20-50 for the larger
variant), ``--rounds N``, ``--out runs/nestfl``, ``--set key=value`` (every variant), ``--resume``.

The paper's claims (Figs. 2-3; it prints no numbers): NestFL reaches higher accuracy in fewer
rounds than FedAvg, Per-FedAvg, HeteroFL and Hermes, and costs less communication and training
time. Every variant runs on the same data, the same simulated devices (seeded speeds, bandwidths and
memory, see the recipes) and the same simulated clock. Per-FedAvg's inner step ``alpha`` is the
local learning rate (``model.lr``); Hermes prunes each client's sub-network by 0.1 of the channels
toward rate 0.5 whenever its local accuracy is at least 0.5. Personalized methods (NestFL, Per-FedAvg,
Hermes) are also reported with their per-client local accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.experiments import format_table, plot_variants, run_variants  # noqa: E402

DATASETS = {
    "digits": ("digits.yaml", []),
    "har": ("har.yaml", []),
    "mnist": ("digits.yaml", ["data.name=mnist", "model.name=cnn_mnist", "devices.memory_mb=[4.0, 32.0]"]),
    "cifar10_subset": ("digits.yaml", ["data.name=cifar10_subset", "model.name=vgg11_bn", "model.lr=0.02", "devices.memory_mb=[16.0, 256.0]"]),
}
FEDAVG = ["strategy.name=fedavg", "strategy.options={}"]
HETEROFL_FIX = ["strategy.name=heterofl", "strategy.options={assignment: fix, levels: [0.0, 0.25, 0.5, 0.75]}"]
HETEROFL_DYN = ["strategy.name=heterofl", "strategy.options={assignment: dynamic, levels: [0.0, 0.25, 0.5, 0.75]}"]
PERFEDAVG_FO = ["strategy.name=perfedavg", "strategy.options={variant: fo, alpha: 0.05}"]
PERFEDAVG_HF = ["strategy.name=perfedavg", "strategy.options={variant: hf, alpha: 0.05}"]
HERMES = ["strategy.name=hermes", "strategy.options={target_rate: 0.5, prune_step: 0.1, accuracy_threshold: 0.5}"]
VARIANTS = {
    "NestFL": [],
    "FedAvg": FEDAVG,
    "Per-FedAvg (FO)": PERFEDAVG_FO,
    "Per-FedAvg (HF)": PERFEDAVG_HF,
    "HeteroFL (fix)": HETEROFL_FIX,
    "HeteroFL (dynamic)": HETEROFL_DYN,
    "Hermes": HERMES,
    "NestFL, sample weights": ["strategy.options.weighting=samples"],
    "NestFL, fixed rates": ["strategy.options.fixed_rates={0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}"],
}
PAPER = {
    "NestFL": "highest accuracy, fewest rounds; least communication and time (Figs. 2-3)",
    "FedAvg": "below NestFL",
    "HeteroFL (fix)": "below NestFL",
    "HeteroFL (dynamic)": "below NestFL",
    "Per-FedAvg (FO)": "below NestFL",
    "Per-FedAvg (HF)": "below NestFL",
    "Hermes": "below NestFL",
}
QUICK = ["rounds=3", "strategy.local_steps=3"]


def run(name: str, args: argparse.Namespace) -> str:
    recipe, ds = DATASETS[args.dataset]
    base = RecipeConfig.from_yaml(HERE / recipe)
    common = [*ds, f"data.num_clients={args.clients}", *(QUICK if args.quick else []), *args.set]
    if args.noniid is not None and args.dataset != "har":
        common += ["data.partition=dominant_label", f"data.partition_options={{dominant_fraction: {args.noniid}}}"]
    if args.rounds:
        common.append(f"rounds={args.rounds}")
    variants = {label: [*ov, *common] for label, ov in VARIANTS.items()}
    if args.clients != 5:  # the fixed table names 5 clients
        variants.pop("NestFL, fixed rates")
    out = Path(args.out) / f"{name}_{args.dataset}_{args.clients}"
    results = run_variants(base, variants, out_dir=out, resume=args.resume)
    lines = [format_table(results, paper=PAPER, title=f"NestFL {name}: {args.dataset}, {args.clients} clients", paper_header="paper's claim")]
    for label, r in results.items():
        h = r.history
        lines.append(
            f"  {label}: personalized accuracy (last round, participants) mean {h[-1].get('local_acc_mean', float('nan')):.4f} "
            f"min {h[-1].get('local_acc_min', float('nan')):.4f} max {h[-1].get('local_acc_max', float('nan')):.4f}"
        )
    if name == "fig3":
        ref = results["FedAvg"].history[-1]
        for label, r in results.items():
            last = r.history[-1]
            lines.append(
                f"  {label}: communication {last['cum_bytes'] / ref['cum_bytes']:.3f} x FedAvg's, "
                f"training time {last['sim_time'] / ref['sim_time']:.3f} x FedAvg's (normalized, after {len(r.history)} rounds)"
            )
        plots = [plot_variants(results, out / "accuracy_vs_cum_bytes.png", x="cum_bytes"),
                 plot_variants(results, out / "accuracy_vs_sim_time.png", x="sim_time")]
    else:
        plots = [plot_variants(results, out / "accuracy_vs_round.png", x="round")]
    lines.append("plots: " + ", ".join(str(p) for p in plots))
    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["fig2", "fig3", "all"])
    parser.add_argument("--dataset", choices=list(DATASETS), default="digits")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--noniid", type=float, default=None, help="dominant-label fraction (non-IID by sorting by class)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default="runs/nestfl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    for name in (["fig2", "fig3"] if args.experiment == "all" else [args.experiment]):
        print(run(name, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
