"""How large FedDP's lasso is against the task loss, per model: the measurement behind the default lambda.

The lasso ``lambda * sum_k E||linear(s_k)||_1`` sums over every gated output channel, so for a given
lambda it grows with the network's width. For each model (real data, batch 64, one torch thread,
keep ratio 0.5, plain SGD ``lr`` without the lasso) this prints the number of gated channels, the
cross-entropy and ``L1 = sum_k E||z_k||_1`` (the lasso per unit lambda) at initialization and
after ``--steps`` SGD steps, and the lasso's share of the total loss, ``lambda * L1 / (CE +
lambda * L1)``, at the end, for several lambdas. Then it trains the gated ``cnn_digits``
(48 gated channels) on digits for ``--epochs`` epochs with each lambda (SGD, lr 0.1, momentum 0.9, batch 50)
and prints the gated model's test accuracy and final L1. The last line is machine-readable::

    gate_lasso_scale <model>_channels=.. <model>_l1=.. <model>_ce=.. ... digits_acc_<lambda>=.. ...

Run: ``python benchmarks/gate_lasso_scale.py [--steps 20] [--epochs 8] [--models cnn_digits vgg11_bn resnet32_cifar]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lightning_fedprune.core.gates import GateSet
from lightning_fedprune.data import load_dataset
from lightning_fedprune.models import create_model

DATA = {"cnn_digits": "digits", "vgg11_bn": "cifar10_subset", "resnet32_cifar": "cifar10_subset"}
LAMBDAS = (5e-3, 1e-3, 1e-4, 1e-5)


def measure(name: str, steps: int, lr: float, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    splits = load_dataset(DATA[name])
    x_all, y_all = splits.train.tensors
    model = create_model(name, num_classes=splits.num_classes)
    gates = GateSet.for_model(model, x_all[:1], keep_ratio=0.5)
    gates.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {"channels": float(sum(s.out_channels for s in gates.sites))}
    for step in range(steps + 1):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        ce = F.cross_entropy(model(x_all[idx]), y_all[idx])
        l1 = float(gates.lasso(1.0).detach())
        if step == 0:
            out.update(ce0=float(ce.detach()), l1_0=l1)
        if step == steps:
            out.update(ce=float(ce.detach()), l1=l1)
            break
        opt.zero_grad()
        ce.backward()
        opt.step()
    return out


def train_digits(lam: float, epochs: int) -> tuple[float, float]:
    """Test accuracy and final L1 of the gated ``cnn_digits`` trained with lasso ``lam``."""
    torch.manual_seed(0)
    splits = load_dataset("digits")
    x, y = splits.train.tensors
    xt, yt = splits.test.tensors
    model = create_model("cnn_digits", num_classes=splits.num_classes)
    gates = GateSet.for_model(model, x[:1], keep_ratio=0.5)
    gates.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(x.shape[0], generator=gen).split(50):
            loss = F.cross_entropy(model(x[idx]), y[idx]) + gates.lasso(lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
        l1 = float(gates.lasso(1.0))
    return acc, l1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=list(DATA))
    args = ap.parse_args()
    torch.set_num_threads(1)
    line = []
    for name in args.models:
        m = measure(name, args.steps, args.lr, args.batch)
        shares = ", ".join(f"{lam:g}: {lam * m['l1'] / (m['ce'] + lam * m['l1']):.1%}" for lam in LAMBDAS)
        print(
            f"{name}: {m['channels']:.0f} gated channels; init CE {m['ce0']:.3f} L1 {m['l1_0']:.1f}; "
            f"after {args.steps} steps CE {m['ce']:.3f} L1 {m['l1']:.1f}; lasso share of the loss by lambda: {shares}"
        )
        line += [f"{name}_channels={m['channels']:.0f}", f"{name}_l1={m['l1']:.2f}", f"{name}_ce={m['ce']:.4f}"]
    for lam in (0.0, 1e-4, 1e-3, 5e-3):
        acc, l1 = train_digits(lam, args.epochs)
        print(f"cnn_digits trained {args.epochs} epochs with lambda {lam:g}: gated test accuracy {acc:.1%}, L1 {l1:.1f}")
        line.append(f"digits_acc_{lam:g}={acc:.4f}")
    print("gate_lasso_scale " + " ".join(line))


if __name__ == "__main__":
    main()
