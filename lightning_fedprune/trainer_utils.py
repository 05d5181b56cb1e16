"""One place for how the package runs Lightning ``Trainer`` s it creates itself.

* :func:`trainer_defaults`: the arguments of a quiet, CPU, no-validation, no-logging ``Trainer``
  (the client runtime's and the server-side sample training's), with the caller's on top.
* :func:`quiet_lightning`: drop Lightning's per-``Trainer`` info lines ("GPU available: ...",
  "`Trainer.fit` stopped ...") and the warnings that are about the package's own choices (no
  validation loader, few loader workers, torch's pytree notice), never the user's.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["trainer_defaults", "quiet_lightning", "check_trainer_settings", "ACCELERATORS"]

#: where clients train (``engine.accelerator``): the CPU, CUDA GPUs, or CUDA when a GPU is visible
ACCELERATORS = ("cpu", "cuda", "auto")

_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}

_CHATTY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.rank_zero",
)
#: warnings about settings the package makes on purpose
_OWN_CHOICES = (
    ".*`validation_step` but have no `val_dataloader`.*",
    ".*does not have many workers.*",
    ".*LeafSpec.*",
)


def trainer_defaults(overrides: Mapping[str, Any] | None = None, **fixed: Any) -> dict[str, Any]:
    """``Trainer`` keyword arguments: the package's defaults, then ``overrides`` (the user's
    ``trainer`` settings), then ``fixed`` (what the caller must set itself, e.g. ``max_epochs``)."""
    kwargs = dict(_DEFAULTS)
    kwargs.update(overrides or {})
    kwargs.update(fixed)
    return kwargs


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_BELOW_WARNING = _BelowWarning()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning's info lines and the package's own-choice warnings are dropped.

    A logging filter, not ``setLevel`` (changing levels clears every logger's cache, which is slow).
    """
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    for lg in loggers:
        lg.addFilter(_BELOW_WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _OWN_CHOICES:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(_BELOW_WARNING)


def check_trainer_settings(settings: Mapping[str, Any]) -> None:
    """Build (and drop) a ``Trainer`` with a recipe's ``trainer`` settings on top of the package's
    defaults, so that settings this machine cannot run (``accelerator: gpu`` without a GPU) fail
    before any round, in one line naming the key.

    Raises:
        ConfigError: Lightning rejected the settings.
    """
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_fedprune.errors import ConfigError

    if not settings:
        return
    try:
        with quiet_lightning():
            pl.Trainer(**trainer_defaults(settings, max_epochs=1))
    except (MisconfigurationException, RuntimeError, ValueError) as err:
        keys = ", ".join(f"trainer.{k}={v!r}" for k, v in settings.items())
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"Lightning cannot run with {keys} here: {first}") from None
