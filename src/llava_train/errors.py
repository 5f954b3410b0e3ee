"""The exit codes of every `llava-train` command and training process, and the errors that are the user's to fix.

Light on purpose (no torch, no transformers): the CLI maps errors to codes before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

# The same on every rank: 0 = done (trained and saved); 1 = an unexpected error (traceback on stderr);
# 2 = a configuration or data error (one line naming the key, file or row); 3 = stopped for a preemption
# signal (SIGTERM / SIGUSR1) after saving a complete checkpoint: resume with
# `train.resume_from_checkpoint=auto`; 4 = a non-finite loss or gradients stopped the run (one line
# naming the step, its samples and the last complete checkpoint).
EXIT_OK, EXIT_ERROR, EXIT_USER_ERROR, EXIT_PREEMPTED, EXIT_NONFINITE = 0, 1, 2, 3, 4
# `data validate`: 0 = every row is good; 1 = it ran and found bad rows (the report lists each); 2 = it could not
# run (no report): a one-line error for a config or file problem, a traceback for anything unexpected.
EXIT_BAD_ROWS, EXIT_COULD_NOT_RUN = 1, 2


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


class InitFromError(ValueError):
    """`model.init_from` does not fit the run (its kind, arch, tower, layers, projector, template or tensors)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or final save could not be written (disk full); the message names the last complete one."""


class RemoteCodeError(ValueError):
    """A model folder asks to run its own Python code (`auto_map`): never done (no `trust_remote_code`)."""


class BadSampleError(ValueError):
    """A bad row met with `on_bad_sample: error`: the message names the source, row, id and reason."""

    def __init__(self, source: str, row: int | None = None, sample_id: Any = None, reason: str = "", detail: str = ""):
        # A single argument is a finished message: DataLoader workers re-raise exceptions as exc_type(message),
        # the message holding the worker's traceback: its last line is the original message (one line to print).
        message = source if row is None else f"bad sample in {source} row {row} (id {sample_id!r}): {reason}: {detail}"
        if row is None and message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)
        self.source, self.row, self.sample_id, self.reason, self.detail = source, row, sample_id, reason, detail


class DataFileError(ValueError):
    """A shard (or a whole source) that cannot be read at all: one line naming the file and what to do (exit 2)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported as one line and exit code 2, without a traceback."""
    errors: tuple[type[BaseException], ...] = (
        ConfigError,
        BadSampleError,
        DataFileError,
        FileNotFoundError,
        InitFromError,
        RemoteCodeError,
        CheckpointWriteError,  # a disk-full save: the message says what is intact and how to resume
    )
    try:  # a model reference that is neither a local folder nor a valid / existing hub id
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

        errors = (*errors, HFValidationError, RepositoryNotFoundError)
    except ImportError:
        pass
    return errors
