"""PruneFL Fig. 20 (Sec. 6.5): impact of the server's sample size on sample-based pruning.

LeNet-300-100 on MNIST: the server's sample (shared by the 10 i.i.d. clients) has 200, 400, 600
or 800 images; it is pruned to levels 5, 10, 15, 20 with 50 epochs per level, then federated
learning runs on each pruned model. Reported: the accuracy right after server pruning (the
curves' starting point), after the federations, and the server's CPU time per level (paper, on
an Amazon g3s.xlarge: 10, 16, 24, 30 s per 50 epochs for 200..800 samples). The paper's finding:
more samples give a higher start, faster convergence and a better final accuracy.

Run: ``python recipes/prunefl/fig20_sample_size.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "fig20_sample_size"
SIZES = (200, 400, 600, 800)
LEVELS = (5, 10, 15, 20)
PAPER_SECONDS_PER_LEVEL = {200: 10, 400: 16, 600: 24, 800: 30}


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=100, quick_rounds=2, name=NAME)
    C.setup_process()
    sizes, levels = ((200, 400), (5, 10)) if args.quick else (SIZES, LEVELS)
    epochs = 2 if args.quick else 50
    t1 = C.TABLE1["lenet300_100"]
    splits = C.load("mnist", args.data_root)
    fed = C.federation(splits, t1["clients"], seed=args.seed)
    C.console.print(f"[bold]{NAME}[/bold]: {args.rounds} federations per run; {C.env_note()}")
    start: dict[int, list[float]] = {}
    final: dict[int, list[float]] = {}
    seconds: dict[int, float] = {}
    curves = {}
    for size in sizes:
        pruning = C.server_pruning(
            "lenet300_100", fed, levels=levels, lr=t1["lr"], seed=args.seed, sample_size=size,
            epochs_per_level=epochs, fc_rates=t1["fc_rates"], conv_rates=None,
        )
        seconds[size] = pruning.seconds / max(levels)
        start[size], final[size] = [], []
        for level in levels:
            module, masks = C.sample_module("lenet300_100", pruning, level, lr=t1["lr"], seed=args.seed)
            start[size].append(C.accuracy(module, fed.test))
            strategy = C.prunefl("sample", level, masks=masks, fc_rates=t1["fc_rates"], seed=args.seed)
            res = C.run(f"{size} samples, level {level}", module, strategy, fed, rounds=args.rounds, seed=args.seed, eval_every=max(1, args.rounds // 20))
            final[size].append(res["summary"]["final"]["test_accuracy"])
            curves[f"{size} samples, L{level}"] = res["history"]
    rows = []
    for size in sizes:
        rows.append([
            f"{size} samples", *[f"{C.pct(a)} -> {C.pct(b)}" for a, b in zip(start[size], final[size])],
            f"{seconds[size]:.2f} / {PAPER_SECONDS_PER_LEVEL.get(size, '-')}",
        ])
    C.table(
        f"Fig. 20: accuracy after server pruning -> after {args.rounds} federations; server CPU s per level (ours / paper)",
        ["sample size", *[f"level {l}" for l in levels], "s per level"], rows,
    )
    C.plot_levels(args.out, "start_accuracy_vs_level.png", list(levels), {f"{s} samples": [100 * a for a in start[s]] for s in sizes}, None,
                  title="accuracy right after server pruning")
    C.plot_levels(args.out, "final_accuracy_vs_level.png", list(levels), {f"{s} samples": [100 * a for a in final[s]] for s in sizes}, None,
                  title=f"accuracy after {args.rounds} federations")
    for level in levels:
        C.plot_runs(args.out, f"accuracy_vs_round_level{level}.png", {f"{s} samples": curves[f"{s} samples, L{level}"] for s in sizes}, x="round")
    out = {"sizes": list(sizes), "levels": list(levels), "rounds": args.rounds, "start": start, "final": final, "cpu_s_per_level": seconds}
    C.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
