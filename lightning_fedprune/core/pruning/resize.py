"""Reshape a module in place to given tensor shapes (full model <-> sub-models), without tracing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_fedprune.errors import ModelError

__all__ = ["resize_module"]

_CONV = nn.modules.conv._ConvNd
#: Gate blocks per hidden unit of each ``nn.RNNBase`` mode (rows ``g * H + j`` of unit ``j``).
RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_NORM_FEATURES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def resize_module(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> None:
    """Reshape ``model`` IN PLACE so that every tensor named in ``shapes`` has that shape.

    Changed parameters become new ``Parameter`` objects (same ``requires_grad``, dtype and device,
    zero values: load the weights next); changed buffers new zero tensors. Module attributes are
    fixed from the new shapes: ``Linear`` in/out features, ``ConvNd`` in/out channels (and
    ``groups`` of depthwise convolutions), ``BatchNorm`` / ``InstanceNorm`` ``num_features``,
    ``LayerNorm`` ``normalized_shape``, ``GroupNorm`` ``num_channels``, ``Embedding`` sizes,
    ``PReLU`` ``num_parameters``, ``LSTM`` / ``GRU`` / ``RNN`` ``input_size`` / ``hidden_size``
    (flat weights refreshed), ``MultiheadAttention`` ``embed_dim`` / ``num_heads`` (``head_dim``
    kept: plans prune whole heads) and, for an attention block written as timm's (a ``qkv`` Linear
    and int ``num_heads`` / ``head_dim``), ``num_heads`` (and ``attn_dim``) from its qkv rows. Bare
    parameters of a model's own modules (ConvNeXt's ``gamma``, ViT's ``cls_token`` and
    ``pos_embed``, layer scales) are resized as they are: such modules read their shapes from the
    tensors. PyTorch's own module types not listed here are refused. Tied tensors (one parameter
    under several names) stay tied. Works from a full model to a sub-model and between sub-model
    shapes. Tensors whose shape already matches are untouched.

    Args:
        model: The module to reshape (keys are relative to it, as in ``model.state_dict()``).
        shapes: Target shape per ``state_dict`` key (any subset of the keys).

    Raises:
        ModelError: If a key is unknown, or a changed tensor belongs to a module type whose
            attributes cannot be fixed (naming the module), or the new shapes are inconsistent.
            Everything is checked before the model is modified.
    """
    # every (module, attribute) holding each tensor, so tied tensors are replaced everywhere
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
    lookup: dict[str, tuple[nn.Module, str, str, torch.Tensor]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None:
                continue
            key = f"{mod_name}.{attr}" if mod_name else attr
            holders.setdefault(id(t), []).append((module, attr, mod_name))
            lookup.setdefault(key, (module, attr, mod_name, t))

    changes: dict[int, tuple[torch.Tensor, tuple[int, ...], str]] = {}
    for key, shape in shapes.items():
        if key not in lookup:
            raise ModelError(f"resize_module: {type(model).__name__} has no parameter or buffer {key!r}")
        shape_t = tuple(int(s) for s in shape)
        _, _, _, t = lookup[key]
        if len(shape_t) != t.dim() or any(s < 0 for s in shape_t):
            raise ModelError(f"resize_module: {key!r} is {t.dim()}-d, cannot take shape {shape_t}")
        if shape_t == tuple(t.shape):
            continue
        prev = changes.get(id(t))
        if prev is not None and prev[1] != shape_t:
            raise ModelError(f"resize_module: tied tensors {prev[2]!r} and {key!r} are given different shapes")
        changes[id(t)] = (t, shape_t, key)
    if not changes:
        return

    touched: dict[int, tuple[nn.Module, str]] = {}
    for tid in changes:
        for module, _, mod_name in holders[tid]:
            touched[id(module)] = (module, mod_name)
    for module, mod_name in touched.values():
        _check_fixable(module, mod_name)
    # attention modules whose qkv projection changes (the projection itself is a touched Linear)
    for mod_name, module in model.named_modules():
        qkv = getattr(module, "qkv", None)
        if is_head_attention(module) and id(qkv.weight) in changes:
            touched[id(module)] = (module, mod_name)

    # new tensors first, then attributes, checked before anything is assigned
    new_tensors: dict[int, torch.Tensor] = {}
    for tid, (t, shape_t, _) in changes.items():
        data = torch.zeros(shape_t, dtype=t.dtype, device=t.device)
        new_tensors[tid] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    plans = []
    for module, mod_name in touched.values():
        def tensor(attr: str, module: nn.Module = module) -> torch.Tensor | None:
            t = module._parameters.get(attr, module._buffers.get(attr))
            if t is None:
                return None
            return new_tensors.get(id(t), t)

        if is_head_attention(module):
            plans.append((module, _head_attributes(module, mod_name, new_tensors)))
        else:
            plans.append((module, _attributes(module, mod_name, tensor)))

    for tid, new in new_tensors.items():
        for module, attr, _ in holders[tid]:
            if attr in module._parameters:
                module._parameters[attr] = new
            else:
                module._buffers[attr] = new
    for module, attrs in plans:
        for name, value in attrs.items():
            setattr(module, name, value)
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()


_SUPPORTED = (
    _CONV, nn.Linear, *_NORM_FEATURES, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.PReLU, nn.RNNBase,
    nn.MultiheadAttention,
)


def _is_builtin(module: nn.Module) -> bool:
    """True for PyTorch's own module types (whose shape attributes would need fixing)."""
    return type(module).__module__.split(".")[0] == "torch"


def is_head_attention(module: nn.Module) -> bool:
    """A multi-head attention block written as timm's: a ``qkv`` Linear of ``3 * num_heads * head_dim``
    outputs and int ``num_heads`` / ``head_dim`` attributes (timm ``Attention``)."""
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
    )


def _check_fixable(module: nn.Module, name: str) -> None:
    if not isinstance(module, _SUPPORTED) and not _is_builtin(module):
        return  # bare parameters of a model's own module (layer scale, cls_token, pos_embed): no attributes
    if not isinstance(module, _SUPPORTED):
        raise ModelError(
            f"resize_module: cannot change tensors of module {name!r} ({type(module).__name__}); supported: "
            "Linear, ConvNd, BatchNorm, InstanceNorm, LayerNorm, GroupNorm, Embedding, PReLU, LSTM, GRU, RNN, "
            "MultiheadAttention, and bare parameters of modules that are not PyTorch's own."
        )
    if isinstance(module, nn.RNNBase) and getattr(module, "proj_size", 0):
        raise ModelError(f"resize_module: {type(module).__name__} {name!r} with proj_size > 0 is not supported")
    if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        raise ModelError(f"resize_module: MultiheadAttention {name!r} with kdim / vdim != embed_dim is not supported")


def _head_attributes(module: nn.Module, name: str, new_tensors: Mapping[int, torch.Tensor]) -> dict[str, object]:
    """``num_heads`` (and ``attn_dim``) of a timm-style attention block from its new qkv rows; the
    head dimension is kept (plans prune whole heads)."""
    w = new_tensors.get(id(module.qkv.weight), module.qkv.weight)
    rows = w.shape[0]
    if rows % (3 * module.head_dim):
        raise ModelError(
            f"resize_module: module {name!r} ({type(module).__name__}): {rows} qkv outputs are not 3 x whole heads "
            f"of head_dim={module.head_dim}"
        )
    heads = rows // (3 * module.head_dim)
    attrs: dict[str, object] = {"num_heads": heads}
    if isinstance(getattr(module, "attn_dim", None), int):
        attrs["attn_dim"] = heads * module.head_dim
    return attrs


def _attributes(module: nn.Module, name: str, tensor) -> dict[str, object]:
    """New shape attributes of ``module`` given its (possibly new) tensors; raises on inconsistency."""

    def bad(msg: str) -> ModelError:
        return ModelError(f"resize_module: module {name!r} ({type(module).__name__}): {msg}")

    if isinstance(module, nn.Linear):
        w = tensor("weight")
        b = tensor("bias")
        if b is not None and b.shape[0] != w.shape[0]:
            raise bad(f"bias has {b.shape[0]} entries for {w.shape[0]} outputs")
        return {"out_features": w.shape[0], "in_features": w.shape[1]}
    if isinstance(module, _CONV):
        w = tensor("weight")
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.transposed:
            if depthwise:
                raise bad("depthwise transposed convolutions are not supported")
            in_ch, out_ch, groups = w.shape[0], w.shape[1] * module.groups, module.groups
        elif depthwise:
            if w.shape[1] != 1:
                raise bad(f"a depthwise convolution needs weight of shape (C, 1, ...), got {tuple(w.shape)}")
            in_ch = out_ch = groups = w.shape[0]
        else:
            out_ch, in_ch, groups = w.shape[0], w.shape[1] * module.groups, module.groups
            if out_ch % groups:
                raise bad(f"{out_ch} output channels are not divisible by groups={groups}")
        b = tensor("bias")
        if b is not None and b.shape[0] != out_ch:
            raise bad(f"bias has {b.shape[0]} entries for {out_ch} output channels")
        return {"in_channels": in_ch, "out_channels": out_ch, "groups": groups}
    if isinstance(module, _NORM_FEATURES):
        sizes = {t.shape[0] for a in ("weight", "bias", "running_mean", "running_var") if (t := tensor(a)) is not None}
        if len(sizes) != 1:
            raise bad(f"weight/bias/running statistics disagree on the number of features: {sorted(sizes)}")
        return {"num_features": sizes.pop()}
    if isinstance(module, nn.LayerNorm):
        shapes = {tuple(t.shape) for a in ("weight", "bias") if (t := tensor(a)) is not None}
        if len(shapes) != 1:
            raise bad(f"weight and bias shapes disagree: {sorted(shapes)}")
        return {"normalized_shape": shapes.pop()}
    if isinstance(module, nn.GroupNorm):
        sizes = {t.shape[0] for a in ("weight", "bias") if (t := tensor(a)) is not None}
        if len(sizes) != 1:
            raise bad(f"weight and bias disagree: {sorted(sizes)}")
        channels = sizes.pop()
        if channels % module.num_groups:
            raise bad(f"{channels} channels are not divisible by num_groups={module.num_groups}")
        return {"num_channels": channels}
    if isinstance(module, nn.Embedding):
        w = tensor("weight")
        if module.padding_idx is not None and module.padding_idx >= w.shape[0]:
            raise bad(f"padding_idx {module.padding_idx} is outside the {w.shape[0]} embeddings")
        return {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}
    if isinstance(module, nn.PReLU):
        return {"num_parameters": tensor("weight").numel()}
    if isinstance(module, nn.MultiheadAttention):
        w = tensor("in_proj_weight")
        embed = w.shape[1]
        if tuple(w.shape) != (3 * embed, embed) or embed % module.head_dim:
            raise bad(
                f"in_proj_weight {tuple(w.shape)} is not (3E, E) with E whole heads of head_dim={module.head_dim}"
            )
        return {"embed_dim": embed, "kdim": embed, "vdim": embed, "num_heads": embed // module.head_dim}
    if not _is_builtin(module):
        return {}
    if isinstance(module, nn.RNNBase):
        gates = RNN_GATES[module.mode]
        dirs = 2 if module.bidirectional else 1
        hidden = tensor("weight_hh_l0").shape[1]
        in_size = tensor("weight_ih_l0").shape[1]
        for k in range(module.num_layers):
            for suffix in ([""] if dirs == 1 else ["", "_reverse"]):
                expect_in = in_size if k == 0 else hidden * dirs
                w_ih, w_hh = tensor(f"weight_ih_l{k}{suffix}"), tensor(f"weight_hh_l{k}{suffix}")
                if tuple(w_ih.shape) != (gates * hidden, expect_in) or tuple(w_hh.shape) != (gates * hidden, hidden):
                    raise bad(
                        f"layer {k}{suffix}: weight_ih {tuple(w_ih.shape)} / weight_hh {tuple(w_hh.shape)} do not fit "
                        f"one hidden_size={hidden} (every layer of an nn.{type(module).__name__} must keep the same "
                        "number of units)"
                    )
                if module.bias:
                    for b in (f"bias_ih_l{k}{suffix}", f"bias_hh_l{k}{suffix}"):
                        if tuple(tensor(b).shape) != (gates * hidden,):
                            raise bad(f"{b} has shape {tuple(tensor(b).shape)}, expected ({gates * hidden},)")
        return {"input_size": in_size, "hidden_size": hidden}
    raise bad("unsupported module type")
