"""Exceptions raised by lightning_fedprune.

Every error the library raises on bad input derives from :class:`FedPruneError`, and also from
``ValueError`` where the input was a bad value, so callers can catch either.
"""

from __future__ import annotations


class FedPruneError(Exception):
    """Base class of every error raised by lightning_fedprune."""


class ConfigError(FedPruneError, ValueError):
    """A configuration value or recipe key is invalid."""


class PayloadError(FedPruneError, ValueError):
    """A message received from another party is malformed or does not match what was expected."""


class DataError(FedPruneError, ValueError):
    """A dataset cannot be found or a partition cannot be built."""


class ModelError(FedPruneError, ValueError):
    """A model name is unknown or a model cannot be built / traced."""


class AllClientsFailedError(FedPruneError, RuntimeError):
    """Every client of a round failed, so no aggregation was possible."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run after a round: the checkpoint holds every round done.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too.

    Attributes:
        next_round: the (0-based) round a resumed run starts with.
        checkpoint: the checkpoint written, or ``None`` for a run without a run folder.
    """

    def __init__(self, next_round: int, checkpoint: str | None) -> None:
        where = f"; the checkpoint {checkpoint} resumes it at round {next_round}" if checkpoint else ""
        super().__init__(f"interrupted after round {next_round - 1}{where}")
        self.next_round = int(next_round)
        self.checkpoint = checkpoint
