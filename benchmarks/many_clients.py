"""Many clients: 1,000 simulated SCAFFOLD clients, 10% sampled per round, states spilled to disk.

Every client keeps a persistent state (SCAFFOLD's ``c_i``, one model-sized tensor set: ~0.35 MB
for the 64-300-100-10 MLP), so 1,000 clients hold ~350 MB of state; the store keeps at most
``--memory-mb`` of it in memory and spills the least recently used to disk. Data: random
64-feature vectors labelled by a fixed linear teacher, 20 per client.

Printed: seconds per round (median), peak RSS, state bytes in memory and on disk, for
(a) 1,000 clients with 100 sampled per round and (b) 100 clients with all 100 sampled per round:
the same participants, ten times fewer clients. Time per round should follow the participants,
not the total. The last line is machine-readable::

    many_clients clients=1000 participants=100 s_per_round=<x> s_per_round_100_clients=<y> peak_rss_mb=<z>

Run: ``python benchmarks/many_clients.py [--rounds 4] [--memory-mb 16] [--workers 1]``
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
import warnings

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_fedprune.data.federated import FederatedDataset
from lightning_fedprune.models.modules import ClassifierModule
from lightning_fedprune.module import FederatedModuleMixin
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.simulation import SimulationEngine
from lightning_fedprune.strategies import Scaffold


class _Federated(FederatedModuleMixin, ClassifierModule):
    federated_example_input_shape = (64,)


def _data(num_clients: int, per_client: int, seed: int) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 10, generator=g)
    n = num_clients * per_client
    x = torch.randn(n + 500, 64, generator=g)
    y = (x @ teacher).argmax(1)
    return FederatedDataset(
        TensorDataset(x[:n], y[:n]), np.array_split(np.arange(n), num_clients), test=TensorDataset(x[n:], y[n:]), batch_size=20
    )


def run(num_clients: int, fraction: float, *, rounds: int, memory_mb: float, workers: int, seed: int) -> dict:
    torch.manual_seed(seed)
    module = _Federated("mlp", lr=0.05)
    fd = _data(num_clients, 20, seed)
    strategy = Scaffold(fraction_fit=fraction, seed=seed)
    engine = SimulationEngine(
        strategy=strategy, runtime=ClientRuntime(module, data=fd, seed=seed, evaluate_local=False, client_callbacks=strategy.client_callbacks),
        data=fd, seed=seed,
        workers=workers, client_memory_budget=int(memory_mb * 2**20),
    )
    times = []
    try:
        for rnd in range(rounds):
            t0 = time.perf_counter()
            rec = engine.run_round(rnd, last=rnd == rounds - 1)
            times.append(time.perf_counter() - t0)
    finally:
        engine.close()
    store = engine.store
    on_disk = sum(p.stat().st_size for p in store.spill_dir.glob("*.safetensors")) if store.spill_dir else 0
    out = {
        "s_per_round": statistics.median(times[1:] if len(times) > 1 else times),
        "participants": rec["num_selected"],
        "clients_with_state": len(store.client_ids()),
        "mem_mb": store.memory_bytes / 2**20,
        "disk_mb": on_disk / 2**20,
        "acc": rec["test_accuracy"],
    }
    print(
        f"[{num_clients} clients, {out['participants']} per round] {out['s_per_round']:.2f} s/round; clients with state "
        f"{out['clients_with_state']}; states in memory {out['mem_mb']:.1f} MB, on disk {out['disk_mb']:.1f} MB; "
        f"accuracy {out['acc']:.3f}"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--memory-mb", type=float, default=16.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec).*")
    big = run(1000, 0.1, rounds=args.rounds, memory_mb=args.memory_mb, workers=args.workers, seed=args.seed)
    small = run(100, 1.0, rounds=args.rounds, memory_mb=args.memory_mb, workers=args.workers, seed=args.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"peak RSS of this process: {peak:.0f} MB")
    print(
        f"many_clients clients=1000 participants={big['participants']} s_per_round={big['s_per_round']:.3f} "
        f"s_per_round_100_clients={small['s_per_round']:.3f} peak_rss_mb={peak:.0f}"
    )


if __name__ == "__main__":
    main()
