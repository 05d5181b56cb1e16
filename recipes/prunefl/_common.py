"""Shared building blocks of the PruneFL recipes (no algorithm here: it composes the library).

Every recipe in this folder is a script with the same options::

    python recipes/prunefl/<recipe>.py [--quick] [--data-root DIR] [--out DIR] [--seed N] [--rounds N]

``--quick`` is a smoke run (seconds to a minute); the default is a CPU-scale run (minutes). Each
prints our numbers beside the paper's and writes PNG plots and a ``results.json`` under
``--out`` (default ``runs/prunefl/<recipe>``).

Simulated devices: every client gets the same Raspberry-Pi-like profile (:data:`PI_LIKE`):
1.6 Mbit/s up and down, so that a dense LeNet-300-100 federation spends about 10.7 s
communicating (Fig. 2 of the paper: 10.57 s), and 0.2 GFLOP/s. The engine charges compute from
the dense FLOP count, so sparse FC compute does not shorten the simulated compute time; it is
small next to communication here anyway (0.8 s of a dense 11.5 s federation).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from lightning_fedprune.callbacks.masking import MaskingCallback
from lightning_fedprune.callbacks.server_pruning import sample_based_pruning
from lightning_fedprune.config import FederatedClassifier
from lightning_fedprune.core.masks import MaskSet
from lightning_fedprune.data import FederatedDataset, load_dataset, make_partition
from lightning_fedprune.data.sampling import sample_loader, shared_sample_indices
from lightning_fedprune.errors import DataError
from lightning_fedprune.evaluation import evaluate
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine, make_devices
from lightning_fedprune.strategies.prunefl import PruneFL

console = Console(width=120)

#: Raspberry-Pi-like device profile (see the module docstring)
PI_LIKE = {"compute_gflops": 0.2, "uplink_mbps": 1.6, "downlink_mbps": 1.6}

#: Table 1 of the paper, per model. One deviation: LeNet-300-100's SGD learning rate is 0.2, not
#: 0.5: on our standardized MNIST inputs (mean 0.1307, std 0.3081) the server's 50 epochs per level
#: on 200 samples diverge to NaN weights with 0.5 before level 30.
TABLE1 = {
    "lenet300_100": {"lr": 0.2, "fc_rates": (0.2, 0.2, 0.1), "conv_rates": None, "sample_size": 200, "clients": 10},
    "conv_fmnist": {"lr": 0.25, "fc_rates": (0.2, 0.2, 0.1), "conv_rates": (0.05, 0.1), "sample_size": 200, "clients": 5},
}
LOCAL_STEPS, BATCH_SIZE = 5, 20


def parse_args(description: str, argv: Sequence[str] | None, *, rounds: int, quick_rounds: int, name: str) -> argparse.Namespace:
    """The common command line; ``rounds`` is the default federation count of a full run."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny settings, seconds to a minute")
    p.add_argument("--data-root", default=None, help="folder with MNIST/ and FashionMNIST-resplit/ (default: the library's data root)")
    p.add_argument("--out", default=None, help=f"output folder (default runs/prunefl/{name})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help=f"federations per run (default {rounds}; --quick {quick_rounds})")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = quick_rounds if args.quick else rounds
    args.out = Path(args.out) if args.out else Path("runs") / "prunefl" / (name + ("_quick" if args.quick else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def setup_process() -> None:
    """One torch thread, flush-to-zero, quiet Lightning."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning_fedprune").setLevel(logging.WARNING)


def load(name: str, root: str | None) -> Any:
    """Load a real dataset or exit with the library's message (which names the expected files)."""
    try:
        return load_dataset(name, root=root)
    except DataError as err:
        console.print(f"[red]cannot run this recipe without {name}:[/red] {err}")
        sys.exit(2)


@dataclass
class Federation:
    """The clients' data and the global test set of one experiment."""

    splits: Any
    partition: Any
    data: FederatedDataset
    test: DataLoader


def federation(splits: Any, num_clients: int, *, seed: int, scheme: str = "iid", **options: Any) -> Federation:
    part = make_partition(scheme, splits.train_targets, num_clients, seed=seed, **options)
    data = FederatedDataset.from_partition(splits, part, batch_size=BATCH_SIZE, eval_batch_size=2000)
    return Federation(splits, part, data, DataLoader(splits.test, batch_size=2000))


def make_module(model: str, *, lr: float, seed: int, input_shape: tuple[int, ...] = (1, 28, 28)) -> FederatedClassifier:
    """A fresh model with the initial weights of ``seed`` (the same for every method of a recipe)."""
    torch.manual_seed(seed)
    module = FederatedClassifier(model, lr=lr)
    module.federated_example_input_shape = tuple(input_shape)
    return module


def accuracy(module: torch.nn.Module, test: DataLoader) -> float:
    return float(evaluate(module, test)["accuracy"])


@dataclass
class ServerPruning:
    """Sample-based pruning done once up to the highest level, read out at every level wanted."""

    snapshots: dict[int, tuple[MaskSet, dict[str, torch.Tensor]]]
    seconds: float
    sample_size: int


def server_pruning(
    model: str, fed: Federation, *, levels: Sequence[int], lr: float, seed: int, sample_size: int, epochs_per_level: int,
    fc_rates: Any, conv_rates: Any, indices: np.ndarray | None = None,
) -> ServerPruning:
    """Sample-based initial pruning (50 epochs per level in the paper) of a fresh model."""
    module = make_module(model, lr=lr, seed=seed)
    idx = indices if indices is not None else shared_sample_indices(fed.partition, size=sample_size, seed=seed)
    t0 = time.process_time()
    _, cb = sample_based_pruning(
        module, sample_loader(fed.splits.train, idx, batch_size=BATCH_SIZE, seed=seed), target_level=max(levels),
        epochs_per_level=epochs_per_level, fc_rates=fc_rates, conv_rates=conv_rates, snapshot_levels=levels, return_callback=True,
    )
    return ServerPruning(cb.snapshots, time.process_time() - t0, len(idx))


def run(
    label: str, module: FederatedClassifier, strategy: PruneFL, fed: Federation, *, rounds: int, seed: int,
    eval_every: int = 1, target: float | None = None, devices: Mapping[str, Any] = PI_LIKE,
) -> dict[str, Any]:
    """One federation on the simulation engine; returns ``{"label", "history", "summary", "cpu_s"}``."""
    runtime = ClientRuntime(module, data=fed.data, seed=seed, callbacks=[MaskingCallback()], evaluate_local=False)
    engine = SimulationEngine(
        strategy=strategy, runtime=runtime, data=fed.data, devices=make_devices(fed.data.num_clients, seed=seed, **devices),
        seed=seed, eval_every=eval_every, target_accuracy=target,
    )
    t0 = time.process_time()
    summary = engine.run(rounds)
    cpu = time.process_time() - t0
    final = summary["final"] or {}
    console.print(
        f"  {label:<32} rounds {summary['rounds_run']:>5}  acc {_pct(final.get('test_accuracy'))}  level {strategy.level:>2}  "
        f"sim {final.get('sim_time', 0):>9.0f} s  cpu {cpu:6.1f} s"
    )
    return {"label": label, "history": engine.history, "summary": summary, "cpu_s": cpu}


def prunefl(method: str, level: int, *, target_level: int | None = None, prune_every: int = 100, masks: MaskSet | None = None,
            fc_rates: Any = (0.2, 0.2, 0.1), conv_rates: Any = None, seed: int = 0, fraction_fit: float = 1.0, **kwargs: Any) -> PruneFL:
    """PruneFL with the paper's local work (5 steps of batch 20 per federation)."""
    return PruneFL(
        initial_pruning=method, initial_level=None if method == "sample" else level, target_level=target_level,
        prune_every=prune_every, initial_masks=masks, fc_rates=fc_rates, conv_rates=conv_rates, local_steps=LOCAL_STEPS,
        fraction_fit=fraction_fit, seed=seed, **kwargs,
    )


def sample_module(model: str, pruning: ServerPruning, level: int, *, lr: float, seed: int) -> tuple[FederatedClassifier, MaskSet]:
    """A module holding the sample-trained, pruned weights of ``level`` and its masks."""
    masks, state = pruning.snapshots[level]
    module = make_module(model, lr=lr, seed=seed)
    module.load_state_dict(state)
    return module, masks


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return f"{100 * v:5.1f}%" if isinstance(v, (int, float)) and math.isfinite(v) else "  n/a "


def pct(v: Any) -> str:
    return _pct(v).strip()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """Print a rich table (and return it)."""
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c), justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    console.print(t)
    return t


def first_reach(history: Sequence[Mapping[str, Any]], target: float) -> tuple[int | None, float | None]:
    """(federations, simulated seconds) when the test accuracy first reached ``target``."""
    for rec in history:
        acc = rec.get("test_accuracy")
        if isinstance(acc, float) and math.isfinite(acc) and acc >= target:
            return int(rec["round"]) + 1, float(rec["sim_time"])
    return None, None


def acc_at_round(history: Sequence[Mapping[str, Any]], federations: int) -> float | None:
    """The last test accuracy measured within the first ``federations`` federations."""
    out = None
    for rec in history[:federations]:
        acc = rec.get("test_accuracy")
        if isinstance(acc, float) and math.isfinite(acc):
            out = acc
    return out


def write_json(out: Path, payload: Any) -> Path:
    path = out / "results.json"

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(payload), indent=1))
    return path


def plot_levels(out: Path, name: str, levels: Sequence[int], ours: Mapping[str, Sequence[float | None]],
                paper: Mapping[str, Sequence[float | None]] | None, *, ylabel: str = "test accuracy (%)", title: str = "") -> Path:
    """Our values (solid) and the paper's (dashed) against the pruning level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, ys) in enumerate(ours.items()):
        c = colors[i % len(colors)]
        ax.plot(levels, [np.nan if y is None else y for y in ys], marker="o", color=c, label=f"{label} (ours)")
        if paper and label in paper:
            ax.plot(levels, [np.nan if y is None else y for y in paper[label]], marker="x", linestyle="--", color=c, label=f"{label} (paper)")
    ax.set_xlabel("pruning level")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(out: Path, name: str, runs: Mapping[str, Sequence[Mapping[str, Any]]], *, x: str = "sim_time", target: float | None = None) -> Path:
    """Accuracy curves of several runs (``x``: ``round`` or ``sim_time``)."""
    from lightning_fedprune.reporting import plot_comparison

    return plot_comparison(runs, out / name, x=x, target_accuracy=target)


def rounds_note(args: argparse.Namespace, paper_rounds: str) -> str:
    return f"{args.rounds} federations here (paper: {paper_rounds})"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def env_note() -> str:
    return f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 torch thread"
