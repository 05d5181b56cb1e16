"""FedMP's server-side algorithm overhead per round (the paper's Fig. 11), against local compute.

For N workers (default 100) on ``cnn_mnist`` this times, per round and on one thread:

* ``decide``: E-UCB choosing every worker's ratio, plans (L1 importance on the global model) and
  sub-model extraction for every worker: ``FedMP.configure_round``;
* ``aggregate``: R2SP recovery of every sub-model, averaging and the E-UCB updates:
  ``FedMP.aggregate`` (the results are the extracted sub-models themselves, so no training runs);
* ``local_step``: one plain forward+backward+SGD step of the full model on a batch of 32, as a
  yardstick.

    python benchmarks/fedmp_overhead.py [--workers 100] [--rounds 5] [--model cnn_mnist]

The last line is machine-readable:
``fedmp_overhead workers=100 decide_s=.. aggregate_s=.. round_s=.. local_step_ms=..``
(target: ``round_s`` < 1 for 100 workers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fedprune.config import FederatedClassifier  # noqa: E402
from lightning_fedprune.core.messages import ClientMetrics, ClientResult  # noqa: E402
from lightning_fedprune.runtime import build_planner  # noqa: E402
from lightning_fedprune.strategies import FedMP, ModelSpec  # noqa: E402


def _local_step_ms(module: FederatedClassifier, batch: int, repeats: int = 10) -> float:
    x = torch.randn(batch, *module.federated_example_input_shape)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="cnn_mnist")
    parser.add_argument("--input-shape", default="1,28,28")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    module = FederatedClassifier(args.model, lr=0.01, num_classes=10)
    module.federated_example_input_shape = tuple(int(v) for v in args.input_shape.split(","))
    t0 = time.perf_counter()
    planner = build_planner(module)
    graph_s = time.perf_counter() - t0
    strategy = FedMP(seed=0)
    strategy.initialize(
        ModelSpec(state={k: v.clone() for k, v in module.federated_state().items()}, trainable=module.trainable_names(), planner=planner),
        num_clients=args.workers,
    )
    workers = list(range(args.workers))
    decide, aggregate = [], []
    for rnd in range(args.rounds):
        t0 = time.perf_counter()
        tasks = strategy.configure_round(rnd, workers)
        decide.append(time.perf_counter() - t0)
        results = [
            ClientResult(
                rnd, t.client_id, t.weights,
                ClientMetrics(num_samples=600, num_steps=10, num_examples=320, loss_before=1.0, loss_after=0.9 - 0.001 * t.client_id,
                              compute_seconds=0.1),
                completion_time=1.0 + 0.01 * t.client_id,
            )
            for t in tasks
        ]
        t0 = time.perf_counter()
        strategy.aggregate(rnd, results, [])
        aggregate.append(time.perf_counter() - t0)
    d, a = statistics.median(decide), statistics.median(aggregate)
    step = _local_step_ms(module, 32)
    print(f"model {args.model}, {args.workers} workers, {args.rounds} rounds (medians), graph built once in {graph_s:.3f} s")
    print(f"  decide (E-UCB + plans + extraction): {d:.3f} s/round  ({1000 * d / args.workers:.2f} ms per worker)")
    print(f"  aggregate (R2SP recovery + average + E-UCB update): {a:.3f} s/round  ({1000 * a / args.workers:.2f} ms per worker)")
    print(f"  one full-model local step (batch 32): {step:.2f} ms; server work per worker = {(d + a) / args.workers * 1000 / step:.2f} local steps")
    print(f"fedmp_overhead workers={args.workers} decide_s={d:.3f} aggregate_s={a:.3f} round_s={d + a:.3f} local_step_ms={step:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
