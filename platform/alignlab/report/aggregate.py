"""Ablation report: per arm x metric statistics over seeds and the comparison of every arm with a baseline arm.

Per (arm, metric), over the seeds that logged the metric (n; a missing value is never filled, and the
seeds it lacks are listed): mean, sample std (ddof=1), the t-based 95 % CI of the mean. Per arm against the
baseline (`alignlab.report.stats.compare`): delta, its 95 % CI, the test (paired t when both arms have the
metric for the same seeds, Welch's t otherwise), p, the sign-flip permutation p of a paired test, Welch's p
and an effect size; p_holm adjusts p over every arm x metric of the Holm family (the headline metrics, by
default all). A delta is `significant` when p_holm < alpha; an arm with fewer than 3 finished seeds is
preliminary. A NaN value (e.g. a diverged loss) is a value, not a missing one: it shows up as a NaN mean
and no test instead of vanishing.
"""

import csv
import json
import math
import numbers
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignlab.report.stats import MIN_SEEDS, compare, holm, mean_ci

ALPHA = 0.05
CSV_COLUMNS = ("arm", "metric", "mean", "std", "n", "seeds", "missing_seeds", "mean_ci_low", "mean_ci_high",
               "delta", "ci_low", "ci_high", "test", "paired", "n_baseline", "p", "p_holm", "p_perm", "p_welch",
               "effect_size", "effect_size_kind", "significant", "preliminary", "baseline")


@dataclass(frozen=True)
class ReportTable:
    """Tidy cells (one per arm x metric, fields as in CSV_COLUMNS) plus the arm order, finished runs per arm,
    runs left out upstream (`skipped_runs`), planned runs without results (`missing_runs`) and the Holm
    family (the metrics whose p-values were adjusted together)."""

    baseline: str
    arms: list[str]
    metrics: list[str]
    runs_per_arm: dict[str, int]
    cells: list[dict]
    skipped_runs: list[dict] = field(default_factory=list)
    missing_runs: list[dict] = field(default_factory=list)
    family: list[str] = field(default_factory=list)
    alpha: float = ALPHA

    def cell(self, arm: str, metric: str) -> dict:
        for row in self.cells:
            if row["arm"] == arm and row["metric"] == metric:
                return row
        raise KeyError(f"no cell for arm {arm!r} and metric {metric!r}")

    @property
    def preliminary_arms(self) -> list[str]:
        """Arms with fewer than MIN_SEEDS finished runs: their intervals are wide and their tests weak."""
        return [arm for arm in self.arms if self.runs_per_arm[arm] < MIN_SEEDS]

    @property
    def family_size(self) -> int:
        """Number of p-values Holm adjusted together (the tests that could be computed in the family)."""
        return sum(1 for row in self.cells if row["metric"] in self.family and not math.isnan(row["p"]))

    def to_markdown(self, metrics: list[str] | None = None, details: bool = True) -> str:
        """The headline table of `metrics` (all when None) with its notes; `details` adds every statistic."""
        from alignlab.report.render import report_markdown

        return report_markdown(self, self.metrics if metrics is None else list(metrics), details=details)

    def to_csv(self, path: str | Path) -> Path:
        """Long format, one line per (arm, metric), columns CSV_COLUMNS.

        Floats are written in full precision; "nan" marks an undefined value (float("nan") reads it back);
        seed lists are ";"-separated; an empty `significant` means no claim (not in the Holm family)."""
        path = Path(path)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in self.cells:
                writer.writerow({key: _csv_value(row[key]) for key in CSV_COLUMNS})
        return path

    def to_json(self) -> str:
        """The whole table as JSON (full precision); undefined values (NaN) become null."""
        cells = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                 for row in self.cells]
        return json.dumps({"baseline": self.baseline, "arms": self.arms, "metrics": self.metrics,
                           "runs_per_arm": self.runs_per_arm, "preliminary_arms": self.preliminary_arms,
                           "holm": {"alpha": self.alpha, "family_metrics": self.family,
                                    "family_size": self.family_size},
                           "cells": cells, "missing_runs": self.missing_runs, "skipped_runs": self.skipped_runs},
                          indent=2, allow_nan=False, default=str)


def _csv_value(value):
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return "" if value is None else value


def _check_record(index: int, record) -> tuple[str, int, Mapping]:
    if not isinstance(record, Mapping) or not {"arm", "seed", "metrics"} <= record.keys():
        raise ValueError(f"records[{index}] must be a dict with 'arm', 'seed' and 'metrics', got {record!r}")
    arm, seed, metrics = record["arm"], record["seed"], record["metrics"]
    if not isinstance(arm, str) or not arm:
        raise ValueError(f"records[{index}]['arm'] must be a non-empty string, got {arm!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"records[{index}]['seed'] must be an int, got {seed!r}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"records[{index}]['metrics'] must be a dict of name -> number, got {metrics!r}")
    for name, value in metrics.items():
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
            raise ValueError(f"records[{index}] (arm {arm!r}, seed {seed}) metric {name!r} must be a number "
                             f"or None (missing), got {value!r}")
    return arm, int(seed), metrics


def _check_missing(missing_runs: list[dict]) -> list[dict]:
    for index, run in enumerate(missing_runs):
        if not isinstance(run, Mapping) or not {"arm", "seed", "reason"} <= run.keys():
            raise ValueError(f"missing_runs[{index}] must be a dict with 'arm', 'seed' and 'reason', got {run!r}")
    return [dict(run) for run in missing_runs]


def _planned_seeds(records_seeds: dict[str, set], runs: list[dict]) -> dict[str, set]:
    """Seeds each arm was meant to have: its finished runs plus runs that failed, went missing or were left
    out (a run superseded by a newer one of the same seed adds nothing new)."""
    planned = {arm: set(seeds) for arm, seeds in records_seeds.items()}
    for run in runs:
        if isinstance(run.get("seed"), int) and run.get("arm"):
            planned.setdefault(run["arm"], set()).add(run["seed"])
    return planned


def build_report(records: list[dict], baseline: str, metrics: list[str] | None = None,
                 skipped_runs: list[dict] | None = None, *, family: list[str] | None = None,
                 missing_runs: list[dict] | None = None, alpha: float = ALPHA) -> ReportTable:
    """Aggregate {"arm", "seed", "metrics": {name: value}} records into one cell per arm x metric (module
    docstring).

    Arms keep their order of first appearance with the baseline moved first. `metrics` restricts and orders
    the metrics (default: every metric, in order of first appearance). An absent or None value is missing
    and lowers that cell's n. `skipped_runs` (runs left out upstream, e.g. FAILED in MLflow) and
    `missing_runs` ({"arm", "seed", "reason"}: planned runs without results) are carried into the report and
    their seeds count as the arm's missing seeds. `family` (default: every reported metric) names the
    metrics whose p-values are Holm-adjusted together, over all arms.
    """
    skipped, missing = list(skipped_runs or []), _check_missing(list(missing_runs or []))
    arms, seen, values, all_metrics = [], set(), {}, []
    for index, record in enumerate(records):
        arm, seed, run_metrics = _check_record(index, record)
        if (arm, seed) in seen:
            raise ValueError(f"arm {arm!r} seed {seed} appears twice in records; keep one run per (arm, seed)")
        seen.add((arm, seed))
        if arm not in arms:
            arms.append(arm)
        for name, value in run_metrics.items():
            if name not in all_metrics:
                all_metrics.append(name)
            if value is not None:
                values.setdefault((arm, name), {})[seed] = float(value)
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} has no finished runs; arms with results: {arms}")
    chosen = all_metrics if metrics is None else list(metrics)
    unknown = [m for m in chosen if m not in all_metrics]
    if unknown:
        raise ValueError(f"metrics {unknown} were not logged by any run; available: {all_metrics}")
    family = chosen if family is None else list(family)
    outside = [m for m in family if m not in chosen]
    if outside:
        raise ValueError(f"Holm family metrics {outside} are not in the report; reported: {chosen}")
    arms += [run["arm"] for run in missing if run["arm"] not in arms]  # arms whose every run failed still show
    arms = list(dict.fromkeys([baseline] + arms))
    planned = _planned_seeds({arm: {s for a, s in seen if a == arm} for arm in arms}, skipped + missing)
    runs_per_arm = {arm: sum(1 for a, _ in seen if a == arm) for arm in arms}

    cells = [_cell(arm, metric, values.get((arm, metric), {}), values.get((baseline, metric), {}), baseline,
                   sorted(planned.get(arm, ())), runs_per_arm[arm] < MIN_SEEDS)
             for arm in arms for metric in chosen]
    in_family = [row for row in cells if row["metric"] in family and row["arm"] != baseline]
    for row, adjusted in zip(in_family, holm([row["p"] for row in in_family])):
        row["p_holm"] = adjusted
        row["significant"] = None if math.isnan(adjusted) else bool(adjusted < alpha)
    return ReportTable(baseline, arms, chosen, runs_per_arm, cells, skipped, missing, family, alpha)


def _cell(arm: str, metric: str, by_seed: dict[int, float], base_by_seed: dict[int, float], baseline: str,
          planned_seeds: list[int], preliminary: bool) -> dict:
    x = np.asarray(list(by_seed.values()))
    ci = mean_ci(x)
    row = {"arm": arm, "metric": metric, "mean": float(x.mean()) if len(x) else math.nan,
           "std": float(x.std(ddof=1)) if len(x) >= 2 else math.nan, "n": int(len(x)), "seeds": sorted(by_seed),
           "missing_seeds": [s for s in planned_seeds if s not in by_seed],
           "mean_ci_low": ci[0], "mean_ci_high": ci[1], "delta": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "test": "baseline", "paired": False, "n_baseline": len(base_by_seed),
           "p": math.nan, "p_holm": math.nan, "p_perm": math.nan, "p_welch": math.nan, "effect_size": math.nan,
           "effect_size_kind": "", "significant": None, "preliminary": preliminary, "baseline": baseline}
    if arm == baseline:
        row["delta"] = 0.0 if len(x) else math.nan
        return row
    result = compare(by_seed, base_by_seed)
    row.update(delta=result.delta, ci_low=result.ci_low, ci_high=result.ci_high, test=result.test,
               paired=result.paired, p=result.p, p_perm=result.p_perm, p_welch=result.p_welch,
               effect_size=result.effect_size, effect_size_kind=result.effect_size_kind)
    return row


def write_report(table: ReportTable, out_dir: str | Path, metrics: list[str] | None = None) -> dict[str, Path]:
    """Write report.md (headline `metrics`, default all, with details), report.csv and report.json (all
    metrics)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
    paths["md"].write_text(table.to_markdown(metrics))
    table.to_csv(paths["csv"])
    paths["json"].write_text(table.to_json())
    return paths


def fetch_ablation_runs(tracking_uri: str | None, ablation_name: str,
                        runs: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(records, skipped) for the runs tagged `alignlab.ablation` = `ablation_name`, in every experiment.

    Records come from FINISHED runs only; for an (arm, seed) finished more than once the newest run wins.
    `skipped` lists the other runs with the reason (status, or "superseded by <run_id>"). `runs` (the
    `find_runs` records of that tag, oldest first) skips the query for a caller that already holds them.
    """
    from alignlab.tracking import TAG_ABLATION, TAG_ARM, TAG_SEED, find_runs  # mlflow is slow to import

    if runs is None:
        runs = find_runs(tracking_uri, None, {TAG_ABLATION: ablation_name})
    if not runs:
        raise ValueError(f"no runs tagged {TAG_ABLATION}={ablation_name!r} in tracking store {tracking_uri!r}")
    latest, skipped = {}, []
    for run in runs:  # oldest first, so a later run of the same (arm, seed) replaces an earlier one
        arm, seed = run["tags"].get(TAG_ARM), run["tags"].get(TAG_SEED, "")
        if not arm or not seed.lstrip("-").isdigit():
            raise ValueError(f"run {run['run_id']} of ablation {ablation_name!r} lacks a valid {TAG_ARM} / "
                             f"{TAG_SEED} tag (got {arm!r} / {seed!r}); tag it or delete the run")
        entry = {"run_id": run["run_id"], "arm": arm, "seed": int(seed), "status": run["status"]}
        if run["status"] != "FINISHED":
            skipped.append({**entry, "reason": run["status"]})
            continue
        previous = latest.get((arm, int(seed)))
        if previous is not None:
            skipped.append({**previous[0], "reason": f"superseded by {run['run_id']}"})
        latest[(arm, int(seed))] = (entry, run["metrics"])
    records = [{"arm": e["arm"], "seed": e["seed"], "metrics": m, "run_id": e["run_id"]}
               for e, m in latest.values()]
    return records, skipped


def records_from_mlflow(tracking_uri: str | None, ablation_name: str) -> list[dict]:
    """Records of the ablation's FINISHED runs; a warning counts the runs left out (`fetch_ablation_runs`)."""
    records, skipped = fetch_ablation_runs(tracking_uri, ablation_name)
    if skipped:
        reasons = Counter(run["reason"].split(" ")[0] for run in skipped)  # "superseded by x" -> superseded
        warnings.warn(f"ablation {ablation_name!r}: left out {len(skipped)} of {len(skipped) + len(records)} "
                      f"runs ({', '.join(f'{k}: {v}' for k, v in reasons.items())}); "
                      f"fetch_ablation_runs lists them", stacklevel=2)
    return records
