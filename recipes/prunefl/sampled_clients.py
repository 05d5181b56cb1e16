"""PruneFL Sec. 5.3 / 5.3.3 / Fig. 16: non-i.i.d. clients, 10 sampled per federation, biased samples.

FEMNIST's writers are not available here, so writers are played by clients of a non-i.i.d. MNIST
partition (2 label shards each, 102 clients). As the paper's server holds 389 images of 2
writers, the server's sample is 389 images of 2 clients (a biased subset: 4 labels at most), and
those 2 take no part in the federation; the other 100 do, 10 sampled at random per federation
(LeNet-300-100, 5 local steps of batch 20, lr 0.1). Compared: sample-based one-shot at levels
5/10/15/20 and the four combinations at level 15 (federated pruning from level 5, one level every
``X = rounds/20`` federations).

Run: ``python recipes/prunefl/sampled_clients.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from lightning_fedprune.data import FederatedDataset  # noqa: E402
from lightning_fedprune.data.sampling import biased_sample_indices  # noqa: E402

NAME = "sampled_clients"
LEVELS = (5, 10, 15, 20)
CLIENTS, SAMPLED, WRITERS = 100, 10, 2
SAMPLE_SIZE = 389  # the paper's biased subset: 389 images of 2 writers
LR = 0.1


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=400, quick_rounds=3, name=NAME)
    C.setup_process()
    levels = (5, 15) if args.quick else LEVELS
    epochs = 2 if args.quick else 50
    splits = C.load("mnist", args.data_root)
    full = C.federation(splits, CLIENTS + WRITERS, seed=args.seed, scheme="shards", shards_per_client=2)
    owner = np.full(len(splits.train), -1)
    for cid, c in enumerate(full.partition.clients):
        owner[c.train] = cid
    server_idx = biased_sample_indices(owner, keep=range(WRITERS), size=SAMPLE_SIZE, seed=args.seed)
    labels = sorted(set(splits.train_targets[server_idx].tolist()))
    data = FederatedDataset(splits.train, [c.train for c in full.partition.clients[WRITERS:]], test=splits.test, batch_size=C.BATCH_SIZE, eval_batch_size=2000)
    fed = C.Federation(splits, full.partition, data, full.test)
    C.console.print(
        f"[bold]{NAME}[/bold]: {CLIENTS} clients, {SAMPLED} per federation, {args.rounds} federations; server sample: "
        f"{len(server_idx)} images of {WRITERS} excluded clients (labels {labels}); {C.env_note()}"
    )
    prune_levels = tuple(sorted({*levels, 5}))
    pruning = C.server_pruning(
        "lenet300_100", fed, levels=prune_levels, lr=LR, seed=args.seed, sample_size=len(server_idx), epochs_per_level=epochs,
        fc_rates=(0.2, 0.2, 0.1), conv_rates=None, indices=server_idx,
    )
    every = 1 if args.quick else max(1, args.rounds // 20)
    frac = SAMPLED / CLIENTS
    runs = {}
    for level in levels:
        module, masks = C.sample_module("lenet300_100", pruning, level, lr=LR, seed=args.seed)
        runs[f"sample one-shot L{level}"] = C.run(
            f"sample one-shot L{level}", module, C.prunefl("sample", level, masks=masks, seed=args.seed, fraction_fit=frac), fed,
            rounds=args.rounds, seed=args.seed, eval_every=max(1, args.rounds // 40),
        )
    top = max(levels)
    module, masks = C.sample_module("lenet300_100", pruning, 5, lr=LR, seed=args.seed)
    runs[f"sample federated 5->{top}"] = C.run(
        f"sample federated 5->{top}", module, C.prunefl("sample", 5, target_level=top, prune_every=every, masks=masks, seed=args.seed, fraction_fit=frac),
        fed, rounds=args.rounds, seed=args.seed, eval_every=max(1, args.rounds // 40),
    )
    for name, kwargs in ((f"init one-shot L{top}", {"level": top}), (f"init federated 5->{top}", {"level": 5, "target_level": top, "prune_every": every})):
        module = C.make_module("lenet300_100", lr=LR, seed=args.seed)
        runs[name] = C.run(
            name, module, C.prunefl("init", seed=args.seed, fraction_fit=frac, **kwargs), fed,
            rounds=args.rounds, seed=args.seed, eval_every=max(1, args.rounds // 40),
        )
    early = max(1, args.rounds // 10)
    rows = [[k, C.pct(C.acc_at_round(v["history"], early)), C.pct(v["summary"]["final"]["test_accuracy"]), C.pct(v["summary"]["best_accuracy"]),
             f"{v['summary']['final']['sim_time']:.0f}"] for k, v in runs.items()]
    C.table(f"Fig. 16 (MNIST shards stand in for FEMNIST writers): {SAMPLED} of {CLIENTS} clients per federation",
            ["run", f"after {early} federations", "final", "best", "sim s"], rows)
    C.console.print("paper: slower learning than with all clients, same conclusions (sample-based > sample-less; federated > one-shot at the end)")
    C.plot_runs(args.out, "accuracy_vs_time.png", {k: v["history"] for k, v in runs.items()})
    C.plot_runs(args.out, "accuracy_vs_round.png", {k: v["history"] for k, v in runs.items()}, x="round")
    out = {"rounds": args.rounds, "server_sample": len(server_idx), "server_labels": labels,
           "final": {k: v["summary"]["final"]["test_accuracy"] for k, v in runs.items()},
           "best": {k: v["summary"]["best_accuracy"] for k, v in runs.items()}}
    C.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
