"""The trainer's own failures, importable without torch (the CLI maps them to one-line errors)."""

from alignlab.storage.torch_files import CheckpointError  # noqa: F401 - a checkpoint the trainer cannot load


class DivergenceError(ValueError):
    """Training produced a non-finite loss or gradient norm; the message names the step and the loss terms.

    Nothing non-finite was saved: the newest checkpoint in the run folder is the last finite state."""
