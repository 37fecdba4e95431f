"""The trainer's own failures, importable without torch (the CLI maps them to one-line errors)."""


class DivergenceError(ValueError):
    """Training produced a non-finite loss or gradient norm; the message names the step and the loss terms.

    Nothing non-finite was saved: the newest checkpoint in the run folder is the last finite state."""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded safely (not a weights-only file, or torn); the message names the file."""
