"""Model registry: build models by name, in the style of timm's ``register_model`` /
``create_model``.

Each model family lives in its own module (``mlp.py``, ``cnn.py``, ...) and exposes tiny entrypoint
functions decorated with :func:`register_model`::

    @register_model(input_shape=lambda in_features, **_: (in_features,))
    def mlp(in_features: int = 64, hidden=(300, 100), num_classes: int = 10) -> nn.Module:
        ...

Users build models with :func:`create_model` and fetch the metadata that pruning and FLOP counting
need (an example input, the layers that must never be pruned, the task) with :func:`model_info`,
passing the *same* keyword arguments to both so that the metadata matches the model::

    model = create_model("cnn_mnist", num_classes=10, in_channels=1)
    info = model_info("cnn_mnist", num_classes=10, in_channels=1)
    example = info.example_input(2)  # (2, 1, 28, 28) float32

Any `timm <https://github.com/huggingface/pytorch-image-models>`_ architecture is also available
as ``"timm:<name>"`` (always built with ``pretrained=False``).

Besides the model's own arguments, :func:`model_info` (and :func:`create_model`, which ignores
them) accepts two *info-only* keyword arguments that change only the example input:

* ``input_size``: the per-sample input shape of image / vector models, e.g. ``(3, 64, 64)``;
* ``seq_len``: the sequence length of language models' example token batch (default 35).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lightning_fedprune.errors import ModelError

__all__ = [
    "ModelInfo",
    "register_model",
    "create_model",
    "model_info",
    "list_models",
    "TIMM_PREFIX",
    "INFO_ONLY_KWARGS",
    "TASKS",
]

#: Prefix that routes a model name to ``timm.create_model``.
TIMM_PREFIX = "timm:"
#: Keyword arguments that only shape the example input; :func:`create_model` drops them.
INFO_ONLY_KWARGS = ("input_size", "seq_len")
#: Valid values of :attr:`ModelInfo.task`.
TASKS = ("classification", "language_model")
#: Default sequence length of a language model's example input.
DEFAULT_SEQ_LEN = 35
#: Default per-sample input of timm models whose input size is not fixed (CIFAR-sized images).
DEFAULT_TIMM_INPUT_SIZE = (3, 32, 32)
# Seed of the private generator used for example inputs (they never touch the global RNG).
_EXAMPLE_SEED = 0


@dataclass(frozen=True)
class ModelInfo:
    """Metadata about one configured model.

    Attributes:
        name: The registered name (``"timm:<name>"`` for timm models).
        fn: Callable that builds the model; ``fn(**kwargs)`` with the same keyword arguments that
            were given to :func:`model_info` reproduces the architecture.
        example_input: ``example_input(batch_size)`` returns a fresh example input batch for graph
            tracing and FLOP counting: float32 ``(B, *input_shape)`` for image / vector models,
            a ``LongTensor`` of token ids for language models. It uses a private, fixed-seed
            generator, so calling it does not advance the global RNG.
        unprunable: Qualified module names (keys of ``dict(model.named_modules())``) that
            structured pruning must never prune: the output layer(s) and, for language models,
            the embedding.
        task: ``"classification"`` or ``"language_model"``.
    """

    name: str
    fn: Callable[..., nn.Module]
    example_input: Callable[[int], torch.Tensor]
    unprunable: tuple[str, ...]
    task: str


@dataclass(frozen=True)
class _Entry:
    """What :func:`register_model` records for one entrypoint."""

    name: str
    fn: Callable[..., nn.Module]
    input_shape: tuple[int, ...] | Callable[..., tuple[int, ...]] | None
    example_input: Callable[..., torch.Tensor] | None
    unprunable: tuple[str, ...]
    task: str


_REGISTRY: dict[str, _Entry] = {}


# --------------------------------------------------------------------------------------------------
# small validation helpers shared by the model families
# --------------------------------------------------------------------------------------------------
def check_positive_int(name: str, value: Any, model: str) -> int:
    """Return ``value`` if it is a positive ``int``; otherwise raise :class:`ModelError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{model}: {name} must be a positive integer, got {value!r}.")
    return value


def check_int_tuple(name: str, value: Any, model: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints (an empty tuple is allowed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise ModelError(
            f"{model}: {name} must be a tuple of positive integers (layer widths), got {value!r}."
        )
    return tuple(check_positive_int(f"{name}[{i}]", v, model) for i, v in enumerate(value))


def check_probability(name: str, value: Any, model: str) -> float:
    """Return ``value`` as a float in ``[0, 1)``; otherwise raise :class:`ModelError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelError(f"{model}: {name} must be a float in [0, 1), got {value!r}.")
    return float(value)


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------
def register_model(
    *,
    input_shape: tuple[int, ...] | Callable[..., tuple[int, ...]] | None = None,
    example_input: Callable[..., torch.Tensor] | None = None,
    unprunable: Sequence[str] = ("classifier",),
    task: str = "classification",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model entrypoint under the function's ``__name__``.

    Exactly one of ``input_shape`` / ``example_input`` must be given:

    * ``input_shape``: the per-sample float input shape, either a fixed tuple such as
      ``(3, 32, 32)`` or a callable receiving the model's resolved keyword arguments (defaults
      filled in) and returning the shape, e.g. ``lambda in_channels, **_: (in_channels, 28, 28)``.
      The example input is ``randn(B, *shape)``.
    * ``example_input``: ``example_input(batch_size, generator=..., **model_kwargs, **info_kwargs)``
      returning the example batch (use it for non-float inputs such as token ids).

    Args:
        input_shape: See above.
        example_input: See above.
        unprunable: Module names that structured pruning must never prune.
        task: One of :data:`TASKS`.

    Returns:
        The decorator; it returns the entrypoint unchanged.
    """
    if (input_shape is None) == (example_input is None):
        raise ModelError("register_model: give exactly one of input_shape= or example_input=.")
    if task not in TASKS:
        raise ModelError(f"register_model: task must be one of {TASKS}, got {task!r}.")
    unprunable_t = (unprunable,) if isinstance(unprunable, str) else tuple(unprunable)

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        existing = _REGISTRY.get(name)
        # Re-registering the same entrypoint (e.g. after importlib.reload) is allowed.
        if existing is not None and (existing.fn.__module__, existing.fn.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ModelError(
                f"register_model: a model named {name!r} is already registered "
                f"(by {existing.fn.__module__}); choose another function name."
            )
        _REGISTRY[name] = _Entry(name, fn, input_shape, example_input, unprunable_t, task)
        return fn

    return decorator


def list_models() -> list[str]:
    """Return the sorted names of the registered models (timm models are not listed)."""
    return sorted(_REGISTRY)


def model_description(name: str) -> str:
    """The first paragraph of the docstring of the registered model ``name``'s entrypoint.

    Raises:
        ModelError: an unknown name.
    """
    if name not in _REGISTRY:
        raise _unknown_name_error(name)
    return " ".join((inspect.getdoc(_REGISTRY[name].fn) or "").split("\n\n")[0].split())


def _unknown_name_error(name: Any) -> ModelError:
    choices = list_models()
    close = difflib.get_close_matches(str(name), choices, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ModelError(
        f"Unknown model {name!r}.{hint} Registered models: {', '.join(choices)}. "
        f"Any timm architecture is also available as '{TIMM_PREFIX}<name>', e.g. "
        f"'{TIMM_PREFIX}resnet18' (see timm.list_models())."
    )


def _get_entry(name: Any) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise _unknown_name_error(name)
    return _REGISTRY[name]


def _resolve_kwargs(entry: _Entry, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the entrypoint's keyword arguments with defaults filled in; reject unknown keys."""
    params = inspect.signature(entry.fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ModelError(
            f"{entry.name}: unexpected argument(s) {', '.join(unknown)}. "
            f"Accepted: {', '.join(params) or '(none)'}."
        )
    resolved = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    resolved.update(kwargs)
    return resolved


def _split_info_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_kwargs = {k: v for k, v in kwargs.items() if k not in INFO_ONLY_KWARGS}
    info_kwargs = {k: v for k, v in kwargs.items() if k in INFO_ONLY_KWARGS}
    return model_kwargs, info_kwargs


def _check_input_size(name: str, input_size: Any) -> tuple[int, ...]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size,)
    if (
        not isinstance(input_size, (tuple, list))
        or not input_size
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise ModelError(
            f"{name}: input_size must be the per-sample input shape as a tuple of positive "
            f"integers without the batch dimension, e.g. (3, 32, 32); got {input_size!r}."
        )
    return tuple(input_size)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(_EXAMPLE_SEED)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ModelError(
            f"example_input: batch_size must be a positive integer, got {batch_size!r}."
        )
    return batch_size


def _randn_example(shape: tuple[int, ...], batch_size: int) -> torch.Tensor:
    """Float32 example batch of shape ``(batch_size, *shape)``."""
    batch_size = _check_batch_size(batch_size)
    return torch.randn((batch_size, *shape), generator=_generator(), dtype=torch.float32)


def _custom_example(
    factory: Callable[..., torch.Tensor], kwargs: dict[str, Any], batch_size: int
) -> torch.Tensor:
    return factory(_check_batch_size(batch_size), generator=_generator(), **kwargs)


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------
def _timm_name(name: str) -> str:
    timm_name = name[len(TIMM_PREFIX) :]
    import timm

    if not timm_name or not timm.is_model(timm_name):
        raise ModelError(
            f"Unknown timm model {timm_name!r} (from {name!r}). Use a name from "
            f"timm.list_models(), e.g. '{TIMM_PREFIX}resnet18'; registered lightning_fedprune "
            f"models are: {', '.join(list_models())}."
        )
    return timm_name


def _timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Translate this package's argument names to timm's (``in_channels`` -> ``in_chans``)."""
    kwargs = dict(kwargs)
    if "in_channels" in kwargs:
        if "in_chans" in kwargs:
            raise ModelError("timm models: give either in_channels= or in_chans=, not both.")
        kwargs["in_chans"] = kwargs.pop("in_channels")
    if kwargs.get("pretrained"):
        raise ModelError(
            "timm models are always built with pretrained=False (no downloads); load weights "
            "yourself after create_model() if you need them."
        )
    kwargs.pop("pretrained", None)
    return kwargs


def _create_timm(name: str, **kwargs: Any) -> nn.Module:
    import timm

    timm_name = _timm_name(name)
    try:
        return timm.create_model(timm_name, pretrained=False, **_timm_kwargs(kwargs))
    except TypeError as exc:  # unexpected keyword argument for that architecture
        raise ModelError(f"{name}: cannot build with arguments {sorted(kwargs)}: {exc}") from exc


def _timm_classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of a timm model's output layer(s)."""
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(names, str):
        names = (names,)
    if names and all(n in modules for n in names):
        return tuple(names)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        heads = head if isinstance(head, (tuple, list)) else (head,)
        found = tuple(n for n, m in modules.items() for h in heads if m is h and n)
        if found:
            return found
    raise ModelError(
        f"Cannot find the classifier of timm model {type(model).__name__}; "
        "pass its module name to the pruner as an ignored layer yourself."
    )


def _timm_info(name: str, kwargs: dict[str, Any]) -> ModelInfo:
    from timm.models import get_pretrained_cfg

    model_kwargs, info_kwargs = _split_info_kwargs(kwargs)
    timm_name = _timm_name(name)
    if "seq_len" in info_kwargs:
        raise ModelError(f"{name}: seq_len= only applies to language models; use input_size=.")
    # Build once (cheap for the architectures used here) to read the exact classifier names,
    # which depend on arguments such as num_classes / global_pool.
    model = _create_timm(name, **model_kwargs)
    unprunable = _timm_classifier_names(model)
    del model

    timm_kwargs = _timm_kwargs(model_kwargs)
    if "input_size" in info_kwargs:
        shape = _check_input_size(name, info_kwargs["input_size"])
    else:
        cfg = get_pretrained_cfg(timm_name)
        channels = timm_kwargs.get("in_chans", DEFAULT_TIMM_INPUT_SIZE[0])
        img_size = timm_kwargs.get("img_size")
        if img_size is not None:
            hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        elif cfg is not None and getattr(cfg, "fixed_input_size", False):
            hw = tuple(cfg.input_size[1:])
        else:
            hw = DEFAULT_TIMM_INPUT_SIZE[1:]
        shape = (channels, *hw)

    return ModelInfo(
        name=name,
        fn=functools.partial(_create_timm, name),
        example_input=functools.partial(_randn_example, shape),
        unprunable=unprunable,
        task="classification",
    )


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name.

    Args:
        name: A name from :func:`list_models`, or ``"timm:<name>"`` for any timm architecture
            (built with ``pretrained=False``; ``in_channels`` is translated to timm's ``in_chans``,
            ``num_classes`` is passed through).
        **kwargs: Keyword arguments of the model's entrypoint, e.g. ``num_classes=62``.
            The info-only keys :data:`INFO_ONLY_KWARGS` are accepted and ignored, so the same
            dictionary can be passed to :func:`create_model` and :func:`model_info`.

    Returns:
        The freshly initialised model, in training mode.

    Raises:
        ModelError: If the name is unknown or an argument is invalid.
    """
    model_kwargs, _ = _split_info_kwargs(kwargs)
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _create_timm(name, **model_kwargs)
    entry = _get_entry(name)
    _resolve_kwargs(entry, model_kwargs)  # rejects unknown arguments with a clear message
    return entry.fn(**model_kwargs)


def model_info(name: str, **kwargs: Any) -> ModelInfo:
    """Return the :class:`ModelInfo` of ``name`` configured with ``kwargs``.

    Pass the same keyword arguments as to :func:`create_model`: the example input follows
    arguments that change the input (``in_channels``, ``in_features``, ``vocab_size``, ...).
    In addition, ``input_size=(C, H, W)`` overrides the example input shape of image / vector
    models, and ``seq_len=`` the sequence length of language models' example tokens.

    For ``"timm:<name>"`` the example input is ``(B, 3, 32, 32)`` unless ``input_size``,
    ``img_size`` / ``in_chans`` (or ``in_channels``) say otherwise or the architecture has a fixed
    input size; ``unprunable`` is the model's classifier (``pretrained_cfg['classifier']``).

    Raises:
        ModelError: If the name is unknown or an argument is invalid.
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _timm_info(name, kwargs)
    entry = _get_entry(name)
    model_kwargs, info_kwargs = _split_info_kwargs(kwargs)
    resolved = _resolve_kwargs(entry, model_kwargs)

    if entry.input_shape is not None:
        if "seq_len" in info_kwargs:
            raise ModelError(f"{name}: seq_len= only applies to language models; use input_size=.")
        if "input_size" in info_kwargs:
            shape = _check_input_size(name, info_kwargs["input_size"])
        elif callable(entry.input_shape):
            shape = tuple(entry.input_shape(**resolved))
        else:
            shape = tuple(entry.input_shape)
        example = functools.partial(_randn_example, shape)
    else:
        if "input_size" in info_kwargs:
            raise ModelError(f"{name}: input_size= does not apply to this model; use seq_len=.")
        factory_kwargs = {**resolved, **info_kwargs}
        if "seq_len" in factory_kwargs:
            check_positive_int("seq_len", factory_kwargs["seq_len"], name)
        example = functools.partial(_custom_example, entry.example_input, factory_kwargs)

    return ModelInfo(
        name=name,
        fn=entry.fn,
        example_input=example,
        unprunable=entry.unprunable,
        task=entry.task,
    )
