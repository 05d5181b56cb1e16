"""Dense vs sparse (torch.sparse CSR) compute of pruned FC layers across pruning levels.

LeNet-300-100 (PruneFL Table 1) with its weights pruned to each level at 20%/20%/10% per level;
for each level one forward + backward pass of a batch (default 20, the paper's) is timed with
the layers computed densely (masked) and sparsely
(:func:`lightning_fedprune.core.sparse_linear.enable_sparse_forward` on every layer), in the same
run, with one torch thread, interleaving the two to share the machine's noise. Prints per level
the kept fraction of FC weights, both median times and their ratio, and the forward MACs ratio
(Eq. 1: ``p`` times the dense count).

Run: ``python benchmarks/sparse_fc.py [--levels 0 5 10 ...] [--batch 20] [--repeats 200]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_fedprune.core.masks import init_prune, layer_rates
from lightning_fedprune.core.sparse_linear import disable_sparse_forward, enable_sparse_forward
from lightning_fedprune.models import create_model


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def measure(level: int, *, batch: int, repeats: int, min_weights: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of forward+backward at one pruning level: dense (masked), every FC layer
    sparse, and only the FC layers with at least ``min_weights`` weights sparse."""
    torch.manual_seed(seed)
    model = create_model("lenet300_100")
    rates = layer_rates(model)
    masks = init_prune(model.state_dict(), rates, level)
    with torch.no_grad():
        for k, p in model.state_dict(keep_vars=True).items():
            if k in masks.masks:
                p.mul_(masks.masks[k])
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randn(batch, 784)
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {"dense": [], "sparse": [], "large": []}
    for _ in range(5):  # warm-up
        _step(model, x, y)
    for _ in range(repeats):
        for mode, samples in times.items():
            for key, layer in linears.items():
                if mode == "sparse" or (mode == "large" and layer.weight.numel() >= min_weights):
                    enable_sparse_forward(layer, masks.masks[key])
            t0 = time.perf_counter()
            _step(model, x, y)
            samples.append(time.perf_counter() - t0)
            for layer in linears.values():
                disable_sparse_forward(layer)
    out = {f"{mode}_s": statistics.median(v) for mode, v in times.items()}
    out.update(level=level, density=masks.density(), fc1_density=masks.density("features.0.weight"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 4, 5, 8, 10, 15, 20, 25, 30])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--min-weights", type=int, default=50_000, help="'large' column: only FC layers this big go sparse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"LeNet-300-100, batch {args.batch}, forward+backward, 1 torch thread, median of {args.repeats}")
    print("columns: dense = masked dense; all = every FC layer sparse; large = only FC layers with >= "
          f"{args.min_weights} weights sparse (here the 784x300 layer); ratios are over dense")
    head = f"{'level':>5} {'FC kept':>8} {'fc1 kept':>9} {'dense ms':>9} {'all ms':>7} {'all/dense':>10} {'large ms':>9} {'large/dense':>12} {'MACs ratio':>11}"
    print(head)
    for level in args.levels:
        r = measure(level, batch=args.batch, repeats=args.repeats, min_weights=args.min_weights)
        print(
            f"{r['level']:>5} {100 * r['density']:>7.2f}% {100 * r['fc1_density']:>8.2f}% {1e3 * r['dense_s']:>9.3f} "
            f"{1e3 * r['sparse_s']:>7.3f} {r['sparse_s'] / r['dense_s']:>10.2f} {1e3 * r['large_s']:>9.3f} "
            f"{r['large_s'] / r['dense_s']:>12.2f} {r['density']:>11.3f}"
        )


if __name__ == "__main__":
    main()
