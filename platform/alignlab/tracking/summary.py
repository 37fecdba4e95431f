"""Turn per-step / per-epoch metric histories into the final and best values a run is compared on."""

import math
import statistics
from collections.abc import Callable, Mapping

LOWER_IS_BETTER_WORDS = ("loss", "rank")


def lower_is_better_by_name(name: str) -> bool:
    """Default direction: names containing "loss" or "rank" (any case) are lower-is-better."""
    return any(word in name.lower() for word in LOWER_IS_BETTER_WORDS)


def summarise_history(history: list[dict[str, float]],
                      higher_is_better: Mapping[str, bool] | Callable[[str], bool] | None = None) -> dict:
    """{"final_<name>": last logged value, "best_<name>": max (or min) over the history} for every metric.

    `history` holds one {name: value} dict per step or epoch; a metric may be absent from some entries
    (e.g. evaluated once per epoch), then only the entries holding it count. Direction per name: a callable
    decides for every name; a dict overrides listed names and leaves the rest to the name rule
    (`lower_is_better_by_name`). NaN values never win "best" (a diverged step is not the best one) but are
    kept as "final" when they are the last value; all-NaN gives a NaN best.
    """
    if callable(higher_is_better):
        is_higher_better = higher_is_better
    elif higher_is_better is None or isinstance(higher_is_better, Mapping):
        overrides = dict(higher_is_better or {})
        def is_higher_better(name: str) -> bool:
            return bool(overrides[name]) if name in overrides else not lower_is_better_by_name(name)
    else:
        raise ValueError(f"higher_is_better must be a dict of name -> bool or a callable, "
                         f"got {type(higher_is_better).__name__}")

    values: dict[str, list[float]] = {}
    for index, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise ValueError(f"history[{index}] must be a dict of metric name -> value, got {type(entry).__name__}")
        for name, value in entry.items():
            try:
                values.setdefault(name, []).append(float(value))
            except (TypeError, ValueError) as error:
                raise ValueError(f"history[{index}][{name!r}] must be a number, got {value!r}") from error

    summary = {}
    for name, series in values.items():
        finite = [v for v in series if not math.isnan(v)]
        pick = max if is_higher_better(name) else min
        summary[f"final_{name}"] = series[-1]
        summary[f"best_{name}"] = pick(finite) if finite else math.nan
    return summary


def cost_figures(step_times: list[float], train_seconds: float, devices: int,
                 usd_per_device_hour: float | None = None) -> dict:
    """The thesis' cost reporting (Tables 13, 17): `time/ms_per_batch` (median step, ms), `time/device_hours`
    (wall time x devices) and, with a price, `cost/usd`."""
    finite = [t for t in step_times if not math.isnan(t)]
    figures = {"time/device_hours": train_seconds * devices / 3600.0}
    if finite:
        figures["time/ms_per_batch"] = 1000.0 * statistics.median(finite)
    if usd_per_device_hour is not None:
        figures["cost/usd"] = figures["time/device_hours"] * usd_per_device_hour
    return figures
