"""The errors a user can fix: the CLI prints their message as one line (exit 1); tracebacks are for --debug."""
from __future__ import annotations


class SftkitError(Exception):
    """A mistake in what the user gave (options, files, models, checkpoints), with what to do about it."""


class ModelLoadError(SftkitError, RuntimeError):
    """A model or tokenizer that cannot be found or loaded."""


class CheckpointError(SftkitError, ValueError):
    """A checkpoint that cannot be used as asked."""


class TrainingError(SftkitError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""
