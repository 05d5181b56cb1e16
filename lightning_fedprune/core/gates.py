"""Dynamic channel gates (FedDP, Yu et al.; feature boosting and suppression, Gao et al., ICLR 2019).

One gate per gated convolution ``conv_k`` (``nn.Conv2d`` with ``groups == 1``)::

    s_k      = avgpool(x_{k-1})                  (B, C_in)    the conv's INPUT, pooled to 1x1   (Eq. 6)
    z_k      = linear_k(s_k)                      (B, C_out)   the gate's logits
    g_k      = sigmoid(z_k)                       (B, C_out)   saliencies
    m_k      = top-k(g_k), k = ceil(keep_ratio * C_out)        per sample                      (Eq. 7)
    y_k      = (m_k * g_k) [:, :, None, None] * norm(conv_k(x_{k-1}))                          (Eq. 3-4)

Placement: the scale ``m_k * g_k`` multiplies the output of the BatchNorm that directly follows
the convolution (the conv's output itself when no BatchNorm reads it), i.e. AFTER the norm and
BEFORE the activation, as FBS does (``pi(x) * (norm(conv(x)) + beta)``, then ReLU). Because the
saliency is positive, ``relu(g * y) = g * relu(y)``: scaling before or after a ReLU is the same.
The kept channels are scaled by their saliency so that the gate's linear layer receives gradient
(through ``g`` of the kept channels); the dropped channels are exactly zero for that sample, so
neither the conv's filters, the norm's affine parameters nor the gate get gradient from them.
The next layer therefore sees only the kept channels as non-zero inputs (Eq. 3: it computes with
``theta[kept_out, kept_in]``), except where the network adds another stream (a residual add),
whose channels are non-zero again.

Lasso (Section IV-B): ``L_g = lambda * sum_k E_batch[ ||z_k||_1 ]``, on the gate's LINEAR OUTPUT
as the paper writes it (FBS's lasso is on its non-negative saliencies). It pulls the logits
towards 0, i.e. the saliencies towards 1/2, so it damps the gates' scaling and their spread;
it is computed on the logits recorded during the training step's forward.

Conventions and departures from the paper:

* ``k = ceil(keep_ratio * C_out)`` (rounded to 9 decimals first so that ``0.3 * 10`` keeps 3);
  ties in the top-k are broken by :func:`torch.topk` (lower index first on CPU).
* Every ``groups == 1`` convolution is gated, the first (on the image) and 1x1 shortcuts
  included; grouped / depthwise convolutions are left ungated (their channels cannot be chosen
  independently of their inputs) and listed by :func:`find_gate_sites`.
* In training the gated network computes the dense convolution and masks its output (the
  gradient is the one of the gated network); the compute saving is measured at inference:
  :func:`gated_flops_per_sample` (theoretical FLOPs, per sample) and :func:`gated_inference`
  (a real single-sample forward that convolves only the kept output channels with only the
  non-zero input channels, by indexing the weights).
* BatchNorm in training mode computes its batch statistics over every sample, dropped channels
  included (the mask follows the norm).
* Gates on a physically pruned sub-model (FedDP over FedMP): the gates are inserted on the
  received sub-model's convolutions (``k = ceil(keep_ratio * C_out')`` of ITS channels), while the
  client keeps one gate state at the FULL model's width. Each round the sub-model's gates are the
  full state sliced by the plan's kept channels (:func:`slice_gate_state`: ``linear.weight[kept_out]
  [:, kept_in]``, ``linear.bias[kept_out]``, with the conv's kept output and input channels in
  full-model coordinates) and after local training they are scattered back
  (:func:`scatter_gate_state`): positions the sub-model did not have keep their previous values bit
  for bit, so a client's gates survive any change of its sub-model's width or channels.
* FLOPs are ``2 x multiply-accumulates`` of convolutions and linear layers (biases, norms,
  activations and pooling are not counted), plus each gate's own cost: the pooling
  (``C_in * H * W`` additions) and its linear layer (``2 * C_in * C_out``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_fedprune.errors import ConfigError, ModelError

__all__ = [
    "GATE_ATTR",
    "DEFAULT_LASSO",
    "ChannelGate",
    "GateSite",
    "GateSet",
    "keep_count",
    "check_keep_ratio",
    "check_lasso",
    "subsample",
    "gate_scale",
    "lasso_value",
    "find_gate_sites",
    "conv_flops",
    "gate_flops",
    "gated_flops_per_sample",
    "dense_flops_per_sample",
    "gated_inference",
    "GateIndex",
    "widen_sites",
    "slice_gate_state",
    "scatter_gate_state",
]

#: attribute under which a gate is attached to its convolution while gated (so any optimizer built
#: from the network's parameters trains it; the backbone's own parameter names are unchanged)
GATE_ATTR = "channel_gate"

#: the default lambda of the gates' lasso. The lasso sums over every gated output channel, so its
#: size grows with the network's width. Measured with ``benchmarks/gate_lasso_scale.py`` (real
#: data, fresh gates, keep ratio 0.5): ``sum_k E||z_k||_1`` is 15 for ``cnn_digits`` (48 gated
#: channels), 177 for ResNet-32 (1,232) and 350 for VGG-11 (2,752), against a cross-entropy of
#: about 2.3, so after 20 SGD steps at lambda = 5e-3 (the paper's "alpha") the lasso is 3% / 27% /
#: 48% of the total loss, and it grows with the logits as training goes on. The gated
#: ``cnn_digits`` trained centrally for 8 epochs reaches 19% test accuracy with 5e-3, 86% without
#: a lasso, 91% with 1e-3 and 93% with 1e-4. At 1e-4 the lasso is 0.1% / 0.7% / 1.8% of the loss.
DEFAULT_LASSO = 1e-4


def check_keep_ratio(keep_ratio: Any) -> float:
    """``keep_ratio`` as a float in (0, 1].

    Raises:
        ConfigError: not a number in (0, 1].
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not (0.0 < float(keep_ratio) <= 1.0):
        raise ConfigError(f"`keep_ratio` must be a number in (0, 1] (the fraction of output channels each gate keeps), got {keep_ratio!r}")
    return float(keep_ratio)


def check_lasso(lasso: Any) -> float:
    """``lasso`` (lambda) as a finite float >= 0.

    Raises:
        ConfigError: negative, non-finite or not a number.
    """
    if isinstance(lasso, bool) or not isinstance(lasso, (int, float)) or not math.isfinite(float(lasso)) or float(lasso) < 0:
        raise ConfigError(f"`lasso` (lambda of the gates' L1 term) must be a finite number >= 0, got {lasso!r}")
    return float(lasso)


def keep_count(channels: int, keep_ratio: float) -> int:
    """``ceil(keep_ratio * channels)`` (at least 1), the number of channels a gate keeps."""
    keep_ratio = check_keep_ratio(keep_ratio)
    return max(1, min(int(channels), math.ceil(round(keep_ratio * channels, 9))))


def subsample(x: torch.Tensor) -> torch.Tensor:
    """Average-pool a ``(B, C, H, W)`` feature map to ``(B, C)`` (Eq. 6)."""
    return x.mean(dim=(2, 3))


def gate_scale(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``m * sigmoid(logits)``: the saliency of each sample's top-``k`` channels, 0 elsewhere.

    Differentiable with respect to ``logits`` through the kept channels only.
    """
    sal = torch.sigmoid(logits)
    idx = sal.topk(k, dim=1).indices
    mask = torch.zeros_like(sal).scatter_(1, idx, 1.0)
    return sal * mask


def lasso_value(logits: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """``lam * sum_k mean_b ||z_k[b]||_1`` over the gates' logits ``z_k`` of shape ``(B, C_out)``."""
    if not logits:
        return torch.zeros(())
    return lam * torch.stack([z.abs().sum(dim=1).mean() for z in logits]).sum()


class ChannelGate(nn.Module):
    """The gate of one convolution: avgpool -> linear -> sigmoid -> top-k (see module docstring).

    Args:
        in_channels: the gated convolution's input channels.
        out_channels: its output channels.
        keep_ratio: fraction of output channels kept per sample, in (0, 1].
    """

    def __init__(self, in_channels: int, out_channels: int, keep_ratio: float) -> None:
        super().__init__()
        self.linear = nn.Linear(int(in_channels), int(out_channels))
        self.k = keep_count(out_channels, keep_ratio)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, scale)`` of the conv input ``x``: both ``(B, C_out)``."""
        z = self.linear(subsample(x))
        return z, gate_scale(z, self.k)


@dataclass(frozen=True)
class GateSite:
    """Where one gate goes.

    Attributes:
        conv: qualified name of the gated convolution.
        placement: qualified name of the module whose output the gate scales (the BatchNorm that
            reads the conv's output, or the conv itself).
        in_channels / out_channels: the conv's channels.
    """

    conv: str
    placement: str
    in_channels: int
    out_channels: int


def _hooked_forward(model: nn.Module, x: torch.Tensor, hooks: Mapping[type, Any]) -> None:
    """One eval-mode, no-grad forward of ``model`` with forward hooks on the modules of the given
    types (the first matching type wins); the hooks are removed and the mode restored after."""
    handles = []
    for m in model.modules():
        hook = next((h for t, h in hooks.items() if isinstance(m, t)), None)
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _conv_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def find_gate_sites(model: nn.Module, example: torch.Tensor, layers: Sequence[str] | None = None) -> tuple[list[GateSite], list[str]]:
    """The gateable convolutions of ``model`` (traced with ``example``) and the skipped ones.

    A convolution is gateable when it is an ``nn.Conv2d`` with ``groups == 1`` and zero padding
    that runs in the forward of ``example``; a BatchNorm whose input is exactly the conv's output
    tensor becomes its placement. ``layers`` restricts gating to these conv names.

    Returns:
        ``(sites, skipped)``: sites in execution order; names of convolutions left ungated.

    Raises:
        ModelError: a name in ``layers`` is not a gateable convolution of the model (naming it),
            or the model has no gateable convolution.
    """
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    if layers is not None:
        for name in layers:
            m = modules.get(name)
            if m is None:
                raise ModelError(f"gate layer {name!r} is not a module of {type(model).__name__}")
            if not _conv_ok(m):
                raise ModelError(
                    f"gate layer {name!r} is a {type(m).__name__}"
                    + (f" with groups={m.groups}" if isinstance(m, nn.Conv2d) else "")
                    + ": only nn.Conv2d with groups=1 and zero padding can be gated"
                )
    outputs: dict[int, str] = {}
    order: list[str] = []
    placement: dict[str, str] = {}
    skipped: list[str] = []

    def conv_hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        n = names[m]
        if not _conv_ok(m) or (layers is not None and n not in layers):
            if isinstance(m, nn.Conv2d) and n not in skipped:
                skipped.append(n)
            return
        if n not in order:
            order.append(n)
            placement[n] = n
        outputs[id(out)] = n

    def bn_hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        src = outputs.get(id(args[0]))
        if src is not None and placement.get(src) == src:
            placement[src] = names[m]

    _hooked_forward(model, example, {nn.Conv2d: conv_hook, nn.BatchNorm2d: bn_hook})
    if not order:
        extra = f" (grouped or otherwise ungateable convolutions: {skipped})" if skipped else ""
        raise ModelError(
            f"{type(model).__name__} has no gateable layer: dynamic channel gates need nn.Conv2d layers with groups=1{extra}"
        )
    sites = []
    for n in order:
        conv = modules[n]
        sites.append(GateSite(conv=n, placement=placement[n], in_channels=conv.in_channels, out_channels=conv.out_channels))
    return sites, skipped


class GateSet(nn.Module):
    """The gates of one network, attachable to it and detachable again.

    While attached (:meth:`attach`), each gate is a child of its convolution (attribute
    :data:`GATE_ATTR`), so an optimizer built afterwards from the network's parameters trains it,
    and the backbone's parameter names stay as they were. The logits of the last forward are in
    :attr:`logits` (for the lasso; a forward starts when the first gated convolution runs) and
    the kept channels of each gated convolution in :attr:`kept`. :meth:`detach` removes hooks and
    gates.

    Args:
        sites: from :func:`find_gate_sites`.
        keep_ratio: fraction of output channels each gate keeps, in (0, 1].
    """

    def __init__(self, sites: Sequence[GateSite], keep_ratio: float) -> None:
        super().__init__()
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.sites = list(sites)
        self.gates = nn.ModuleDict({_key(s.conv): ChannelGate(s.in_channels, s.out_channels, self.keep_ratio) for s in self.sites})
        self.logits: list[torch.Tensor] = []
        self.kept: dict[str, torch.Tensor] = {}
        self._scale: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._model: nn.Module | None = None

    @classmethod
    def for_model(cls, model: nn.Module, example: torch.Tensor, *, keep_ratio: float, layers: Sequence[str] | None = None) -> GateSet:
        """Gates for every gateable convolution of ``model`` (see :func:`find_gate_sites`)."""
        check_keep_ratio(keep_ratio)
        sites, _ = find_gate_sites(model, example, layers)
        return cls(sites, keep_ratio)

    def gate(self, conv: str) -> ChannelGate:
        return self.gates[_key(conv)]  # type: ignore[return-value]

    # ------------------------------------------------------------------ state (never communicated)
    def gate_state(self) -> dict[str, torch.Tensor]:
        """Gate tensors keyed ``"<conv name>/<param>"`` (copies)."""
        return {f"{s.conv}/{k}": v.detach().clone() for s in self.sites for k, v in self.gate(s.conv).state_dict().items()}

    def load_gate_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`gate_state` of the same architecture.

        Raises:
            ModelError: a key is missing or unknown, or a shape differs (naming the key): gate
                state of another architecture.
        """
        own = {f"{s.conv}/{k}": v for s in self.sites for k, v in self.gate(s.conv).state_dict(keep_vars=True).items()}
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if unknown or missing:
            key = (unknown or missing)[0]
            what = "is not a gate of this model" if unknown else "is missing from the saved gate state"
            raise ModelError(f"gate state key {key!r} {what}: the saved gates belong to another architecture")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ModelError(
                    f"gate state key {k!r} has shape {tuple(v.shape)}, this model's gate expects {tuple(own[k].shape)}: "
                    "the saved gates belong to another architecture"
                )
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> None:
        """Insert the gates into ``model`` (hooks + gates as children of their convolutions)."""
        if self._model is not None:
            raise ModelError("these gates are already attached to a model")
        modules = dict(model.named_modules())
        for s in self.sites:
            conv = modules.get(s.conv)
            place = modules.get(s.placement)
            if not isinstance(conv, nn.Conv2d) or place is None:
                raise ModelError(f"gate layer {s.conv!r} (placement {s.placement!r}) is not in {type(model).__name__}")
            if (conv.in_channels, conv.out_channels) != (s.in_channels, s.out_channels):
                raise ModelError(
                    f"gate layer {s.conv!r} has {conv.in_channels}->{conv.out_channels} channels, the gate was made for "
                    f"{s.in_channels}->{s.out_channels}"
                )
            gate = self.gate(s.conv)
            conv.add_module(GATE_ATTR, gate)
            self._handles.append(conv.register_forward_pre_hook(self._pre_hook(s.conv, gate)))
            self._handles.append(place.register_forward_hook(self._post_hook(s.conv)))
        self._model = model

    def detach(self) -> None:
        """Remove the hooks and the gates from the model (the gates keep their values)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._model is not None:
            modules = dict(self._model.named_modules())
            for s in self.sites:
                conv = modules.get(s.conv)
                if conv is not None and GATE_ATTR in conv._modules:
                    del conv._modules[GATE_ATTR]
        self._model = None
        self.logits, self.kept, self._scale = [], {}, {}

    @property
    def attached(self) -> bool:
        return self._model is not None

    def _pre_hook(self, name: str, gate: ChannelGate) -> Any:
        first = name == self.sites[0].conv  # sites are in execution order: a new forward begins

        def hook(m: nn.Module, args: Any) -> None:
            if first:
                self.logits, self.kept, self._scale = [], {}, {}
            z, scale = gate(args[0])
            self.logits.append(z)
            self._scale[name] = scale
            self.kept[name] = scale.detach() > 0

        return hook

    def _post_hook(self, name: str) -> Any:
        def hook(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            scale = self._scale.pop(name, None)
            if scale is None:
                return out
            return out * scale[:, :, None, None].to(out.dtype)

        return hook

    def lasso(self, lam: float) -> torch.Tensor:
        """The lasso of the last forward's logits (:func:`lasso_value`)."""
        return lasso_value(self.logits, lam)

    def mean_saliency(self) -> float:
        """Mean sigmoid saliency over the last forward's gates and samples (a monitoring value)."""
        if not self.logits:
            return math.nan
        return float(torch.cat([torch.sigmoid(z.detach()).flatten() for z in self.logits]).mean())


def _key(conv: str) -> str:
    return conv.replace(".", "__")


# ---------------------------------------------------------------------------------------------- sub-models
#: a gated convolution's kept ``(output channels, input channels)`` in full-model coordinates
#: (sorted int64 indices; ``None``: every channel of that side)
GateIndex = tuple[torch.Tensor | None, torch.Tensor | None]


def widen_sites(sites: Sequence[GateSite], full_channels: Mapping[str, tuple[int, int]]) -> list[GateSite]:
    """The sub-model's gate sites at the full model's width: ``full_channels[conv] = (C_out, C_in)``.

    Raises:
        ModelError: a site's convolution has no full width (naming it).
    """
    out = []
    for s in sites:
        if s.conv not in full_channels:
            raise ModelError(f"gate layer {s.conv!r} has no full-model width: the plan does not know its weight")
        c_out, c_in = full_channels[s.conv]
        out.append(GateSite(conv=s.conv, placement=s.placement, in_channels=int(c_in), out_channels=int(c_out)))
    return out


def _split(key: str, index: Mapping[str, GateIndex]) -> tuple[GateIndex, str]:
    conv, _, param = key.rpartition("/")
    if conv not in index:
        raise ModelError(f"gate state key {key!r}: layer {conv!r} has no kept-channel index in the sub-model")
    if param not in ("linear.weight", "linear.bias"):
        raise ModelError(f"gate state key {key!r} is not a gate's linear weight or bias")
    return index[conv], param


def slice_gate_state(full: Mapping[str, torch.Tensor], index: Mapping[str, GateIndex]) -> dict[str, torch.Tensor]:
    """Full-width gate tensors (keys ``"<conv>/linear.weight|bias"``) sliced to a sub-model's gates.

    ``linear.weight`` ``(C_out, C_in)`` becomes ``weight[kept_out][:, kept_in]`` and ``linear.bias``
    ``bias[kept_out]``, with ``index[conv] = (kept_out, kept_in)`` (new contiguous tensors).

    Raises:
        ModelError: a key whose layer has no index (naming the key).
    """
    out = {}
    for key, v in full.items():
        (o, i), param = _split(key, index)
        t = v.detach()
        if o is not None:
            t = t.index_select(0, o)
        if param == "linear.weight" and i is not None:
            t = t.index_select(1, i)
        out[key] = t.clone(memory_format=torch.contiguous_format)
    return out


def scatter_gate_state(
    full: Mapping[str, torch.Tensor], sub: Mapping[str, torch.Tensor], index: Mapping[str, GateIndex]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`slice_gate_state`, in a NEW dict: ``full`` with the sub-model's gate
    tensors written at their kept positions; every other position is ``full``'s, bit for bit.

    Raises:
        ModelError: ``sub`` and ``full`` have different keys, a key has no index, or a sub tensor's
            shape is not the sliced shape (naming the key).
    """
    if set(full) != set(sub):
        key = sorted(set(full) ^ set(sub))[0]
        raise ModelError(f"gate state key {key!r} is in only one of the full-width and the sub-model gate states")
    out = {}
    for key, v in full.items():
        (o, i), param = _split(key, index)
        rows = o if o is not None else torch.arange(v.shape[0])
        new = v.detach().clone()
        s = sub[key].detach().to(new.dtype)
        if param == "linear.weight":
            cols = i if i is not None else torch.arange(v.shape[1])
            if tuple(s.shape) != (rows.numel(), cols.numel()):
                raise ModelError(f"gate state key {key!r} has shape {tuple(s.shape)}, its kept channels give {(rows.numel(), cols.numel())}")
            new[rows[:, None], cols[None, :]] = s
        else:
            if tuple(s.shape) != (rows.numel(),):
                raise ModelError(f"gate state key {key!r} has shape {tuple(s.shape)}, its kept channels give {(rows.numel(),)}")
            new[rows] = s
        out[key] = new
    return out


# ---------------------------------------------------------------------------------------------- FLOPs
def conv_flops(conv: nn.Conv2d, in_kept: int, out_kept: int, out_hw: tuple[int, int]) -> float:
    """``2 * out_kept * (in_kept / groups) * kh * kw * H_out * W_out``."""
    kh, kw = conv.kernel_size
    return 2.0 * out_kept * (in_kept / conv.groups) * kh * kw * out_hw[0] * out_hw[1]


def gate_flops(in_channels: int, out_channels: int, in_hw: tuple[int, int]) -> float:
    """One gate's cost per sample: pooling ``C_in * H * W`` + linear ``2 * C_in * C_out``."""
    return float(in_channels * in_hw[0] * in_hw[1] + 2 * in_channels * out_channels)


def _nonzero_channels(x: torch.Tensor) -> torch.Tensor:
    """Per sample, the number of channels (dim 1) with any non-zero entry: ``(B,)``."""
    return (x.detach().flatten(2).abs().amax(dim=2) > 0).sum(dim=1) if x.dim() > 2 else (x.detach() != 0).sum(dim=1)


def _count(model: nn.Module, x: torch.Tensor, gates: GateSet | None) -> torch.Tensor:
    b = x.shape[0]
    total = torch.zeros(b, dtype=torch.float64)
    gate_modules = {id(g.linear) for g in gates.gates.values()} if gates is not None else set()
    conv_names = {m: n for n, m in model.named_modules()}

    def conv_hook(m: nn.Conv2d, args: Any, out: torch.Tensor) -> None:
        nonlocal total
        inp = args[0]
        hw = (out.shape[2], out.shape[3])
        name = conv_names.get(m)
        if gates is None:
            total = total + conv_flops(m, m.in_channels, m.out_channels, hw)
            return
        kin = _nonzero_channels(inp).double()
        if name in gates.kept:
            kout = gates.kept[name].sum(dim=1).double()
            total = total + gate_flops(m.in_channels, m.out_channels, (inp.shape[2], inp.shape[3]))
        else:
            kout = torch.full((b,), float(m.out_channels), dtype=torch.float64)
        kh, kw = m.kernel_size
        total = total + 2.0 * kout * (kin / m.groups) * kh * kw * hw[0] * hw[1]

    def linear_hook(m: nn.Linear, args: Any, out: torch.Tensor) -> None:
        nonlocal total
        if id(m) in gate_modules:
            return  # counted by gate_flops
        inp = args[0].reshape(b, -1, m.in_features)
        if gates is None:
            total = total + 2.0 * m.in_features * m.out_features * inp.shape[1]
            return
        nz = (inp.detach() != 0).sum(dim=2).double().sum(dim=1)  # non-zero inputs, over any extra dims
        total = total + 2.0 * nz * m.out_features

    _hooked_forward(model, x, {nn.Conv2d: conv_hook, nn.Linear: linear_hook})
    return total


def dense_flops_per_sample(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Theoretical FLOPs per sample of the dense network (every channel computed): ``(B,)``."""
    return _count(model, x, None)


def gated_flops_per_sample(model: nn.Module, gates: GateSet, x: torch.Tensor) -> torch.Tensor:
    """Theoretical FLOPs per sample of the gated network (``gates`` attached to ``model``): ``(B,)``.

    A gated convolution computes its kept output channels from the input channels that are
    non-zero for that sample, plus its gate's cost; ungated convolutions compute every output
    channel from the non-zero inputs; linear layers multiply only non-zero inputs.
    """
    if not gates.attached:
        raise ModelError("attach the gates to the model before counting gated FLOPs")
    return _count(model, x, gates)


# ---------------------------------------------------------------------------------------------- inference
@contextlib.contextmanager
def gated_inference(model: nn.Module, gates: GateSet) -> Iterator[None]:
    """Within the context, each gated convolution of ``model`` computes only what the gate keeps.

    For every sample (loop over the batch; meant for single-sample inference) a gated conv
    computes ``conv(x[kept_in], W[kept_out][:, kept_in])`` with ``kept_out`` its gate's top-k and
    ``kept_in`` the input channels that are non-zero for the sample, and scatters the result into
    a zero output; the norm and the gate's scale follow as in training. Outputs equal the masked
    dense forward up to float rounding. ``gates`` must be attached.
    """
    if not gates.attached:
        raise ModelError("attach the gates to the model before gated inference")
    modules = dict(model.named_modules())
    originals: dict[str, Any] = {}

    def make_forward(name: str, conv: nn.Conv2d, gate: ChannelGate) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            scale = gates._scale.get(name)
            if scale is None:  # no pre-hook ran (should not happen): dense
                return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
            outs = []
            for i in range(x.shape[0]):
                xi = x[i : i + 1]
                out_idx = (scale[i] > 0).nonzero().squeeze(1)
                in_idx = (xi[0].flatten(1).abs().amax(dim=1) > 0).nonzero().squeeze(1)
                w = conv.weight.index_select(0, out_idx).index_select(1, in_idx)
                bias = conv.bias.index_select(0, out_idx) if conv.bias is not None else None
                y = F.conv2d(xi.index_select(1, in_idx), w, bias, conv.stride, conv.padding, conv.dilation)
                full = y.new_zeros((1, conv.out_channels, y.shape[2], y.shape[3]))
                full.index_copy_(1, out_idx, y)
                outs.append(full)
            return torch.cat(outs, 0)

        return forward

    try:
        for s in gates.sites:
            conv = modules[s.conv]
            originals[s.conv] = conv.__dict__.get("forward")
            conv.forward = make_forward(s.conv, conv, gates.gate(s.conv))  # type: ignore[method-assign]
        yield
    finally:
        for name, orig in originals.items():
            conv = modules[name]
            if orig is None:
                conv.__dict__.pop("forward", None)
            else:
                conv.forward = orig  # type: ignore[method-assign]
