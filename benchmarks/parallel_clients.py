"""Parallel clients: the plain sequential PyTorch loop vs the engine with 1 and N worker processes.

Workloads (the same data, seeds and initial weights on every side):
    (a) the 2-conv MNIST CNN of ``engine_overhead.py`` on 10 clients x 200 random 28x28 samples;
    (b) VGG-11-BN on the CIFAR-10 subset in ``../shared/data`` (10 clients x ``--vgg-samples``
        images; skipped when the data is absent).

For each workload: wall seconds per round (median over rounds after the first, which starts the
workers) of the plain sequential FedAvg loop, of the engine with 1 worker (this process) and
with 2, ... up to the usable cores; the speed-up of N workers over 1 and over the plain loop;
whether the final global models of all engine runs are identical (they must be); the peak RSS of
this process and of its workers. The last line is machine-readable::

    parallel_clients speedup_2=<x> vs_plain_2=<y> identical=<True|False>

(from workload (a)). Run: ``python benchmarks/parallel_clients.py [--rounds 4] [--max-workers N]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import _Federated, plain_fedavg  # noqa: E402

from lightning_fedprune.data.federated import FederatedDataset  # noqa: E402
from lightning_fedprune.runtime import ClientRuntime  # noqa: E402
from lightning_fedprune.simulation import SimulationEngine, resolve_workers  # noqa: E402
from lightning_fedprune.strategies import FedAvg  # noqa: E402


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def engine_rounds(make_module, fd: FederatedDataset, *, rounds: int, seed: int, workers: int) -> tuple[list[float], dict]:
    module = make_module()
    engine = SimulationEngine(
        strategy=FedAvg(seed=seed), runtime=ClientRuntime(module, data=fd, seed=seed, evaluate_local=False),
        data=fd, seed=seed, workers=workers,  # evaluates every round, as the plain loop does
    )
    times = []
    try:
        for rnd in range(rounds):
            t0 = time.perf_counter()
            engine.run_round(rnd, last=rnd == rounds - 1)
            times.append(time.perf_counter() - t0)
    finally:
        engine.close()
    return times, {k: v.clone() for k, v in engine.strategy.global_state.items()}


def plain_rounds(make_module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int) -> float:
    model = copy.deepcopy(make_module().model)
    t0 = time.perf_counter()
    plain_fedavg(model, fd, rounds=rounds, lr=lr, seed=seed)
    return (time.perf_counter() - t0) / rounds


def measure(name: str, make_module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int, max_workers: int) -> dict:
    plain = plain_rounds(make_module, fd, rounds=rounds, lr=lr, seed=seed)
    per_round, finals = {}, {}
    for w in range(1, max_workers + 1):
        times, final = engine_rounds(make_module, fd, rounds=rounds, seed=seed, workers=w)
        per_round[w] = statistics.median(times[1:] if len(times) > 1 else times)
        finals[w] = final
    identical = all(all(torch.equal(finals[w][k], v) for k, v in finals[1].items()) for w in finals)
    print(f"[{name}] plain sequential loop: {plain:.3f} s/round")
    for w, t in per_round.items():
        print(f"[{name}] engine, {w} worker(s): {t:.3f} s/round  speed-up vs 1 worker {per_round[1] / t:.2f}x  vs plain {t / plain:.2f}x of its time")
    print(f"[{name}] final models identical across worker counts: {identical}")
    print(f"[{name}] peak RSS: this process {_peak_mb(resource.RUSAGE_SELF):.0f} MB, largest worker {_peak_mb(resource.RUSAGE_CHILDREN):.0f} MB")
    return {"plain": plain, "per_round": per_round, "identical": identical}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-workers", type=int, default=None, help="default: the usable cores")
    parser.add_argument("--vgg-samples", type=int, default=50, help="CIFAR images per client for VGG-11 (0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec).*")
    max_workers = args.max_workers or max(2, resolve_workers("auto"))
    print(f"usable cores: {resolve_workers('auto')}; workers 1..{max_workers}; rounds {args.rounds}")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2500, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2500,), generator=g)
    fd_cnn = FederatedDataset(TensorDataset(x[:2000], y[:2000]), np.array_split(np.arange(2000), 10), test=TensorDataset(x[2000:], y[2000:]), batch_size=20)

    def make_cnn() -> _Federated:
        torch.manual_seed(args.seed)
        m = _Federated("cnn_mnist", lr=0.01)
        m.federated_example_input_shape = (1, 28, 28)
        return m

    cnn = measure("cnn/random", make_cnn, fd_cnn, rounds=args.rounds, lr=0.01, seed=args.seed, max_workers=max_workers)

    if args.vgg_samples > 0:
        try:
            from lightning_fedprune.data import load_dataset

            splits = load_dataset("cifar10_subset")
        except Exception as err:  # no data here: say so and go on
            print(f"[vgg11/cifar10_subset] skipped: {err}")
        else:
            n = 10 * args.vgg_samples
            idx = np.arange(n)
            fd_vgg = FederatedDataset(splits.train, np.array_split(idx, 10), test=torch.utils.data.Subset(splits.test, range(200)), batch_size=20)

            def make_vgg() -> _Federated:
                torch.manual_seed(args.seed)
                m = _Federated("vgg11_bn", lr=0.01, num_classes=10)
                m.federated_example_input_shape = (3, 32, 32)
                return m

            measure("vgg11/cifar10_subset", make_vgg, fd_vgg, rounds=max(2, args.rounds // 2), lr=0.01, seed=args.seed, max_workers=max_workers)

    t1, t2 = cnn["per_round"][1], cnn["per_round"].get(2, cnn["per_round"][1])
    print(f"parallel_clients speedup_2={t1 / t2:.3f} vs_plain_2={t2 / cnn['plain']:.3f} identical={cnn['identical']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
