"""Torch files written atomically and read weights-only: checkpoints, teachers, backbones.

A file is written to a temporary name in the same folder (`.<name>.<random>.tmp`), flushed to disk and
renamed, so a crash never leaves a half-written file under the real name. `load_checkpoint` reads with
`torch.load(weights_only=True)`: tensors and plain values only, so a file from elsewhere can never run code
on load. torch is imported inside the functions: `CheckpointError` is importable without it.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded safely (not a weights-only file, or torn); the message names the file."""


def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide run files from other readers
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = err
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__context__
        if cause is not None and cause is not err:
            # torch.save's writer fails in its own cleanup ("unexpected pos") when Ctrl-C or SIGTERM lands
            # inside it; surface the interrupt, so the run ends KILLED rather than as a mystery error
            raise cause from None
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic_write(path, lambda handle: handle.write(text), mode="w")


def _legacy_numpy_globals() -> list:
    """Checkpoints written before RNG states were stored as tensors hold numpy's RNG key array."""
    import numpy as np

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` of a checkpoint on the CPU: tensors and plain values only.

    A file that needs any other object to load (a pickle that could run code) is refused with a one-line
    CheckpointError naming the file and what it asked for; nothing in it runs."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \S+", str(err))
        what = (found.group(1) or found.group(0)) if found else str(err).splitlines()[0]
        raise CheckpointError(f"refused to load {path}: it is not a weights-only checkpoint (it needs {what}, "
                              f"which could run code on load); only load checkpoints alignlab wrote") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} ({str(err).splitlines()[0]}): the file is torn or "
                              f"not a torch checkpoint; delete it to resume from the previous one") from None
