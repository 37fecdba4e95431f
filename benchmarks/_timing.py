"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on
sys.path)."""

from __future__ import annotations

import time
from typing import Callable


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls of `run`: the least disturbed by other work on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_step_times(arms: dict, images, tokens, steps: int, context_fn: Callable[[int], dict],
                           warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per training step of each arm, the arms interleaved step by step (load changes hit them alike);
    the first `warmup` steps (allocator warm-up) are not kept.

    `arms`: name -> (model, optimizer, loss_fn, targets_fn or None); `targets_fn(images, indices)` gives the
    teacher targets, timed as part of the step. `context_fn(step)` gives the loss context (indices, step, ...)."""
    import contextlib

    import torch

    from alignlab.training.trainer import forward_backward

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(steps + warmup):
        context = context_fn(step)
        for name, (model, optimizer, loss_fn, targets_fn) in arms.items():
            tic = time.perf_counter()
            targets = targets_fn(images, context["indices"]) if targets_fn else {}
            forward_backward(model, loss_fn, images, tokens, context | {"targets": targets}, accumulation=1,
                             autocast=contextlib.nullcontext, scaler=scaler)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                times[name].append(time.perf_counter() - tic)
    return times


def print_ratios(times: dict[str, list[float]], base: str, label: str = "arm") -> None:
    """Median seconds per step of each arm and its ratio to the `base` arm."""
    import statistics

    reference = statistics.median(times[base])
    print(f"{label:12s} {'median s/step':>14s} {'x ' + base:>12s}")
    for name, values in times.items():
        print(f"{name:12s} {statistics.median(values):14.4f} {statistics.median(values) / reference:12.3f}")
