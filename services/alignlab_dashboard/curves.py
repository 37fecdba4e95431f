"""Learning curves of one metric per arm: the mean over seeds with its 95 % CI band (the core's
`alignlab.report.stats.mean_ci_columns`), the individual seeds on request, resume markers, downsampled for display.

All arms share one x grid (the union of their logged steps, thinned to `points` evenly spaced entries) so a
chart can draw them on one axis; at each grid step a seed contributes its last value logged at or before
it, and nothing after its own last step. x is the step, or samples seen (step x batch size x world size).
"""

from __future__ import annotations

import math

import numpy as np

from alignlab.report.stats import mean_ci_columns
from alignlab_dashboard.compare import AblationData
from alignlab_dashboard.store import RunStore


def _clean(values) -> list[float | None]:
    return [None if v is None or not math.isfinite(v) else float(v) for v in values]


def _samples_per_step(run: dict) -> int:
    return int(run["params"].get("train.batch_size", "1")) * int(run["tags"].get("alignlab.world_size", "1"))


def _values_on_grid(history: list[tuple[int, float, int]], grid: np.ndarray) -> np.ndarray:
    """Last value at or before each grid step (logging order breaks ties: a resumed run's newer value wins)."""
    if not history:
        return np.full(len(grid), np.nan)
    ordered = sorted(history, key=lambda point: (point[0], point[2]))
    steps = np.array([p[0] for p in ordered])
    values = np.array([p[1] for p in ordered], dtype=float)
    index = np.searchsorted(steps, grid, side="right") - 1
    out = np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)
    out[grid > steps[-1]] = np.nan
    return out


def resume_steps(history: list[tuple[int, float, int]]) -> list[int]:
    """Steps at which a run logged a step it had already passed: it restarted from a checkpoint there."""
    return [history[i][0] for i in range(1, len(history)) if history[i][0] <= history[i - 1][0]]


def curves(store: RunStore, data: AblationData, metric: str, x: str = "step", with_seeds: bool = False,
           points: int = 400) -> dict:
    if x not in ("step", "samples"):
        raise ValueError(f"x must be 'step' or 'samples', got {x!r}")
    runs = {run["run_id"]: run for run in data.runs}
    chosen = [runs[r["run_id"]] for r in data.records]
    histories = store.histories(chosen, metric)
    scale = [(_samples_per_step(run) if x == "samples" else 1) for run in chosen]
    all_x = sorted({s * k for history, k in zip(histories, scale) for s, _, _ in history})
    if len(all_x) > points:
        all_x = [all_x[int(round(i))] for i in np.linspace(0, len(all_x) - 1, points)]
    grid = np.array(all_x, dtype=float)
    arms = []
    for arm in dict.fromkeys(r["arm"] for r in data.records):
        members = [(r, h, k) for r, h, k in zip(data.records, histories, scale) if r["arm"] == arm]
        matrix = np.array([_values_on_grid([(s * k, v, t) for s, v, t in h], grid) for _, h, k in members])
        counts = np.sum(~np.isnan(matrix), axis=0)
        means = np.divide(np.nansum(matrix, axis=0), counts, out=np.full(len(grid), np.nan), where=counts > 0)
        lows, highs = mean_ci_columns(matrix)
        entry = {"arm": arm, "mean": _clean(means), "ci_low": _clean(lows), "ci_high": _clean(highs),
                 "n_seeds": len(members),
                 "resumes": sorted({s * k for r, h, k in members for s in resume_steps(h)})}
        if with_seeds:
            entry["seeds"] = {str(r["seed"]): _clean(row) for (r, _, _), row in zip(members, matrix)}
        arms.append(entry)
    return {"metric": metric, "x_kind": x, "x": [float(v) for v in grid], "arms": arms}
