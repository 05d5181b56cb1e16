"""Pruning overhead: what structured pruning plans cost and what they save, one torch thread.

Measured in one run (medians of ``--repeats``):

    (a) per client, FedMP's server work (plan at ratio 0.5 from the global state: importance +
        selection, ``extract`` of the sub-model, ``recover`` of its update into the global shape)
        against that client's local compute: one local epoch of 50 batches of 32 on the ratio-0.5
        sub-model (the measured time of one forward + backward + SGD step, times 50), for
        ``cnn_mnist``, ``vgg11_bn`` and ``resnet32_cifar``; printed as a percentage (target <= 2%);
    (b) one local training step (forward + backward + SGD step, batch 64, 32x32 images) of the
        ratio-0.5 sub-model against the dense model, for ``vgg11_bn`` and ``timm:resnet18``:
        the speed-up (target >= 3x);
    (c) 100 plans at random ratios for ``cnn_mnist`` from one importance computation (one plan per
        client of a round, each with its own ratio): seconds (target < 1 s);
    (d) ``forward_flops`` on a batch of one (the per-sub-model FLOP count of the client runtime),
        dense and ratio 0.5, for ``cnn_mnist`` and ``vgg11_bn``: milliseconds per call.

The last line is machine-readable::

    pruning_overhead cnn_mnist_pct=.. vgg11_bn_pct=.. resnet32_pct=.. vgg11_speedup=.. resnet18_speedup=.. plan100_s=..

Run: ``python benchmarks/pruning_overhead.py [--repeats 5] [--quick]``
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_fedprune.core.flops import forward_flops
from lightning_fedprune.core.plans import Planner, resize_module
from lightning_fedprune.models import create_model, model_info


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _stepper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A closure running one forward + backward + SGD step of ``model`` on ``(x, y)``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward + SGD step."""
    return _median_time(_stepper(model, x, y), repeats, warmup=2)


def _setup(name: str, **kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    info = model_info(name, **kwargs)
    planner = Planner.from_module(model, info.example_input(1), unprunable=info.unprunable)
    model.train()
    return model, info, planner


def _sub_model(model, plan, state):
    sub = copy.deepcopy(model)
    resize_module(sub, plan.sub_shapes())
    sub.load_state_dict(plan.extract(state))
    return sub


def overhead_pct(name: str, repeats: int, step_repeats: int, *, ratio: float = 0.5, batches: int = 50, batch: int = 32) -> tuple[float, float, float]:
    """(server ms per client, local epoch ms, percentage)."""
    model, info, planner = _setup(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def server() -> None:
        plan = planner.plan(state, ratio)
        sub = plan.extract(state)
        plan.recover(sub, base=state)

    per_client = _median_time(server, repeats)
    plan = planner.plan(state, ratio)
    sub = _sub_model(model, plan, state)
    x = info.example_input(batch)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(0))
    epoch = _step_time(sub, x, y, step_repeats) * batches
    return per_client * 1e3, epoch * 1e3, 100.0 * per_client / epoch


def speedup(name: str, repeats: int, *, ratio: float = 0.5, batch: int = 64) -> tuple[float, float, float]:
    """(dense ms, sub-model ms, speed-up) of one training step."""
    model, info, planner = _setup(name)
    state = model.state_dict()
    sub = _sub_model(model, planner.plan(state, ratio), state)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    # alternate the two models' steps so that both see the same load on a shared machine
    steps = [_stepper(model, x, y), _stepper(sub, x, y)]
    times: list[list[float]] = [[], []]
    for i in range(2 + repeats):
        for j, step in enumerate(steps):
            t = time.perf_counter()
            step()
            if i >= 2:  # warm-up
                times[j].append(time.perf_counter() - t)
    dense, pruned = statistics.median(times[0]), statistics.median(times[1])
    return dense * 1e3, pruned * 1e3, dense / pruned


def plan100(repeats: int, *, n: int = 100, seed: int = 0) -> float:
    """Seconds for the importance of one global state + ``n`` plans at random ratios."""
    model, _, planner = _setup("cnn_mnist")
    state = model.state_dict()
    rng = random.Random(seed)
    ratios = [rng.uniform(0.0, 0.9) for _ in range(n)]

    def run() -> None:
        scores = planner.importance(state)
        for r in ratios:
            planner.plan(None, r, scores=scores)

    return _median_time(run, repeats)


def flops_ms(name: str, repeats: int, *, ratio: float = 0.5) -> tuple[float, float]:
    """(dense, ratio-0.5 sub-model) milliseconds per ``forward_flops`` call on a batch of one."""
    model, info, planner = _setup(name)
    state = model.state_dict()
    sub = _sub_model(model, planner.plan(state, ratio), state)
    x = info.example_input(1)
    return (
        _median_time(lambda: forward_flops(model, x), max(5, repeats * 5)) * 1e3,
        _median_time(lambda: forward_flops(sub, x), max(5, repeats * 5)) * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, under a minute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 2 if args.quick else max(1, args.repeats)
    step_repeats = 3 if args.quick else max(3, args.repeats)

    pct = {}
    for name in ("cnn_mnist", "vgg11_bn", "resnet32_cifar"):
        server_ms, epoch_ms, p = overhead_pct(name, repeats, step_repeats)
        pct[name] = p
        print(f"(a) {name:15s} plan+extract+recover {server_ms:8.2f} ms/client   local epoch (50x32, ratio 0.5) {epoch_ms:9.1f} ms   -> {p:.2f}%")
    sp = {}
    for name in ("vgg11_bn", "timm:resnet18"):
        dense_ms, sub_ms, s = speedup(name, step_repeats)
        sp[name] = s
        print(f"(b) {name:15s} train step (batch 64, 32x32): dense {dense_ms:7.1f} ms, ratio 0.5 {sub_ms:7.1f} ms -> x{s:.2f}")
    p100 = plan100(repeats)
    print(f"(c) cnn_mnist: importance + 100 plans at random ratios {p100:.3f} s")
    for name in ("cnn_mnist", "vgg11_bn"):
        dense_ms, sub_ms = flops_ms(name, repeats)
        print(f"(d) {name:15s} forward_flops (batch 1): dense {dense_ms:6.2f} ms/call, ratio 0.5 {sub_ms:6.2f} ms/call")
    print(
        f"pruning_overhead cnn_mnist_pct={pct['cnn_mnist']:.3f} vgg11_bn_pct={pct['vgg11_bn']:.3f} "
        f"resnet32_pct={pct['resnet32_cifar']:.3f} vgg11_speedup={sp['vgg11_bn']:.2f} "
        f"resnet18_speedup={sp['timm:resnet18']:.2f} plan100_s={p100:.3f}"
    )


if __name__ == "__main__":
    main()
