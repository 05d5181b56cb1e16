"""FedMP's experiments at CPU scale: each prints our numbers beside the paper's and writes plots.

    python recipes/fedmp/experiments.py table3          # Syn-FL, UP-FL, FedProx, FlexCom, FedMP (Table III / Fig. 6)
    python recipes/fedmp/experiments.py r2sp            # R2SP vs BSP (Fig. 7)
    python recipes/fedmp/experiments.py heterogeneity   # Low / Medium / High (Fig. 8)
    python recipes/fedmp/experiments.py theta           # E-UCB granularity theta (Fig. 4)
    python recipes/fedmp/experiments.py noniid          # non-IID levels 0/40/60/80 (Fig. 9)
    python recipes/fedmp/experiments.py async           # Asyn-FedMP m=5 of 10 vs Asyn-FL and FedMP (Fig. 12)
    python recipes/fedmp/experiments.py lstm            # 2-layer LSTM on PTB: Syn-FL, UP-FL, FedMP (Table IV)
    python recipes/fedmp/experiments.py all

Options: ``--quick`` (a few rounds, a smoke run), ``--out runs/fedmp``, ``--data-root PATH``,
``--rounds N``, ``--set key=value`` (applied to every variant), ``--resume``.

The paper ran 30 Jetson TX2 boards for hours; here the devices are simulated (Table II computing
modes, clusters A/B/C) and time is the simulated clock: FLOPs / device speed + real payload bytes /
bandwidth. Absolute times therefore differ from the paper's; the comparisons (who is faster, by
how much) are what these runs reproduce.
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

SYN = ["strategy.name=fedavg", "strategy.options={}", "engine.mode=sync"]
UPFL = ["strategy.name=upfl", "strategy.options={}", "engine.mode=sync"]
FEDPROX = ["strategy.name=fedprox", "strategy.options={mu: 0.01}", "strategy.local_work_by_capability=true", "engine.mode=sync"]
FLEXCOM = ["strategy.name=flexcom", "strategy.options={}", "engine.mode=sync"]
FEDMP: list[str] = []  # the base recipe

EXPERIMENTS = {
    "table3": dict(
        recipe="cnn_mnist.yaml",
        title="Table III / Fig. 6: CNN on MNIST, medium heterogeneity, time to 90%",
        variants={"Syn-FL": SYN, "UP-FL": UPFL, "FedProx": FEDPROX, "FlexCom": FLEXCOM, "FedMP": FEDMP},
        paper={"Syn-FL": "93.83% @20000s", "UP-FL": "94.31% @20000s", "FedProx": "95.82% @20000s",
               "FlexCom": "96.21% @20000s", "FedMP": "97.17% @20000s"},
        budget=True,
    ),
    "r2sp": dict(
        recipe="cnn_mnist.yaml",
        title="Fig. 7: R2SP vs BSP (FedMP), accuracy by round",
        variants={"FedMP (R2SP)": FEDMP, "FedMP (BSP)": ["strategy.options.aggregation=bsp"]},
        paper={"FedMP (R2SP)": "82.3% (AlexNet, 500 rounds)", "FedMP (BSP)": "77.4% (AlexNet, 500 rounds)"},
        extra=["target_accuracy=null"],
        x="round",
    ),
    "heterogeneity": dict(
        recipe="cnn_mnist.yaml",
        title="Fig. 8: time to 90% under Low / Medium / High heterogeneity",
        variants={
            f"{name} ({lvl})": [*v, f"devices.scenario={lvl}"]
            for lvl in ("low", "medium", "high")
            for name, v in (("Syn-FL", SYN), ("FedMP", FEDMP))
        },
        paper={"FedMP (high)": "up to 4.1x faster than Syn-FL"},
    ),
    "theta": dict(
        recipe="cnn_mnist.yaml",
        title="Fig. 4: E-UCB granularity theta, time to 90% (paper: 0.01-0.05 similar, larger worse)",
        variants={f"theta={t}": [f"strategy.options.theta={t}"] for t in (0.01, 0.05, 0.1, 0.25)},
        paper={"theta=0.01": "1.0 (normalized)", "theta=0.05": "~1.0", "theta=0.25": "larger"},
    ),
    "noniid": dict(
        recipe="cnn_mnist.yaml",
        title="Fig. 9: non-IID levels (y% of each worker's data from one label), time to 90%",
        variants={
            f"{name} (y={y})": [*v, *(["data.partition=iid"] if y == 0 else
                                      ["data.partition=dominant_label", f"data.partition_options={{dominant_fraction: {y / 100}}}"])]
            for y in (0, 40, 60, 80)
            for name, v in (("Syn-FL", SYN), ("FedMP", FEDMP))
        },
        paper={},
    ),
    "async": dict(
        recipe="cnn_mnist.yaml",
        title="Fig. 12: asynchronous rounds (m=5 of 10), time to 90%",
        variants={
            "Asyn-FL": [*SYN, "engine.mode=async", "engine.async_m=5"],
            "Asyn-FedMP": ["engine.mode=async", "engine.async_m=5"],
            "FedMP": FEDMP,
        },
        paper={"Asyn-FedMP": "10-35% less time than Asyn-FL (AlexNet)", "FedMP": "faster than Asyn-FedMP"},
    ),
    "lstm": dict(
        recipe="lstm_ptb.yaml",
        title="Table IV: 2-layer LSTM on PTB, test perplexity",
        variants={"Syn-FL": SYN, "UP-FL": [*UPFL, "strategy.options={ratio_range: [0.0, 0.9]}"], "FedMP": FEDMP},
        paper={"Syn-FL": "148.15 (1.0x)", "UP-FL": "149.81 (0.8x)", "FedMP": "146.95 (1.6x)"},
        perplexity=True,
        budget=True,
    ),
}

QUICK = ["rounds=3", "strategy.local_steps=5", "target_accuracy=null", "eval_every=1", "data.eval_batch_size=2000"]


def run_experiment(name: str, args: argparse.Namespace) -> str:
    spec = EXPERIMENTS[name]
    base = RecipeConfig.from_yaml(HERE / spec["recipe"])
    common = [*spec.get("extra", []), *(QUICK if args.quick else []), *args.set]
    if args.data_root:
        common.append(f"data.root={args.data_root}")
    if args.rounds:
        common.append(f"rounds={args.rounds}")
    variants = {label: [*ov, *common] for label, ov in spec["variants"].items()}
    out = Path(args.out) / name
    results = run_variants(base, variants, out_dir=out, resume=args.resume)
    perplexity = spec.get("perplexity", False)
    budget = None
    if spec.get("budget"):
        budget = min(r.summary["total_sim_time"] for r in results.values())
    table = format_table(
        results, paper=spec["paper"], title=spec["title"], perplexity=perplexity, budget=budget,
        paper_header="paper (Jetson TX2 testbed)",
    )
    syn = [r for label, r in results.items() if label.startswith("Syn-FL") or label.startswith("Asyn-FL")]
    lines = [table]
    if syn and not perplexity:
        base_t = syn[0].summary.get("time_to_target")
        for label, r in results.items():
            t = r.summary.get("time_to_target")
            if base_t and t:
                lines.append(f"  speedup over {syn[0].label} to the target: {label}: {base_t / t:.2f}x")
    target = base.apply_overrides(common).target_accuracy
    metric = "test_perplexity" if perplexity else "test_accuracy"
    plots = [plot_variants(results, out / f"{metric}_vs_{x}.png", x=x, metric=metric, target_accuracy=None if perplexity else target)
             for x in (spec.get("x", "sim_time"), "cum_bytes")]
    lines.append("plots: " + ", ".join(str(p) for p in plots))
    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--quick", action="store_true", help="3 short rounds per variant (a smoke run)")
    parser.add_argument("--out", default="runs/fedmp")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        print(run_experiment(name, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
