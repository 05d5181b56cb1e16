"""PruneFL Fig. 4 (right): {sample-based, sample-less} x {one-shot, federated} pruning at level 15.

LeNet-300-100 on MNIST, 10 i.i.d. clients. One-shot: the server prunes straight to level 15
(sample-based: 200 samples, 50 epochs per level; sample-less: initialization-based). Federated:
the server prunes to level 5, then the aggregated model loses one more level every ``X``
federations until level 15 (paper: X = 100; here ``--prune-every``, default 20, to fit a CPU
budget). Accuracy against simulated time (Pi-like devices, real packed payload bytes).

The paper's findings to compare with: sample-based beats sample-less; federated pruning ends
higher than one-shot; early on (before ~1,500 s) sample-based one-shot leads.

Run: ``python recipes/prunefl/fig4_combinations.py [--quick] [--rounds N] [--prune-every X]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "fig4_combinations"
LEVEL, START = 15, 5


def _acc_at(history, seconds):
    best = None
    for rec in history:
        if rec["sim_time"] > seconds:
            break
        acc = rec.get("test_accuracy")
        if isinstance(acc, float) and acc == acc:
            best = acc
    return best


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    every = 20
    if "--prune-every" in argv:
        i = argv.index("--prune-every")
        every = int(argv[i + 1])
        del argv[i : i + 2]
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=400, quick_rounds=12, name=NAME)
    C.setup_process()
    if args.quick:
        every = 1
    epochs = 2 if args.quick else 50
    t1 = C.TABLE1["lenet300_100"]
    splits = C.load("mnist", args.data_root)
    fed = C.federation(splits, t1["clients"], seed=args.seed)
    C.console.print(f"[bold]{NAME}[/bold]: {args.rounds} federations, federated pruning {START}->{LEVEL} every {every} (paper: 100); {C.env_note()}")
    pruning = C.server_pruning(
        "lenet300_100", fed, levels=(START, LEVEL), lr=t1["lr"], seed=args.seed, sample_size=t1["sample_size"],
        epochs_per_level=epochs, fc_rates=t1["fc_rates"], conv_rates=None,
    )
    runs = {}
    for name, method, start in (
        ("sample-based, one-shot", "sample", LEVEL),
        ("sample-based, federated", "sample", START),
        ("sample-less, one-shot", "init", LEVEL),
        ("sample-less, federated", "init", START),
    ):
        if method == "sample":
            module, masks = C.sample_module("lenet300_100", pruning, start, lr=t1["lr"], seed=args.seed)
        else:
            module, masks = C.make_module("lenet300_100", lr=t1["lr"], seed=args.seed), None
        strategy = C.prunefl(method, start, target_level=LEVEL, prune_every=every, masks=masks, fc_rates=t1["fc_rates"], seed=args.seed)
        runs[name] = C.run(name, module, strategy, fed, rounds=args.rounds, seed=args.seed)
    horizon = min(r["history"][-1]["sim_time"] for r in runs.values())
    marks = [horizon * f for f in (0.1, 0.25, 0.5, 1.0)]
    rows = [[name, *[C.pct(_acc_at(r["history"], t)) for t in marks], C.pct(r["summary"]["best_accuracy"])] for name, r in runs.items()]
    C.table(
        f"Fig. 4 right: test accuracy at simulated times, level {LEVEL} ({args.rounds} federations)",
        ["combination", *[f"{t:.0f} s" for t in marks], "best"], rows,
    )
    C.console.print("paper: sample-based > sample-less; federated > one-shot at convergence; sample-based one-shot leads before ~1,500 s")
    C.plot_runs(args.out, "accuracy_vs_time.png", {k: v["history"] for k, v in runs.items()})
    C.plot_runs(args.out, "accuracy_vs_round.png", {k: v["history"] for k, v in runs.items()}, x="round")
    out = {
        "rounds": args.rounds, "prune_every": every, "marks_s": marks,
        "accuracy_at_marks": {k: [_acc_at(v["history"], t) for t in marks] for k, v in runs.items()},
        "best": {k: v["summary"]["best_accuracy"] for k, v in runs.items()},
        "final_level": {k: v["history"][-1].get("agg/level") for k, v in runs.items()},
    }
    C.write_json(args.out, out)
    C.console.print(f"plots and results.json in {args.out}")
    return out


if __name__ == "__main__":
    main()
