"""FedDP's experiments at CPU scale: each prints our numbers beside the paper's and writes plots.

    python recipes/feddp/experiments.py fig3      # accuracy vs rounds: FedDP vs FedAvg / FedProx / FedNova / SCAFFOLD (VGG-11, 10 clients)
    python recipes/feddp/experiments.py fig4      # rounds and communication to the target, each backend with and without gates
    python recipes/feddp/experiments.py fig5      # more clients: 30 / 50 / 100 clients at 40 / 70 / 40% sample rates
    python recipes/feddp/experiments.py table1    # FLOPs of the gated clients (VGG-11 and ResNet-32) against the dense models
    python recipes/feddp/experiments.py all

Options: ``--quick`` (2 rounds of 2 local steps, 3 evaluated clients: a smoke run), ``--model
vgg11|resnet32``, ``--rounds N``, ``--target 0.5``, ``--out runs/feddp``, ``--set key=value``
(applied to every variant), ``--resume`` (finished variants are read back from their
checkpoints, interrupted ones continue). Needs the CIFAR-10 subset (``../shared/data/CIFAR10-subset``, or
``--set data.root=PATH``); without it the script says so and exits 0.

What is measured (and how it departs from the paper's set-up):

* ``acc``: for ungated runs the global model's top-1 accuracy on the test set; for gated runs the
  server holds no gates, so each client's model (the final global backbone with the client's own
  gates) is evaluated on the test set and the mean over clients is reported (``dense backbone``:
  the backbone alone, which was never trained to run without gates).
* Curves and rounds to the target use ``local_acc_mean``: the clients' mean accuracy on their own
  local validation split after each round's local work (gated for gated runs), which every run
  records for free; the paper plots "top-1 average test accuracy".
* Communication cost (Fig. 4): ``parameters x rounds to the target x clients x sample rate``
  (the paper's formula, parameters as float32 bytes) and the real payload bytes exchanged until
  the target (tasks + results, ``cum_bytes``; SCAFFOLD's control variates double them).
* Local work is ``local_steps`` SGD steps per round (the paper: 10 local epochs with cosine
  decay, i.e. ``strategy.local_epochs=10`` and ``model.lr_schedule=cosine`` as overrides), on a
  10,000-image class-balanced subset of CIFAR-10 (the paper: the full set).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from lightning_fedprune.callbacks.gates import GATE_STATE_KEY  # noqa: E402
from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.core.gates import GateSet, dense_flops_per_sample, find_gate_sites, gated_flops_per_sample  # noqa: E402
from lightning_fedprune.errors import DataError  # noqa: E402
from lightning_fedprune.evaluation import evaluate  # noqa: E402
from lightning_fedprune.simulation import build_run  # noqa: E402

RECIPES = {"vgg11": "cifar_vgg11.yaml", "resnet32": "cifar_resnet32.yaml"}
GATES = "{keep_ratio: 0.5, lasso: 0.0001}"
BASES = {
    "FedAvg": ["strategy.name=fedavg", "strategy.options={}"],
    "FedProx": ["strategy.name=fedprox", "strategy.options={mu: 0.01}"],
    "FedNova": ["strategy.name=fednova", "strategy.options={}"],
    "SCAFFOLD": ["strategy.name=scaffold", "strategy.options={server_lr: 1.0}"],
}


def gated(base: list[str]) -> list[str]:
    return [*base, f"strategy.wrappers=[{{name: feddp, options: {GATES}}}]"]


FEDDP = ["strategy.name=feddp"]  # the recipe's own strategy: SCAFFOLD + gates

PAPER_FIG3 = {"SCAFFOLD": "84.21% (best vanilla)", "FedDP": "83.52% (similar to SCAFFOLD)", "FedAvg": "-", "FedProx": "-", "FedNova": "-"}
PAPER_FIG4 = {
    "FedProx+DP": "~2x less cost than FedProx (65 GB saved, VGG-11)",
    "FedDP": "20 GB (VGG-11), 3 GB (ResNet-32): the least",
    "FedAvg+DP": "fewer rounds than FedAvg",
    "FedNova+DP": "fewer rounds than FedNova",
}
PAPER_FIG5 = "with 30/50/100 clients, gated methods reach the target in fewer rounds and end at least as high (50 clients: FedDP 35% in 25 rounds)"
PAPER_TABLE1 = {"vgg11": "15.48 G -> 7.74 G (50%)", "resnet32": "7.36 G -> 3.68 G (50%)"}
QUICK = ["rounds=2", "strategy.local_steps=2", "eval_every=1"]


# ------------------------------------------------------------------------------------------ runs
def _is_gated(engine: Any) -> bool:
    return "gates" in engine.strategy.client_callbacks


def client_eval(engine: Any, max_clients: int) -> dict[str, float]:
    """Each client's gated model (final backbone + its gates) on the test set and its local validation FLOPs."""
    module = copy.deepcopy(engine.runtime.module)
    module.load_federated_state(engine.strategy.global_state)
    example = module.federated_example_input()
    sites, _ = find_gate_sites(module, example)
    dense = float(dense_flops_per_sample(module, example)[0])
    keep = engine.strategy.keep_ratio
    accs, flops = [], []
    for cid in range(engine.data.num_clients):
        if len(accs) >= max_clients:
            break
        saved = engine.store.get(cid).get(GATE_STATE_KEY)
        if not saved:
            continue
        gates = GateSet(sites, keep)
        gates.load_gate_state(saved)
        gates.attach(module)
        try:
            accs.append(evaluate(module, engine.data.test_loader())["accuracy"])
            loader = engine.data.local_test_loader(cid)
            total, n = 0.0, 0
            for x, _ in loader or []:
                total += float(gated_flops_per_sample(module, gates, x).sum())
                n += int(x.shape[0])
            if n:
                flops.append(total / n)
        finally:
            gates.detach()
    return {
        "acc": sum(accs) / len(accs) if accs else math.nan,
        "clients_evaluated": len(accs),
        "dense_flops": dense,
        "gated_flops": sum(flops) / len(flops) if flops else math.nan,
    }


def run_variant(base: RecipeConfig, label: str, overrides: list[str], out: Path, max_clients: int, *, resume: bool = False) -> dict[str, Any]:
    cfg = base.apply_overrides([*overrides, f"run_dir={out / label.replace('+', '_')}"])
    engine, rounds = build_run(cfg, listeners=[])
    engine.run(rounds, resume=resume)  # resume: a finished variant is read back, an interrupted one continues
    hist = engine.history
    row: dict[str, Any] = {"label": label, "history": hist, "gated": _is_gated(engine)}
    row["params"] = sum(v.numel() for v in engine.strategy.global_state.values() if v.is_floating_point())
    row["clients"] = engine.data.num_clients
    row["sample_rate"] = cfg.strategy.fraction_fit
    last = hist[-1]
    row["dense_backbone_acc"] = last.get("test_accuracy")
    if row["gated"]:
        row.update(client_eval(engine, max_clients))
    else:
        row["acc"] = last.get("test_accuracy")
    row["local_acc"] = last.get("local_acc_mean")
    row["best_local_acc"] = max((r.get("local_acc_mean") or 0.0) for r in hist)
    return row


def rounds_to(hist: list[dict[str, Any]], target: float) -> tuple[int | None, int | None]:
    """(rounds, payload bytes) until ``local_acc_mean`` first reaches ``target``."""
    for rec in hist:
        v = rec.get("local_acc_mean")
        if v is not None and math.isfinite(v) and v >= target:
            return rec["round"] + 1, rec["cum_bytes"]
    return None, None


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, float) and math.isfinite(v) else "-"


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        xs = [h["round"] for h in r["history"] if h.get("local_acc_mean") is not None]
        ys = [h["local_acc_mean"] for h in r["history"] if h.get("local_acc_mean") is not None]
        ax.plot(xs, ys, label=r["label"], linestyle="-" if r["gated"] else "--")
    ax.set_xlabel("round")
    ax.set_ylabel("clients' mean local validation accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------ experiments
def fig3(args: argparse.Namespace, base: RecipeConfig, out: Path) -> str:
    variants = {**{k: v for k, v in BASES.items()}, "FedDP": FEDDP}
    rows = [run_variant(base, label, [*ov, *args.common], out, args.max_clients, resume=args.resume) for label, ov in variants.items()]
    lines = [f"Fig. 3 ({args.model}, {rows[0]['clients']} clients): accuracy after {len(rows[0]['history'])} rounds",
             f"{'method':<12}{'acc':>10}{'dense backbone':>16}{'local val (best)':>18}   paper (VGG-11, top-1)"]
    for r in rows:
        lines.append(f"{r['label']:<12}{_pct(r['acc']):>10}{_pct(r['dense_backbone_acc']) if r['gated'] else '':>16}"
                     f"{_pct(r['best_local_acc']):>18}   {PAPER_FIG3.get(r['label'], '-')}")
    lines.append("paper's claim: FedDP's top accuracy is similar to SCAFFOLD's (83.52% vs 84.21%) with about 50% of the FLOPs")
    lines.append("plot: " + _plot(rows, out / "fig3_accuracy_vs_rounds.png", "Fig. 3 analog"))
    return _finish(lines, rows, out / "fig3")


def fig4(args: argparse.Namespace, base: RecipeConfig, out: Path) -> str:
    variants: dict[str, list[str]] = {}
    for name, ov in BASES.items():
        variants[name] = ov
        variants[f"{name}+DP" if name != "SCAFFOLD" else "FedDP"] = gated(ov) if name != "SCAFFOLD" else FEDDP
    rows = [run_variant(base, label, [*ov, *args.common], out, args.max_clients, resume=args.resume) for label, ov in variants.items()]
    target = args.target
    lines = [f"Fig. 4 ({args.model}): rounds and communication to {target:.0%} clients' mean local validation accuracy (paper: 78% top-1)",
             f"{'method':<12}{'rounds':>8}{'cost (formula)':>16}{'payload bytes':>15}{'final acc':>11}   paper"]
    for r in rows:
        n, b = rounds_to(r["history"], target)
        cost = r["params"] * 4 * n * r["clients"] * r["sample_rate"] if n else None
        lines.append(f"{r['label']:<12}{n if n else 'miss':>8}{_mb(cost):>16}{_mb(b):>15}{_pct(r['acc']):>11}   {PAPER_FIG4.get(r['label'], '-')}")
    lines.append("paper's claim: each backend needs fewer rounds and less communication to the target with gates than without")
    lines.append("plot: " + _plot(rows, out / "fig4_accuracy_vs_rounds.png", f"Fig. 4 analog, target {target:.0%}"))
    return _finish(lines, rows, out / "fig4")


def fig5(args: argparse.Namespace, base: RecipeConfig, out: Path) -> str:
    lines = [f"Fig. 5 ({args.model}): more clients"]
    all_rows = []
    for clients, rate in ((30, 0.4), (50, 0.7), (100, 0.4)):
        if args.clients and clients not in args.clients:
            continue
        setting = [f"data.num_clients={clients}", f"strategy.fraction_fit={rate}"]
        variants: dict[str, list[str]] = {}
        for name in ("FedAvg", "FedProx", "FedNova"):
            variants[f"{name}"] = BASES[name]
            variants[f"{name}+DP"] = gated(BASES[name])
        variants["SCAFFOLD"] = BASES["SCAFFOLD"]
        variants["FedDP"] = FEDDP
        rows = [
            run_variant(base, f"{label}@{clients}", [*ov, *setting, *args.common], out, args.max_clients, resume=args.resume)
            for label, ov in variants.items()
        ]
        all_rows += rows
        lines.append(f"-- {clients} clients, sample rate {rate:.0%}")
        lines.append(f"{'method':<18}{'final acc':>11}{'best local val':>16}{'rounds to target':>18}")
        for r in rows:
            n, _ = rounds_to(r["history"], args.target)
            lines.append(f"{r['label']:<18}{_pct(r['acc']):>11}{_pct(r['best_local_acc']):>16}{n if n else 'miss':>18}")
        lines.append("plot: " + _plot(rows, out / f"fig5_{clients}_clients.png", f"Fig. 5 analog, {clients} clients at {rate:.0%}"))
    lines.append(f"paper's claim: {PAPER_FIG5}")
    return _finish(lines, all_rows, out / "fig5")


def table1(args: argparse.Namespace, base: RecipeConfig, out: Path) -> str:
    lines = ["Table I: FLOPs per sample, dense vs the gated clients (mean over clients of the mean over their local validation data)",
             f"{'model':<12}{'dense':>12}{'gated':>12}{'ratio':>8}   paper"]
    rows = []
    for model in (("vgg11", "resnet32") if args.model_given is None else (args.model,)):
        b = RecipeConfig.from_yaml(HERE / RECIPES[model])
        r = run_variant(b, f"FedDP-{model}", [*FEDDP, *args.common], out, args.max_clients)
        rows.append(r)
        ratio = r["gated_flops"] / r["dense_flops"]
        lines.append(f"{model:<12}{r['dense_flops'] / 1e6:>10.1f} M{r['gated_flops'] / 1e6:>10.1f} M{ratio:>8.1%}   {PAPER_TABLE1[model]}")
    lines.append("plot: " + _plot_flops(rows, out / "table1_flops.png"))
    lines.append("FLOPs here are 2 x MACs of convolutions and linear layers for one 32x32 image (the paper's absolute"
                 " numbers are not per image); with keep ratio 0.5 a chain of gated convolutions halves both the kept"
                 " outputs and the non-zero inputs of the next layer (about 25%), residual adds make inputs dense again")
    return _finish(lines, rows, out / "table1")


def _plot_flops(rows: list[dict[str, Any]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["dense_flops"] / 1e6 for r in rows], width=0.4, label="dense")
    ax.bar([x + 0.2 for x in xs], [r["gated_flops"] / 1e6 for r in rows], width=0.4, label="gated (mean over clients)")
    ax.set_xticks(list(xs), [r["label"] for r in rows])
    ax.set_ylabel("MFLOPs per 32x32 image")
    ax.set_title("Table I analog: FLOPs of the gated clients", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _mb(v: Any) -> str:
    return f"{v / 1e6:.1f} MB" if v else "-"


def _finish(lines: list[str], rows: list[dict[str, Any]], stem: Path) -> str:
    text = "\n".join(lines)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".txt").write_text(text + "\n")
    slim = [{k: v for k, v in r.items() if k != "history"} | {"local_acc": [h.get("local_acc_mean") for h in r["history"]]} for r in rows]
    stem.with_suffix(".json").write_text(json.dumps(slim, indent=1, default=str))
    return text


EXPERIMENTS = {"fig3": fig3, "fig4": fig4, "fig5": fig5, "table1": table1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 local steps, 3 evaluated clients (a smoke run)")
    parser.add_argument("--model", choices=sorted(RECIPES), default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.6, help="local validation accuracy target (Fig. 4 / 5)")
    parser.add_argument("--clients", type=int, nargs="*", default=None, help="Fig. 5: only these client counts")
    parser.add_argument("--max-clients", type=int, default=10, help="clients whose gated model is evaluated on the test set")
    parser.add_argument("--out", default="runs/feddp")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="reuse finished variants under --out and continue interrupted ones")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    args.model_given = args.model
    args.model = args.model or "vgg11"
    args.common = [*(QUICK if args.quick else []), *args.set, *([f"rounds={args.rounds}"] if args.rounds else [])]
    if args.quick:
        args.max_clients = min(args.max_clients, 3)
    base = RecipeConfig.from_yaml(HERE / RECIPES[args.model])
    try:
        from lightning_fedprune.data import load_dataset

        cfg = base.apply_overrides(args.set)
        load_dataset(cfg.data.name, root=cfg.data.root)
    except DataError as err:
        print(f"skipped: the CIFAR-10 subset is not available ({err})")
        return 0
    out = Path(args.out)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        print(EXPERIMENTS[name](args, base, out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
