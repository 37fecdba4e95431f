"""The divergence guard: a non-finite loss or gradient norm stops the run (or skips the step, up to a budget).

Each step only adds to on-device flags (no host sync, so a GPU keeps queueing work); `check` reads them, one
sync and, under DDP, one all-reduce, at log and checkpoint boundaries and before every save, so a
non-finite state is never saved. Skipping (`train.skip_nonfinite_steps` > 0) has to decide before the
optimizer steps, so it reads the flag every step. Under amp_fp16 the GradScaler already skips steps with
inf/NaN gradients (and lowers its scale), so only the loss is watched there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from alignlab.training.checkpoint import latest_checkpoint
from alignlab.training.distributed import all_reduce_mean
from alignlab.training.errors import DivergenceError

TermsLookup = Callable[[int], dict]  # step -> {"loss": ..., "loss/<term>": ...} as floats (may be empty)


class DivergenceGuard:
    def __init__(self, device: torch.device, skip_limit: int, checkpoint_dir: Path, advice: str,
                 is_main: bool = True):
        self.skip_limit = skip_limit
        self.skipped = 0
        self.checkpoint_dir = checkpoint_dir
        self.advice = advice
        self.is_main = is_main
        self._bad = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps not skipped
        self._first_step = torch.zeros((), dtype=torch.int64, device=device)
        self._first_values = torch.zeros(2, device=device)  # loss, grad norm at the first of them
        self._grad_watched = False

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Record optimizer step `step` (1-based); returns its on-device "non-finite" flag."""
        self._grad_watched = grad_norm is not None
        norm = grad_norm.float() if grad_norm is not None else torch.zeros((), device=loss.device)
        values = torch.stack([loss.float(), norm])
        bad = ~torch.isfinite(values).all()
        first = bad & (self._bad == 0)
        self._first_step = torch.where(first, step, self._first_step)
        self._first_values = torch.where(first, values, self._first_values)
        self._bad += bad
        return bad

    def skip(self, bad: torch.Tensor, step: int, terms: dict[str, torch.Tensor]) -> bool:
        """Skip mode: whether step `step` is to be skipped (host sync); DivergenceError past the budget."""
        if not float(all_reduce_mean(bad.float())):
            return False
        self.skipped += 1
        values = {k: float(v) for k, v in terms.items()}
        if self.skipped > self.skip_limit:
            self.check(lambda _: values)
        if self.is_main:
            print(f"[alignlab] step {step}: {self._describe(values)}; skipped "
                  f"({self.skipped} of train.skip_nonfinite_steps={self.skip_limit})")
        self._bad.zero_()
        return True

    def check(self, terms_at: TermsLookup) -> None:
        """Raise DivergenceError if any step since the start was non-finite (and not skipped)."""
        if not float(all_reduce_mean(self._bad.float())):
            return
        if not int(self._bad):
            raise DivergenceError("training diverged on another rank (non-finite loss or gradient norm); "
                                  "see its log for the step")
        step = int(self._first_step)
        budget = (f"; {self.skipped} non-finite steps exceed train.skip_nonfinite_steps={self.skip_limit}"
                  if self.skip_limit else "")
        last = latest_checkpoint(self.checkpoint_dir)
        saved = (f"the last finite checkpoint is {last} (continue with --resume)" if last
                 else "no checkpoint was written before it")
        raise DivergenceError(f"training diverged at step {step}: {self._describe(terms_at(step))}{budget}; "
                              f"nothing non-finite was saved, {saved}. {self.advice}")

    def _describe(self, terms: dict) -> str:
        loss, norm = self._first_values.tolist() if int(self._bad) else (terms.get("loss", math.nan), math.nan)
        what = [name for name, value in (("loss", loss), ("gradient norm", norm)) if not math.isfinite(value)]
        shown = {"loss": loss} | {k: v for k, v in terms.items() if k.startswith("loss/")}
        text = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self._grad_watched:
            text += f", grad_norm={norm:.4g}"
        return f"non-finite {' and '.join(what) or 'loss'} ({text})"
