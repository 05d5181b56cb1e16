"""Sparse compute for pruned fully connected layers (torch.sparse, CSR on the CPU).

PruneFL computes pruned FC layers with sparse matrices instead of masked dense ones (Sec. 4.1):
the forward pass costs ``O(p * m * k * n)`` for a layer of density ``p`` (Eq. 1). Here the
layer's ``weight`` parameter stays dense (so ``state_dict`` keys, optimizers and callbacks are
untouched) and only the arithmetic is sparse:

* forward: ``y = W_csr @ x^T`` with ``W_csr`` built from the kept entries of ``weight``
  (``torch.sparse_csr_tensor``, structure precomputed once per mask);
* backward: ``dx = W^T_csr @ dy^T`` and the gradient of the kept entries only,
  ``torch.sparse.sampled_addmm(W pattern, dy^T, x)``, scattered into a dense ``weight.grad``
  that is zero at pruned positions.

:func:`enable_sparse_forward` switches an ``nn.Linear`` to this path for a given mask (it
replaces the instance's ``forward``; parameters stay the same objects) and
:func:`disable_sparse_forward` switches it back. Results equal the masked dense layer up to
floating point summation order. Sparse arithmetic only pays off below some density and above some
layer size, as the paper notes for optimized dense kernels (Sec. 4.2): on a 2-core x86 CPU with
MKL and batch 20, a 784x300 layer trains faster sparsely below about 2% density and small layers
never do, the fixed cost per sparse layer being some 0.15 ms (``benchmarks/sparse_fc.py``).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_fedprune.errors import ConfigError

__all__ = ["SparsePattern", "sparse_linear", "enable_sparse_forward", "disable_sparse_forward", "is_sparse_forward"]

_ATTR = "_lfp_sparse_pattern"
_WARNED = False


@dataclass(frozen=True)
class SparsePattern:
    """The fixed structure of a pruned ``(out, in)`` weight, in CSR form for ``W`` and ``W^T``.

    Attributes:
        shape: ``(out_features, in_features)``.
        flat_index: row-major flat positions of the kept entries (the CSR value order).
        crow, col: CSR row pointers and column indices of ``W``.
        t_perm: positions in ``flat_index`` order of the entries of ``W^T`` in its CSR order.
        t_crow, t_col: CSR row pointers and column indices of ``W^T``.
    """

    shape: tuple[int, int]
    flat_index: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    t_perm: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> SparsePattern:
        """Build from a 2-D bool mask (``True`` = kept)."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ConfigError(f"a sparse FC pattern needs a 2-D bool mask, got {mask.dtype} {tuple(mask.shape)}")
        out_f, in_f = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)
        flat = rows * in_f + cols
        crow = torch.zeros(out_f + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
        t_flat = cols * out_f + rows  # positions in W^T, row-major
        t_perm = torch.argsort(t_flat, stable=True)
        t_rows = cols[t_perm]
        t_crow = torch.zeros(in_f + 1, dtype=torch.int64)
        t_crow[1:] = torch.cumsum(torch.bincount(t_rows, minlength=in_f), 0)
        return cls((int(out_f), int(in_f)), flat, crow, cols.clone(), t_perm, t_crow, rows[t_perm].clone())

    @property
    def nnz(self) -> int:
        return int(self.flat_index.numel())

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.t_crow, self.t_col, values.index_select(0, self.t_perm), (self.shape[1], self.shape[0]), check_invariants=False
        )


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsePattern) -> torch.Tensor:  # type: ignore[override]
        values = weight.detach().reshape(-1).index_select(0, pattern.flat_index)
        x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
        csr = pattern.csr(values)
        yt = csr @ x2.t().contiguous()  # (out, B): CSR times a contiguous dense matrix is the fast path
        y = yt.t() if bias is None else torch.add(bias.detach(), yt.t())
        ctx.save_for_backward(x2, values)
        ctx.csr = csr
        ctx.pattern = pattern
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], pattern.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        gy = grad_out.reshape(-1, pattern.shape[0])
        gyt = gy.t().contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (pattern.csr_t(values) @ gyt).t().reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # gradient of the kept entries only: (dy^T x) sampled at the pattern (beta=0 ignores the values)
            sampled = torch.sparse.sampled_addmm(ctx.csr, gyt, x2, beta=0.0)
            grad_w = torch.zeros(pattern.shape[0] * pattern.shape[1], dtype=values.dtype)
            grad_w.index_copy_(0, pattern.flat_index, sampled.values())
            grad_w = grad_w.view(pattern.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b, None


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsePattern) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` computed with sparse matrices (see the module docstring)."""
    if tuple(weight.shape) != pattern.shape:
        raise ConfigError(f"weight of shape {tuple(weight.shape)} does not match the sparse pattern {pattern.shape}")
    global _WARNED
    if not _WARNED:  # torch warns once per process that CSR support is "beta"; keep it out of users' logs
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            out = _SparseLinearFn.apply(x, weight, bias, pattern)
        _WARNED = True
        return out
    return _SparseLinearFn.apply(x, weight, bias, pattern)


def _sparse_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return sparse_linear(x, self.weight, self.bias, getattr(self, _ATTR))


def enable_sparse_forward(layer: nn.Linear, mask: torch.Tensor) -> SparsePattern:
    """Compute ``layer`` sparsely with ``mask`` from now on (the weight's pruned entries are ignored).

    Raises:
        ConfigError: ``layer`` is not an ``nn.Linear`` or the mask's shape differs.
    """
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"sparse compute is for nn.Linear layers, got {type(layer).__name__}")
    if tuple(mask.shape) != tuple(layer.weight.shape):
        raise ConfigError(f"mask of shape {tuple(mask.shape)} does not fit the layer's weight {tuple(layer.weight.shape)}")
    pattern = SparsePattern.from_mask(mask.to(torch.bool))
    object.__setattr__(layer, _ATTR, pattern)
    object.__setattr__(layer, "forward", types.MethodType(_sparse_forward, layer))
    return pattern


def disable_sparse_forward(layer: nn.Module) -> None:
    """Undo :func:`enable_sparse_forward` (no-op on a layer computed densely)."""
    if _ATTR in layer.__dict__:
        del layer.__dict__[_ATTR]
        layer.__dict__.pop("forward", None)


def is_sparse_forward(layer: nn.Module) -> bool:
    """Whether :func:`enable_sparse_forward` is active on ``layer``."""
    return _ATTR in layer.__dict__
