"""Forward FLOPs of a model on an example batch.

:func:`forward_flops` counts like torch-pruning's ``count_ops_and_params`` for ordinary layers
(its per-layer rules: convolutions and linear layers count multiply-accumulates plus bias adds,
BatchNorm / pooling / activations one operation per element, ...) and doubles the count (FLOPs =
2 x MACs). LSTMs are counted analytically, because torch-pruning's counter is wrong for
``batch_first`` LSTMs: per token ``2 * 4 * H * (in + H)`` per layer and direction.

Unlike ``count_ops_and_params`` it does not deep-copy the model: it runs one ``torch.no_grad``
eval-mode forward of ``example`` with counting hooks (pass a batch of one: the count scales with
the batch, the cost too). The model's tensors and train/eval modes are left as they were, and no
attribute is written to the modules.

Note torch-pruning's rules count a ``Linear``'s bias additions once per forward (not per sample),
so the count of a batch of ``B`` is slightly less than ``B`` times the count of one sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_fedprune.errors import ModelError

__all__ = ["forward_flops", "lstm_flops_per_token"]


def lstm_flops_per_token(lstm: nn.LSTM) -> float:
    """``2 * 4 * H * (in + H)`` summed over layers and directions (FLOPs per input token)."""
    dirs = 2 if lstm.bidirectional else 1
    hidden = lstm.hidden_size
    total = 0.0
    for layer in range(lstm.num_layers):
        inp = lstm.input_size if layer == 0 else hidden * dirs
        total += dirs * 2.0 * 4 * hidden * (inp + hidden)
    return total


class _Proxy:
    """Stands in for a module inside torch-pruning's counting hooks: reads go to the module, the
    hook's ``__flops__`` accumulator stays on the proxy (the module is never written to)."""

    def __init__(self, module: nn.Module) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "__flops__", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_module"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


def _tp_rules() -> dict[type, Any]:
    from torch_pruning.utils import op_counter

    rules = dict(op_counter.MODULES_MAPPING)
    rules.update(op_counter.CUSTOM_MODULES_MAPPING)
    return rules


def _tokens(x: Any, input_size: int) -> int:
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.data.shape[0])
    return int(x.numel() // max(1, input_size))


def _count(model: nn.Module, run: Callable[[], Any]) -> float:
    """Run ``run()`` (a forward of ``model``) in eval mode without grad and count its FLOPs."""
    rules = _tp_rules()
    total = [0.0]
    handles = []

    def make_hook(rule):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            proxy = _Proxy(module)
            rule(proxy, inputs, output)
            total[0] += float(object.__getattribute__(proxy, "__flops__"))

        return hook

    def lstm_hook(module: nn.LSTM, inputs: Any, output: Any) -> None:
        total[0] += lstm_flops_per_token(module) / 2.0 * _tokens(inputs[0], module.input_size)

    for m in model.modules():
        if isinstance(m, nn.LSTM):
            handles.append(m.register_forward_hook(lstm_hook))
        elif type(m) in rules:
            handles.append(m.register_forward_hook(make_hook(rules[type(m)])))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return 2.0 * total[0]


def forward_flops(model: nn.Module, example: Any, *, per_example: bool = False) -> float:
    """FLOPs (2 x multiply-accumulates) of one forward of ``example`` through ``model``.

    Args:
        model: Any module (a sub-model of any shape); evaluated in eval mode, restored after.
        example: The input batch: a tensor, a tuple of positional inputs or a dict of keyword
            inputs.
        per_example: Divide by the batch size (the first dimension of the first tensor input;
            for a non-``batch_first`` language model pass a ``(B, T)`` batch or divide yourself).

    Returns:
        The FLOPs of the whole batch (or per example).

    Raises:
        ModelError: If the forward fails.
    """
    try:
        flops = _count(model, lambda: _call(model, example))
    except Exception as exc:
        raise ModelError(f"forward_flops: forward of {type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc
    if per_example:
        first = next((t for t in _leaves(example) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        flops /= max(1, int(first.shape[0])) if first is not None else 1
    return flops


def _leaves(example: Any) -> list[Any]:
    if isinstance(example, dict):
        return list(example.values())
    if isinstance(example, (tuple, list)):
        return list(example)
    return [example]


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)
