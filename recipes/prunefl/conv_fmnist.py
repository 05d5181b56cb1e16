"""PruneFL Sec. 5.2 / Figs. 9-10: Conv-FashionMNIST, one-shot initial pruning at levels 10/20/30.

Conv-FashionMNIST (Table 1: convolutions 32, pool, 64, pool; FC 2304x300x100x10) on
Fashion-MNIST with 5 i.i.d. clients (5 local steps of batch 20, SGD lr 0.25); rates conv 5%/10%
and FC 20%/20%/10% per level (convolutions are masked, FC layers travel as COO). Sample-based
(200 shared samples, 50 epochs per level), initialization-based and random initial pruning; the
test accuracy after the federations and the sample-based baseline (no clients). The paper
shows the curves only (no table); its finding: sample-based is best at every level, and
sample-less pruning has a long "cold start" at high levels.

The canonical Fashion-MNIST split is used when ``<root>/FashionMNIST/raw`` exists, else the
re-split copy of ``<root>/FashionMNIST-resplit`` (comparable, not identical, accuracy).

Run: ``python recipes/prunefl/conv_fmnist.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from lightning_fedprune.core.masks import remaining_fraction  # noqa: E402
from lightning_fedprune.data import default_data_root  # noqa: E402

NAME = "conv_fmnist"
LEVELS = (10, 20, 30)


def _dataset(root: str | None) -> str:
    base = Path(root) if root else default_data_root()
    if base is not None and (Path(base) / "FashionMNIST" / "raw").is_dir():
        return "fashion_mnist"
    return "fashion_mnist_resplit"


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=100, quick_rounds=2, name=NAME)
    C.setup_process()
    levels = (10, 30) if args.quick else LEVELS
    epochs = 1 if args.quick else 50
    t1 = C.TABLE1["conv_fmnist"]
    name = _dataset(args.data_root)
    splits = C.load(name, args.data_root)
    fed = C.federation(splits, t1["clients"], seed=args.seed)
    if args.quick:  # a smaller global test set keeps the smoke run short
        import torch
        from torch.utils.data import DataLoader, Subset

        fed.data.test = Subset(splits.test, torch.arange(1000).tolist())
        fed.test = DataLoader(fed.data.test, batch_size=1000)
    C.console.print(f"[bold]{NAME}[/bold] on {name}: {args.rounds} federations, {epochs} server epochs per level; {C.env_note()}")
    pruning = C.server_pruning(
        "conv_fmnist", fed, levels=levels, lr=t1["lr"], seed=args.seed, sample_size=t1["sample_size"],
        epochs_per_level=epochs, fc_rates=t1["fc_rates"], conv_rates=t1["conv_rates"],
    )
    C.console.print(f"sample-based server pruning to level {max(levels)}: {pruning.seconds:.1f} CPU s")
    acc = {m: [] for m in ("sample", "init", "random", "baseline")}
    remaining, curves = [], {}
    for level in levels:
        module, masks = C.sample_module("conv_fmnist", pruning, level, lr=t1["lr"], seed=args.seed)
        acc["baseline"].append(C.accuracy(module, fed.test))
        remaining.append(remaining_fraction(module.state_dict(), masks))
        for method in ("sample", "init", "random"):
            if method != "sample":
                module = C.make_module("conv_fmnist", lr=t1["lr"], seed=args.seed)
            strategy = C.prunefl(method, level, masks=masks if method == "sample" else None, fc_rates=t1["fc_rates"],
                                 conv_rates=t1["conv_rates"], seed=args.seed)
            res = C.run(f"level {level} {method}", module, strategy, fed, rounds=args.rounds, seed=args.seed, eval_every=max(1, args.rounds // 6))
            acc[method].append(res["summary"]["final"]["test_accuracy"])
            curves.setdefault(level, {})[method] = res["history"]
        C.plot_runs(args.out, f"accuracy_vs_time_level{level}.png", curves[level])
    rows = [["% params left", *[f"{100 * r:.2f}" for r in remaining]]]
    rows += [[m, *[C.pct(a) for a in v]] for m, v in acc.items()]
    C.table(f"Conv-FashionMNIST: test accuracy after {args.rounds} federations (paper: curves to 10K federations, Figs. 9-10)",
            ["level", *map(str, levels)], rows)
    C.console.print("paper: sample-based best at every level; init/random have a long cold start at high levels")
    C.plot_levels(args.out, "accuracy_vs_level.png", list(levels), {m: [100 * a for a in v] for m, v in acc.items()}, None,
                  title=f"Conv-FashionMNIST, one-shot ({args.rounds} federations)")
    out = {"dataset": name, "levels": list(levels), "rounds": args.rounds, "accuracy": acc, "params_remaining": remaining,
           "server_pruning_cpu_s": pruning.seconds}
    C.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
