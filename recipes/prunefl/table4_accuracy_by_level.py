"""PruneFL Table 4 / Fig. 6: LeNet-300-100 on MNIST, one-shot initial pruning at levels 5..30.

Sample-based (200 server samples shared by the clients, 50 epochs per level), initialization-based
and random initial pruning to each level, then federated learning with 10 clients (i.i.d., 5 local
steps of batch 20 per federation, SGD lr 0.2: see ``_common.TABLE1``) on the fixed mask; the test accuracy after the last
federation, and the *baseline*: the sample-based model right after server pruning (no clients).

Run: ``python recipes/prunefl/table4_accuracy_by_level.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from lightning_fedprune.core.masks import kept_after_levels, remaining_fraction  # noqa: E402

NAME = "table4_accuracy_by_level"
LEVELS = (5, 10, 15, 20, 25, 30)
#: Table 4: test accuracy (%) at federation #10K
PAPER = {
    "sample": (98.1, 97.7, 97.1, 95.4, 91.7, 84.5),
    "init": (98.1, 97.4, 95.2, 86.1, 31.8, 14.5),
    "random": (98.0, 97.3, 95.1, 85.5, 30.1, 13.2),
    "baseline": (83.2, 82.8, 82.4, 81.3, 79.5, 76.1),
}
#: % of parameters remaining, as quoted in the text (Sec. 5.1.3, 6.1)
PAPER_REMAINING = {20: 1.35, 30: 0.3}


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=300, quick_rounds=3, name=NAME)
    C.setup_process()
    levels = (5, 30) if args.quick else LEVELS
    epochs = 2 if args.quick else 50
    t1 = C.TABLE1["lenet300_100"]
    splits = C.load("mnist", args.data_root)
    fed = C.federation(splits, t1["clients"], seed=args.seed)
    C.console.print(f"[bold]{NAME}[/bold]: {C.rounds_note(args, '10K')}, {epochs} server epochs per level; {C.env_note()}")

    pruning = C.server_pruning(
        "lenet300_100", fed, levels=levels, lr=t1["lr"], seed=args.seed, sample_size=t1["sample_size"],
        epochs_per_level=epochs, fc_rates=t1["fc_rates"], conv_rates=None,
    )
    C.console.print(f"sample-based server pruning to level {max(levels)}: {pruning.seconds:.1f} CPU s")
    acc: dict[str, list[float | None]] = {m: [] for m in ("sample", "init", "random", "baseline")}
    remaining: list[float] = []
    curves = {}
    for level in levels:
        module, masks = C.sample_module("lenet300_100", pruning, level, lr=t1["lr"], seed=args.seed)
        acc["baseline"].append(C.accuracy(module, fed.test))
        remaining.append(remaining_fraction(module.state_dict(), masks))
        for method in ("sample", "init", "random"):
            if method != "sample":
                module = C.make_module("lenet300_100", lr=t1["lr"], seed=args.seed)
            strategy = C.prunefl(method, level, masks=masks if method == "sample" else None, fc_rates=t1["fc_rates"], seed=args.seed)
            res = C.run(f"level {level} {method}", module, strategy, fed, rounds=args.rounds, seed=args.seed, eval_every=args.rounds)
            acc[method].append(res["summary"]["final"]["test_accuracy"])
            curves[f"L{level} {method}"] = res["history"]

    paper_cols = [LEVELS.index(l) for l in levels]
    rows = [["% params left (ours)", *[f"{100 * r:.2f}" for r in remaining]]]
    rows.append(["% params left (paper)", *[str(PAPER_REMAINING.get(l, "-")) for l in levels]])
    for method in ("sample", "init", "random", "baseline"):
        rows.append([method, *[f"{C.pct(a)} / {PAPER[method][i]}%" for a, i in zip(acc[method], paper_cols)]])
    C.table(f"Table 4: test accuracy, ours ({args.rounds} federations) / paper (10K federations)", ["pruning level", *map(str, levels)], rows)
    C.plot_levels(
        args.out, "accuracy_vs_level.png", list(levels), {m: [100 * a for a in v] for m, v in acc.items()},
        {m: [PAPER[m][i] for i in paper_cols] for m in PAPER}, title=f"LeNet-300-100 / MNIST, one-shot ({args.rounds} federations)",
    )
    kept_fc1 = [kept_after_levels(235200, 0.2, l)[-1] for l in levels]
    out = {
        "levels": list(levels), "rounds": args.rounds, "server_epochs_per_level": epochs, "accuracy": acc, "paper": PAPER,
        "params_remaining": remaining, "fc1_kept": kept_fc1, "server_pruning_cpu_s": pruning.seconds,
    }
    C.write_json(args.out, out)
    C.console.print(f"plots and results.json in {args.out}")
    return out


if __name__ == "__main__":
    main()
