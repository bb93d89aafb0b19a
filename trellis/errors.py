"""User-facing errors. The CLI prints these without a traceback and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input (config, flags, files). Printed as-is, exit code 2."""

    exit_code = 2

    def __init__(self, message: str | list[str]):
        self.messages = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.messages))


class ConfigError(UserError):
    """One or more invalid config fields. Each message names the field and the fix."""


class CheckpointError(UserError):
    """A checkpoint is missing, invalid, corrupted or incompatible."""


class TrainingDiverged(UserError):
    """The loss or gradients stayed non-finite for train.max_nonfinite_steps steps. Printed as one line, exit 1
    (a failure of the run, not of its input)."""

    exit_code = 1


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, permission, I/O error). One line naming the cause and the
    path, exit 1: the run's environment failed, not its input. The partial step-N.tmp is removed and every
    earlier checkpoint is kept."""

    exit_code = 1


class LeaseLost(UserError):
    """The lease on checkpoint.dir was taken over by another run: this run must not write a checkpoint there.
    One line naming the new holder, exit 1 (the step-N.tmp being written is removed; nothing is published)."""

    exit_code = 1
