"""PruneFL Table 3 / Fig. 5: federations and simulated time to 95% test accuracy, LeNet-300-100.

One-shot sample-based, initialization-based and random initial pruning at levels 5, 10, 15, 20;
10 i.i.d. MNIST clients (5 local steps of batch 20, SGD lr 0.2), every client a Raspberry-Pi-like
device (``_common.PI_LIKE``): simulated time = real packed payload bytes over 1.6 Mbit/s plus
dense FLOPs at 0.2 GFLOP/s. A run stops when the global test accuracy first reaches 95% (the paper
waits for ten consecutive evaluations) or after ``--rounds`` federations.

Run: ``python recipes/prunefl/table3_time_to_accuracy.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "table3_time_to_accuracy"
LEVELS = (5, 10, 15, 20)
TARGET = 0.95
#: Table 3: (federations, seconds) to 95%; None = not reached
PAPER = {
    "sample": ((500, 6322), (1000, 3958), (1500, 3157), (7300, 7214)),
    "init": ((700, 10093), (1600, 5320), (9200, 5964), None),
    "random": ((800, 10907), (1900, 7130), (12400, 8996), None),
}


def _cell(feds, secs) -> str:
    return "N/A" if feds is None else f"{feds}/{secs:.0f}s"


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=600, quick_rounds=4, name=NAME)
    C.setup_process()
    levels = (5, 20) if args.quick else LEVELS
    epochs = 2 if args.quick else 50
    t1 = C.TABLE1["lenet300_100"]
    splits = C.load("mnist", args.data_root)
    fed = C.federation(splits, t1["clients"], seed=args.seed)
    C.console.print(f"[bold]{NAME}[/bold]: at most {args.rounds} federations per run, target {TARGET:.0%}; {C.env_note()}")
    pruning = C.server_pruning(
        "lenet300_100", fed, levels=levels, lr=t1["lr"], seed=args.seed, sample_size=t1["sample_size"],
        epochs_per_level=epochs, fc_rates=t1["fc_rates"], conv_rates=None,
    )
    reached: dict[str, list[tuple[int | None, float | None]]] = {m: [] for m in PAPER}
    per_fed: dict[int, dict[str, float]] = {}
    curves: dict[int, dict[str, list]] = {}
    for level in levels:
        curves[level] = {}
        for method in PAPER:
            if method == "sample":
                module, masks = C.sample_module("lenet300_100", pruning, level, lr=t1["lr"], seed=args.seed)
            else:
                module, masks = C.make_module("lenet300_100", lr=t1["lr"], seed=args.seed), None
            strategy = C.prunefl(method, level, masks=masks, fc_rates=t1["fc_rates"], seed=args.seed)
            res = C.run(f"level {level} {method}", module, strategy, fed, rounds=args.rounds, seed=args.seed, target=TARGET)
            reached[method].append(C.first_reach(res["history"], TARGET))
            curves[level][method] = res["history"]
            h = res["history"]
            per_fed[level] = {
                "bytes_per_client_down": h[0]["bytes_down"] / fed.data.num_clients,
                "bytes_per_client_up": h[0]["bytes_up"] / fed.data.num_clients,
                "sim_seconds_per_federation": h[-1]["sim_time"] / len(h),
            }
        C.plot_runs(args.out, f"accuracy_vs_time_level{level}.png", {m: curves[level][m] for m in PAPER}, target=TARGET)
    cols = [LEVELS.index(l) for l in levels]
    rows = []
    for method in PAPER:
        ours = [_cell(f, s) for f, s in reached[method]]
        paper = [("N/A" if PAPER[method][i] is None else _cell(*PAPER[method][i])) for i in cols]
        rows.append([f"{method} (ours)", *ours])
        rows.append([f"{method} (paper)", *paper])
    rows.append(["sim s / federation (ours)", *[f"{per_fed[l]['sim_seconds_per_federation']:.2f}" for l in levels]])
    rows.append(["payload / client, down (ours)", *[f"{per_fed[l]['bytes_per_client_down'] / 1e3:.0f} kB" for l in levels]])
    C.table(f"Table 3: federations / simulated time to {TARGET:.0%} (ours: stop at {args.rounds})", ["level", *map(str, levels)], rows)
    out = {"levels": list(levels), "max_rounds": args.rounds, "reached": reached, "per_federation": per_fed, "paper": PAPER}
    C.write_json(args.out, out)
    C.console.print(f"plots and results.json in {args.out}")
    return out


if __name__ == "__main__":
    main()
