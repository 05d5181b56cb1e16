"""Engine overhead: a plain PyTorch FedAvg loop vs lightning_fedprune's engine, same seeds, one process.

Workloads:
    (a) scikit-learn digits, 64-300-100-10 MLP, 10 clients (IID), 1 local epoch, batch 20, 30 rounds;
    (b) the 2-conv MNIST CNN on 10 clients x 200 random 28x28 samples, 5 rounds.

Both sides use the same data pipeline (the same DataLoader, same shuffling seeds), the same initial
weights, SGD and sample-weighted averaging, and evaluate the global model every round. The plain
loop does nothing else; the engine additionally encodes/decodes every message, counts FLOPs and
bytes, runs the simulated clock and trains through Lightning. Printed: CPU seconds per round of
each, their ratio, final accuracies and the largest per-round accuracy difference (0.0 means the
trajectories are identical). ``lightning_floor`` is the cost of the bare minimum any FedAvg driven by Lightning's
``Trainer`` pays (one fit per round, one epoch per client, weights swapped, nothing else): the part
of the ratio that is Lightning's own per-step cost rather than the engine's. The last line is
machine-readable::

    engine_overhead mlp_ratio=<x> cnn_ratio=<y>

Run: ``python benchmarks/engine_overhead.py [--rounds-mlp 30] [--rounds-cnn 5] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_fedprune.core.aggregation import weighted_average
from lightning_fedprune.data import load_dataset, make_partition
from lightning_fedprune.data.federated import FederatedDataset
from lightning_fedprune.models.modules import ClassifierModule
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine
from lightning_fedprune.strategies import FedAvg


class _Federated(FederatedModuleMixin, ClassifierModule):
    pass


def plain_fedavg(model: torch.nn.Module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int, device: str = "cpu") -> list[float]:
    """The reference: a hand-written FedAvg loop. Returns test accuracy after every round.

    ``device``: where it trains and evaluates (``"cuda"``: the model and every batch go there).
    """
    if device != "cpu":
        model.to(device)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    accs = []
    for rnd in range(rounds):
        states, weights = [], []
        for cid in range(fd.num_clients):
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            for x, y in fd.train_batches(cid, run_seed=seed, rnd=rnd, epoch=0):
                if device != "cpu":
                    x, y = x.to(device), y.to(device)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(fd.num_train_samples(cid))
        global_state = weighted_average(states, weights)
        model.load_state_dict(global_state)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in fd.test_loader():
                if device != "cpu":
                    x, y = x.to(device), y.to(device)
                correct += int((model(x).argmax(-1) == y).sum())
                total += len(y)
        accs.append(correct / total)
    return accs


def lightning_floor(module: _Federated, fd: FederatedDataset, *, rounds: int, seed: int) -> None:
    """The least any Lightning-driven FedAvg can cost: one fit per round, one epoch per client,
    weights swapped at epoch boundaries, nothing else (no messages, clock, metrics or evaluation).
    """
    import lightning.pytorch as pl

    class Swap(pl.Callback):
        def __init__(self, global_state):
            self.global_state, self.states, self.epoch = global_state, [], 0

        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.load_state_dict(self.global_state)
            trainer.strategy.setup_optimizers(trainer)
            loader.current = fd.train_batches(self.epoch, run_seed=seed, rnd=0, epoch=0)

        def on_train_epoch_end(self, trainer, pl_module):
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            self.epoch += 1

    class Loader:
        current = None

        def __iter__(self):
            if self.current is not None:
                yield from self.current

    loader = Loader()
    global_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for _ in range(rounds):
        swap = Swap(global_state)
        trainer = pl.Trainer(
            max_epochs=fd.num_clients, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[swap],
        )
        trainer.fit(module, train_dataloaders=loader)
        global_state = weighted_average(swap.states, [fd.num_train_samples(c) for c in range(fd.num_clients)])


def engine_fedavg(module: _Federated, fd: FederatedDataset, *, rounds: int, seed: int) -> list[float]:
    strategy = FedAvg(seed=seed)
    runtime = ClientRuntime(module, data=fd, seed=seed, evaluate_local=False)
    engine = SimulationEngine(strategy=strategy, runtime=runtime, data=fd, seed=seed)
    for rnd in range(rounds):
        engine.run_round(rnd)
    return [r["test_accuracy"] for r in engine.history]


def measure(name: str, make_module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int, repeats: int) -> float:
    plain_times, engine_times, floor_times = [], [], []
    for _ in range(repeats):
        module = make_module()
        reference = copy.deepcopy(module.model)
        t0 = time.process_time()
        plain_acc = plain_fedavg(reference, fd, rounds=rounds, lr=lr, seed=seed)
        plain_times.append((time.process_time() - t0) / rounds)
        t0 = time.process_time()
        engine_acc = engine_fedavg(module, fd, rounds=rounds, seed=seed)
        engine_times.append((time.process_time() - t0) / rounds)
        t0 = time.process_time()
        lightning_floor(make_module(), fd, rounds=rounds, seed=seed)
        floor_times.append((time.process_time() - t0) / rounds)
    p, e, f = float(np.median(plain_times)), float(np.median(engine_times)), float(np.median(floor_times))
    diff = max(abs(a - b) for a, b in zip(plain_acc, engine_acc))
    print(
        f"[{name}] rounds={rounds} plain={p:.4f} cpu-s/round engine={e:.4f} cpu-s/round ratio={e / p:.3f} "
        f"lightning_floor={f:.4f} cpu-s/round (ratio {f / p:.3f}) final_acc plain={plain_acc[-1]:.4f} engine={engine_acc[-1]:.4f} max_round_acc_diff={diff:.2e}"
    )
    return e / p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-mlp", type=int, default=30)
    parser.add_argument("--rounds-cnn", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many repetitions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # the floor's Trainers are not quiet
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec).*")

    # (a) digits MLP
    splits = load_dataset("digits")
    part = make_partition("iid", splits.train_targets, 10, seed=args.seed)
    fd_mlp = FederatedDataset.from_partition(splits, part, batch_size=20)

    def make_mlp() -> _Federated:
        torch.manual_seed(args.seed)
        m = _Federated("mlp", lr=0.05)
        m.federated_example_input_shape = (64,)
        return m

    mlp_ratio = measure("mlp/digits", make_mlp, fd_mlp, rounds=args.rounds_mlp, lr=0.05, seed=args.seed, repeats=args.repeats)

    # (b) CNN on random 28x28 data
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2000 + 500, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2500,), generator=g)
    train, test = TensorDataset(x[:2000], y[:2000]), TensorDataset(x[2000:], y[2000:])
    fd_cnn = FederatedDataset(train, np.array_split(np.arange(2000), 10), test=test, batch_size=20)

    def make_cnn() -> _Federated:
        torch.manual_seed(args.seed)
        m = _Federated("cnn_mnist", lr=0.01)
        m.federated_example_input_shape = (1, 28, 28)
        return m

    cnn_ratio = measure("cnn/random", make_cnn, fd_cnn, rounds=args.rounds_cnn, lr=0.01, seed=args.seed, repeats=args.repeats)
    print(f"engine_overhead mlp_ratio={mlp_ratio:.3f} cnn_ratio={cnn_ratio:.3f}")


if __name__ == "__main__":
    main()
