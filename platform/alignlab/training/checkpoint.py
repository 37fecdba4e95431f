"""Step-level checkpoints: plain dicts (nanoGPT style), written atomically, loaded weights-only, pruned.

A checkpoint is `{"model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
"rng", "config"}`, made of tensors and plain Python values only, so `torch.load(weights_only=True)` reads
it and a file from elsewhere can never run code on load. It is written to a temporary file in the same
folder, flushed to disk and renamed, so a crash never leaves a half-written file under a checkpoint name;
`remove_partial_files` clears the temporary files a killed write leaves behind. A checkpoint is only ever
written from a finite state, so the newest one is always a state training can resume from.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from alignlab.training.errors import CheckpointError, DivergenceError

_NAME = re.compile(r"^step-(\d{8})\.pt$")
_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # `_atomic_write`'s temporary names (mkstemp)


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
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic_write(path, lambda handle: handle.write(text), mode="w")


def remove_partial_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files of atomic writes that a kill interrupted (up to a checkpoint's size each)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stray = [p for p in directory.iterdir() if p.is_file() and _PARTIAL.match(p.name)]
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def state_is_finite(state: dict) -> bool:
    """Whether every floating tensor of the model and the optimizer state is finite (one host sync)."""
    tensors = [t for t in state["model"].values() if torch.is_floating_point(t)]
    for slots in state.get("optimizer", {}).get("state", {}).values():
        tensors += [t for t in slots.values() if isinstance(t, torch.Tensor) and torch.is_floating_point(t)]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` as step `step`, then delete all but the newest `keep` checkpoints.

    A non-finite state is refused (DivergenceError) before anything is written or pruned, so pruning can
    never leave only diverged checkpoints behind; the file just written is never pruned."""
    if not state_is_finite(state):
        raise DivergenceError(f"refusing to save checkpoint step {step} in {directory}: the model or optimizer "
                              f"state holds NaN/inf (training diverged); the newest checkpoint there is the last "
                              f"finite state")
    path = atomic_torch_save(state, checkpoint_path(directory, step))
    for _, old in list_checkpoints(directory)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _legacy_numpy_globals() -> list:
    """Checkpoints written before RNG states were stored as tensors hold numpy's RNG key array."""
    import numpy as np

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` of a checkpoint on the CPU: tensors and plain values only.

    A file that needs any other object to load (a pickle that could run code) is refused with a one-line
    CheckpointError naming the file and what it asked for; nothing in it runs."""
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


def rng_state() -> dict:
    """Torch, Python and numpy RNG states as tensors and plain values (weights-only loadable)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older checkpoints: a numpy array
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
