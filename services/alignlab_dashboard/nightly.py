"""The Nightly page: the regression gate's latest verdict per metric with its tolerance band (the gate.json
`alignlab run` writes to runs/<ablation>/gate/), and each gated metric's trend over the nightly runs in
MLflow, one series per arm, with the runs the gate flagged linked."""

from __future__ import annotations

import json
from pathlib import Path

from alignlab.report.regression_gate import STATES
from alignlab.tracking import TAG_ARM
from alignlab_dashboard.store import RunStore


def gate_files(runs_dir: Path) -> list[Path]:
    return sorted(Path(runs_dir).glob("*/gate/gate.json")) if Path(runs_dir).is_dir() else []


def nightly(store: RunStore, runs_dir: Path) -> list[dict]:
    """One entry per ablation with a gate: verdict, metrics (state, today, baseline +- allowed), trends."""
    out = []
    for path in gate_files(runs_dir):
        ablation = path.parent.parent.name
        gate = json.loads(path.read_text())
        runs = [r for r in store.runs(ablation) if r["status"] == "FINISHED"]
        trends = {}
        for verdict in gate["metrics"]:
            low = high = None
            if verdict["baseline"] is not None and verdict["allowed_deviation"] is not None:
                low = verdict["baseline"] - verdict["allowed_deviation"]
                high = verdict["baseline"] + verdict["allowed_deviation"]
            verdict["band"] = [low, high]
            series = [{"time_ms": r["start_time"], "value": r["metrics"].get(verdict["metric"]), "run_id": r["run_id"]}
                      for r in runs if r["tags"].get(TAG_ARM) == verdict["arm"] or not verdict["arm"]]
            trends[f"{verdict['arm']}|{verdict['metric']}"] = {"points": series, "band": [low, high]}
            latest = series[-1]["run_id"] if series else None
            verdict["run_id"] = latest if verdict["state"] in ("violation", "regression") else None
        out.append({"ablation": ablation, "status": gate["status"], "evaluated_at": gate["evaluated_at"],
                    "counts": gate["counts"], "metrics": gate["metrics"], "trends": trends, "states": list(STATES)})
    return out
