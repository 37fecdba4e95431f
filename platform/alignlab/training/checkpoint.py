"""Step-level checkpoints: plain dicts (nanoGPT style), written atomically, loaded weights-only, pruned.

A checkpoint is `{"model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
"rng", "config"}`, made of tensors and plain Python values only, so `torch.load(weights_only=True)` reads
it and a file from elsewhere can never run code on load. It is written to a temporary file in the same
folder, flushed to disk and renamed, so a crash never leaves a half-written file under a checkpoint name;
`remove_partial_files` clears the temporary files a killed write leaves behind (the atomic writer and the
weights-only loader are `alignlab.storage.torch_files`, shared with the teachers; imported here for the
trainer). A checkpoint is only ever
written from a finite state, so the newest one is always a state training can resume from.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from alignlab.storage.torch_files import atomic_torch_save, atomic_write_text, load_checkpoint  # noqa: F401
from alignlab.training.errors import DivergenceError

_NAME = re.compile(r"^step-(\d{8})\.pt$")
_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # torch_files' temporary names (mkstemp)


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
