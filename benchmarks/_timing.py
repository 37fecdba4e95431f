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
