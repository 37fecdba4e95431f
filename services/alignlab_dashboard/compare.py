"""The compare view of one ablation: the core's report table (`alignlab.report.build_report`) over a chosen
summary of each run's metrics, the config keys that differ between arms, and the eval-protocol fingerprint.

Summaries: "final" is the run's last logged value (what `alignlab report` reads from results.json); "best"
the best value of the history (direction by `alignlab.tracking.lower_is_better_by_name`, NaN never wins);
"step" the last value logged at or before step S; "samples" the same at samples seen N (N // batch size x
world size steps). The Holm family is exactly the metrics on screen, over every arm.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from alignlab.ablation import AblationSpec, RunPlan
from alignlab.report import ReportTable, build_report, fetch_ablation_runs
from alignlab.tracking import TAG_ARM, TAG_DATASET_HASH, TAG_GIT_COMMIT, TAG_SEED, lower_is_better_by_name
from alignlab_dashboard.specs import SpecCatalog
from alignlab_dashboard.store import NotFound, RunStore

SUMMARIES = ("final", "best", "step", "samples")
DEFAULT_METRICS = 6  # without a spec's report_metrics, the first few logged metrics
IGNORED_CONFIG_KEYS = ("seed", "name")  # differ by construction, not by arm


@dataclass
class AblationData:
    """What one ablation has in MLflow and in its spec (`spec` None when no shipped spec has its name)."""

    name: str
    runs: list[dict]
    records: list[dict]
    skipped: list[dict]
    spec: AblationSpec | None
    plans: list[RunPlan]


def load_ablation(store: RunStore, catalog: SpecCatalog, name: str) -> AblationData:
    runs = store.runs(name)
    found = catalog.find(name)
    if not runs and found is None:
        raise NotFound(f"no ablation {name!r}: no MLflow run is tagged with it and no spec in "
                       f"{catalog.specs_dir} has that name")
    records, skipped = fetch_ablation_runs(store.uri, name, runs=runs) if runs else ([], [])
    spec, plans = (found[1], found[2]) if found else (None, [])
    return AblationData(name, runs, records, skipped, spec, plans)


def missing_runs(data: AblationData) -> list[dict]:
    """Planned arm x seed of the spec with no run at all in MLflow (failed runs are in `skipped`)."""
    present = {(r["tags"].get(TAG_ARM), r["tags"].get(TAG_SEED)) for r in data.runs}
    return [{"arm": p.arm, "seed": p.seed, "reason": "not in MLflow (not run yet)"}
            for p in data.plans if (p.arm, str(p.seed)) not in present]


def available_metrics(data: AblationData) -> list[str]:
    return list(dict.fromkeys(m for record in data.records for m in record["metrics"]))


def default_metrics(data: AblationData) -> list[str]:
    logged = available_metrics(data)
    wanted = data.spec.report_metrics if data.spec and data.spec.report_metrics else logged[:DEFAULT_METRICS]
    return [m for m in wanted if m in logged]


def summarised(store: RunStore, data: AblationData, metrics: list[str], summary: str, at: int | None) -> list[dict]:
    """The records with each chosen metric's value replaced by the chosen summary of its history."""
    if summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {list(SUMMARIES)}, got {summary!r}")
    if summary == "final":
        return [{**r, "metrics": {m: r["metrics"].get(m) for m in metrics}} for r in data.records]
    if summary in ("step", "samples") and (at is None or at < 0):
        raise ValueError(f"summary {summary!r} needs `at` (a step or a sample count >= 0)")
    runs = {run["run_id"]: run for run in data.runs}
    chosen = [runs[r["run_id"]] for r in data.records]
    out = [{**r, "metrics": {}} for r in data.records]
    for metric in metrics:
        for record, run, history in zip(out, chosen, store.histories(chosen, metric)):
            record["metrics"][metric] = _summary(history, metric, summary, _step_limit(run, summary, at))
    return out


def _step_limit(run: dict, summary: str, at: int | None) -> int | None:
    if summary == "step":
        return at
    if summary == "samples":
        per_step = int(run["params"].get("train.batch_size", "1")) * int(run["tags"].get("alignlab.world_size", "1"))
        return at // max(per_step, 1)
    return None


def _summary(history: list[tuple[int, float, int]], metric: str, summary: str, limit: int | None) -> float | None:
    if not history:
        return None
    if summary == "best":
        finite = [v for _, v, _ in history if not math.isnan(v)]
        pick = min if lower_is_better_by_name(metric) else max
        return pick(finite) if finite else math.nan
    before = [(s, t, v) for s, v, t in history if s <= limit]
    return max(before)[2] if before else None


def compare_table(store: RunStore, data: AblationData, metrics: list[str], summary: str = "final",
                  at: int | None = None, baseline: str | None = None) -> ReportTable:
    """`build_report` of the summarised records; missing and failed runs are carried, never dropped."""
    if not data.records:
        raise NotFound(f"ablation {data.name!r} has no FINISHED run yet")
    unknown = [m for m in metrics if m not in available_metrics(data)]
    if unknown:
        raise ValueError(f"metrics {unknown} were not logged by any run; available: {available_metrics(data)}")
    base = baseline or (data.spec.baseline_arm if data.spec else data.records[0]["arm"])
    records = [{"arm": r["arm"], "seed": r["seed"], "metrics": r["metrics"]}
               for r in summarised(store, data, metrics, summary, at)]
    return build_report(records, baseline=base, metrics=metrics, skipped_runs=data.skipped, family=metrics,
                        missing_runs=missing_runs(data))


def config_diff(data: AblationData) -> dict:
    """{"keys": [...], "arms": {arm: {key: value}}}: the flattened config keys whose values differ between
    arms (one finished run per arm; seed and name left out)."""
    by_arm = {}
    runs = {run["run_id"]: run for run in data.runs}
    for record in data.records:
        by_arm.setdefault(record["arm"], runs[record["run_id"]]["params"])
    keys = sorted({k for params in by_arm.values() for k in params} - set(IGNORED_CONFIG_KEYS))
    differing = [k for k in keys if len({params.get(k) for params in by_arm.values()}) > 1]
    return {"keys": differing, "arms": {arm: {k: params.get(k) for k in differing} for arm, params in by_arm.items()}}


def protocol_fingerprints(data: AblationData) -> dict:
    """Per arm, the eval protocol its runs used (dataset hash, hash of the eval.* settings, git commit);
    `mismatch` lists the parts on which arms differ: such arms are not comparable as they stand."""
    runs = {run["run_id"]: run for run in data.runs}
    arms: dict[str, set] = {}
    for record in data.records:
        run = runs[record["run_id"]]
        evals = {k: v for k, v in run["params"].items() if k.startswith("eval.")}
        fingerprint = (run["tags"].get(TAG_DATASET_HASH, "?"),
                       hashlib.sha256(json.dumps(evals, sort_keys=True).encode()).hexdigest()[:12],
                       run["tags"].get(TAG_GIT_COMMIT, "?"))
        arms.setdefault(record["arm"], set()).add(fingerprint)
    parts = ("dataset_hash", "eval_settings_hash", "git_commit")
    mismatch = [part for i, part in enumerate(parts) if len({f[i] for fs in arms.values() for f in fs}) > 1]
    return {"arms": {arm: [dict(zip(parts, f)) for f in sorted(fs)] for arm, fs in arms.items()},
            "mismatch": mismatch}
