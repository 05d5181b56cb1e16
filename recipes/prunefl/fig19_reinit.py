"""PruneFL Fig. 19 (Sec. 6.3): reinitialize the remaining weights after pruning, or not.

Sample-based one-shot pruning of LeNet-300-100 to level 15, then federated learning (10 i.i.d.
MNIST clients) either from the sample-trained pruned weights (no reinitialization, the paper's
default) or from the remaining weights reset to their values at initialization ("winning
ticket"). The paper sees no obvious difference, the no-reinitialization run converging
marginally faster early on.

Run: ``python recipes/prunefl/fig19_reinit.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "fig19_reinit"
LEVEL = 15


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=300, quick_rounds=3, name=NAME)
    C.setup_process()
    epochs = 2 if args.quick else 50
    t1 = C.TABLE1["lenet300_100"]
    splits = C.load("mnist", args.data_root)
    fed = C.federation(splits, t1["clients"], seed=args.seed)
    init_state = dict(C.make_module("lenet300_100", lr=t1["lr"], seed=args.seed).federated_state())
    pruning = C.server_pruning(
        "lenet300_100", fed, levels=(LEVEL,), lr=t1["lr"], seed=args.seed, sample_size=t1["sample_size"],
        epochs_per_level=epochs, fc_rates=t1["fc_rates"], conv_rates=None,
    )
    runs = {}
    for name, reinit in (("no reinitialization", False), ("reinitialization", True)):
        module, masks = C.sample_module("lenet300_100", pruning, LEVEL, lr=t1["lr"], seed=args.seed)
        strategy = C.prunefl("sample", LEVEL, masks=masks, fc_rates=t1["fc_rates"], seed=args.seed, reinitialize=reinit, init_state=init_state)
        runs[name] = C.run(name, module, strategy, fed, rounds=args.rounds, seed=args.seed)
    checkpoints = sorted({max(1, args.rounds // 10), max(1, args.rounds // 3), args.rounds})
    rows = [[k, *[C.pct(v["history"][r - 1]["test_accuracy"]) for r in checkpoints]] for k, v in runs.items()]
    C.table(f"Fig. 19: test accuracy after N federations, sample-based one-shot level {LEVEL}", ["", *[f"N={r}" for r in checkpoints]], rows)
    C.console.print("paper: no obvious difference; no reinitialization converges marginally faster at first")
    C.plot_runs(args.out, "accuracy_vs_round.png", {k: v["history"] for k, v in runs.items()}, x="round")
    out = {"rounds": args.rounds, "accuracy": {k: [v["history"][r - 1]["test_accuracy"] for r in checkpoints] for k, v in runs.items()},
           "checkpoints": checkpoints}
    C.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
