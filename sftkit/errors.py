"""The errors a user can fix: the CLI prints their message as one line (exit 1); tracebacks are for --debug."""
from __future__ import annotations

import signal


class SftkitError(Exception):
    """A mistake in what the user gave (options, files, models, checkpoints), with what to do about it."""

    exit_code = 1


class OptionError(SftkitError, ValueError):
    """An option value that does not fit (a template name, LoRA targets that match no layer): a usage error."""

    exit_code = 2

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"--{option}: {message}")


class ModelLoadError(SftkitError, RuntimeError):
    """A model or tokenizer that cannot be found or loaded."""


class CheckpointError(SftkitError, ValueError):
    """A checkpoint that cannot be used as asked."""


class TrainingError(SftkitError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


STOPPED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # 130, 143


class TrainingStopped(TrainingError):
    """A run stopped by SIGINT/SIGTERM after saving: not a finished run, so the exit code is 128 + the signal
    (130, 143) and `sftkit train && sftkit merge` does not merge a half-trained model."""

    def __init__(self, signal_number: int, checkpoint: str, command: str = "train"):
        self.signal_number, self.checkpoint = signal_number, checkpoint
        self.exit_code = 128 + signal_number
        super().__init__(f"stopped by {signal.Signals(signal_number).name}; checkpoint saved: {checkpoint}. Resume with: "
                         f"sftkit {command} --resume_from_checkpoint {checkpoint} (and the same options)")


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once without saving (a KeyboardInterrupt, so no `except Exception` eats it)."""

    def __init__(self, signal_number: int):
        self.signal_number = signal_number
        super().__init__(f"aborted by a second {signal.Signals(signal_number).name}: this step was not saved")
