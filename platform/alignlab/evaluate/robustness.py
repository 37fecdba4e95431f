"""Effective robustness (Taori et al. 2020, "Measuring Robustness to Natural Distribution
Shifts"; CLIP section 3.3).

Across runs of one method, the accuracy under distribution shift is modelled as a linear function of the
in-distribution accuracy on logit-transformed axes:  logit(shift) = slope * logit(in) + intercept.
A run's effective robustness is its shifted accuracy minus the accuracy that line predicts from its
in-distribution accuracy (positive = more robust than the baseline trend). Accuracies are in percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Accuracies of exactly 0 or 100 % have an infinite logit; clip them just inside the open interval.
_EPS = 1e-4


def _logit(acc_percent: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(acc_percent, dtype=np.float64) / 100.0, _EPS, 1.0 - _EPS)
    return np.log(p / (1.0 - p))


def _as_percent(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0 or not np.all((array >= 0) & (array <= 100)):
        raise ValueError(f"{name} must be a non-empty list of accuracies in percent (0-100), got {list(values)}")
    return array


def effective_robustness(in_dist_acc: Sequence[float], shifted_acc: Sequence[float]) -> dict[str, float]:
    """Summarise runs (one in-distribution and one shifted accuracy per run, percent).

    Always returns `num_runs`, `in_dist_top1` and `shifted_top1` (means over runs) and
    `gap` = in_dist_top1 - shifted_top1. With at least two runs of different in-distribution accuracy it
    also returns the logit-space line `slope` and `intercept` (least squares); with a single run (or equal
    in-distribution accuracies) no line is defined and those keys are absent.
    """
    in_acc = _as_percent(in_dist_acc, "in_dist_acc")
    shift_acc = _as_percent(shifted_acc, "shifted_acc")
    if in_acc.size != shift_acc.size:
        raise ValueError(f"in_dist_acc has {in_acc.size} runs but shifted_acc has {shift_acc.size}; "
                         "give one pair of accuracies per run")
    summary = {
        "num_runs": int(in_acc.size),
        "in_dist_top1": float(in_acc.mean()),
        "shifted_top1": float(shift_acc.mean()),
        "gap": float(in_acc.mean() - shift_acc.mean()),
    }
    x = _logit(in_acc)
    if in_acc.size >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, _logit(shift_acc), deg=1)
        summary.update(slope=float(slope), intercept=float(intercept))
    return summary


def effective_robustness_residual(fit: dict, in_acc: float, shift_acc: float) -> float:
    """Effective robustness of one run against a fitted line: shift_acc - sigmoid(slope * logit(in_acc) +
    intercept), in percentage points."""
    if "slope" not in fit or "intercept" not in fit:
        raise ValueError("fit has no line (slope/intercept); effective_robustness needs at least two runs "
                         "with different in-distribution accuracies to fit one")
    in_value = _as_percent([in_acc], "in_acc")
    shift_value = _as_percent([shift_acc], "shift_acc")[0]
    predicted = 100.0 / (1.0 + np.exp(-(fit["slope"] * _logit(in_value)[0] + fit["intercept"])))
    return float(shift_value - predicted)
