"""Gated single-sample inference against the dense model on CPU, one torch thread.

For ``vgg11_bn`` and ``resnet32_cifar`` (32x32 inputs, keep ratio 0.5 by default), measured in one
run (best of ``--repeats`` timings of ``--samples`` single-sample forwards, eval mode, no grad):

    (a) the dense model;
    (b) the gated model computed densely and masked (what training computes);
    (c) gated inference (:func:`lightning_fedprune.core.gates.gated_inference`): every gated
        convolution convolves only its gate's kept output channels from the non-zero input
        channels, by indexing the weights;

and the theoretical FLOPs per sample (dense, gated; :func:`gated_flops_per_sample`). The gates
here are freshly initialized (the kept channels depend on the input, their number only on the
keep ratio); inputs are standard-normal images. The speed-up is ``dense / gated inference``.

The last line is machine-readable::

    gated_inference vgg11_bn_speedup=.. vgg11_bn_flops_ratio=.. resnet32_cifar_speedup=.. resnet32_cifar_flops_ratio=..

Run: ``python benchmarks/gated_inference.py [--keep-ratio 0.5] [--samples 20] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_fedprune.core.gates import GateSet, dense_flops_per_sample, gated_flops_per_sample, gated_inference
from lightning_fedprune.models import create_model


def _best(fn, samples: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(samples):
            fn()
        best = min(best, (time.perf_counter() - t0) / samples)
    return best


def measure(name: str, keep_ratio: float, samples: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    xs = torch.randn(samples, 1, 3, 32, 32)
    it = iter(range(10**9))

    def one() -> None:
        model(xs[next(it) % samples])

    with torch.no_grad():
        dense_s = _best(one, samples, repeats)
        gates = GateSet.for_model(model, xs[0], keep_ratio=keep_ratio)
        dense_flops = float(dense_flops_per_sample(model, xs[0])[0])
        gates.attach(model)
        masked_s = _best(one, samples, repeats)
        with gated_inference(model, gates):
            gated_s = _best(one, samples, repeats)
        gated_flops = float(torch.stack([gated_flops_per_sample(model, gates, x)[0] for x in xs]).mean())
        gates.detach()
    return {
        "dense_ms": dense_s * 1e3, "masked_ms": masked_s * 1e3, "gated_ms": gated_s * 1e3,
        "speedup": dense_s / gated_s, "dense_mflops": dense_flops / 1e6, "gated_mflops": gated_flops / 1e6,
        "flops_ratio": gated_flops / dense_flops, "gates": len(gates.sites),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet32_cifar"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tail = []
    print(f"gated single-sample inference, keep ratio {args.keep_ratio}, 1 torch thread")
    print(f"{'model':<16}{'gates':>6}{'dense ms':>10}{'masked ms':>11}{'gated ms':>10}{'speed-up':>10}{'dense MFLOPs':>14}{'gated MFLOPs':>14}{'ratio':>8}")
    for name in args.models:
        r = measure(name, args.keep_ratio, args.samples, args.repeats)
        print(
            f"{name:<16}{r['gates']:>6}{r['dense_ms']:>10.2f}{r['masked_ms']:>11.2f}{r['gated_ms']:>10.2f}{r['speedup']:>9.2f}x"
            f"{r['dense_mflops']:>14.1f}{r['gated_mflops']:>14.1f}{r['flops_ratio']:>8.1%}"
        )
        tail += [f"{name}_speedup={r['speedup']:.2f}", f"{name}_flops_ratio={r['flops_ratio']:.3f}"]
    print("paper (Table I): VGG-11 15.48 G -> 7.74 G, ResNet-32 7.36 G -> 3.68 G FLOPs (50%)")
    print("gated_inference " + " ".join(tail))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
