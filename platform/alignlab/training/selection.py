"""Checkpoint selection by a validation score after each epoch (the thesis, section 1.7.2.2 and 3.2.1.1.3:
the best epoch by zero-shot; THESIS.md ambiguity 7: measured on the **val** split, so the test split that
is reported never chose the weights).

`EpochSelector` keeps the weights of the best epoch so far in `<run_dir>/selected/epoch-<n>.pt` (the format
of final.pt, so `alignlab evaluate` reads it). Its state, the best epoch and value, is saved in every
checkpoint, and the trainer writes a checkpoint right after each epoch's selection, in this order:

  1. score the model; a better score writes selected/epoch-<n>.pt atomically (the older file stays),
  2. the checkpoint, holding the new state,
  3. `commit`: delete the selected files other than the state's.

A kill before 2 resumes from an earlier state whose file still exists (step 3 never ran); the epoch is
trained again to the same weights, scores the same and makes the same choice. A kill after 2 leaves a
superseded file that `restore` deletes. So a killed and resumed run selects what an uninterrupted one does.

The score comes from the caller (`alignlab.experiment` passes the val zero-shot of `alignlab.evaluate`): the
training layer does not import evaluation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from alignlab.training.checkpoint import atomic_torch_save, remove_partial_files, rng_state, set_rng_state

SELECTED_DIR = "selected"
_NAME = re.compile(r"^epoch-(\d+)\.pt$")

Scorer = Callable[[torch.nn.Module], float]


def selected_files(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / SELECTED_DIR
    return sorted(p for p in folder.glob("epoch-*.pt") if _NAME.match(p.name)) if folder.is_dir() else []


def selected_checkpoint(run_dir: str | Path) -> Path | None:
    """The selected epoch's weights of a finished run (None: no epoch was scored)."""
    files = selected_files(run_dir)
    if len(files) > 1:
        raise RuntimeError(f"{Path(run_dir) / SELECTED_DIR} holds {len(files)} selected epochs: the run did not "
                           f"finish; resume it (alignlab train --resume) to settle the selection")
    return files[0] if files else None


class EpochSelector:
    """The best epoch by `scorer(model)` (higher is better; a tie keeps the earlier epoch)."""

    def __init__(self, run_dir: str | Path, metric: str, scorer: Scorer, *, is_main: bool):
        self.run_dir, self.metric, self.scorer, self.is_main = Path(run_dir), metric, scorer, is_main
        self.best: dict | None = None  # {"epoch", "step", "value"}

    def state_dict(self) -> dict:
        return dict(self.best or {})

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's state (None / {}: a fresh start); files it does not name go, as do the
        temporary files of a killed write."""
        self.best = dict(state) if state else None
        if self.is_main:
            remove_partial_files(self.run_dir / SELECTED_DIR)
        self.commit()

    def epoch_end(self, model: torch.nn.Module, epoch: int, step: int, saved: Callable[[], dict]) -> dict:
        """Score the model after `epoch` (1-based: epochs done) on the main rank; returns {metric: value}
        to log ({} on other ranks). `saved()` gives what to save for a new best ({"model", "config", ...}).
        The RNG states are restored afterwards, so selection never changes the training trajectory."""
        if not self.is_main:
            return {}
        rng = rng_state()
        was_training = model.training
        model.eval()
        try:
            value = float(self.scorer(model))
        finally:
            model.train(was_training)
            set_rng_state(rng)
        if self.best is None or value > self.best["value"]:
            path = self.run_dir / SELECTED_DIR / f"epoch-{epoch}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(saved() | {"step": step, "epoch": epoch, "selected_by": self.metric,
                                         "value": value}, path)
            self.best = {"epoch": epoch, "step": step, "value": value}
        return {self.metric: value}

    def commit(self) -> None:
        """Delete the selected files other than the current best's (after its checkpoint is written)."""
        if not self.is_main:
            return
        keep = f"epoch-{self.best['epoch']}.pt" if self.best else None
        for path in selected_files(self.run_dir):
            if path.name != keep:
                path.unlink()
