"""The Ablations overview: every ablation's planned grid (arms x seeds of its spec) against its MLflow runs."""

from __future__ import annotations

from pathlib import Path

from alignlab.redaction import redact
from alignlab.tracking import TAG_ARM, TAG_GIT_COMMIT, TAG_SEED
from alignlab_dashboard.compare import load_ablation
from alignlab_dashboard.specs import SpecCatalog
from alignlab_dashboard.store import RunStore

STATES = {"FINISHED": "done", "RUNNING": "running", "SCHEDULED": "running", "FAILED": "failed", "KILLED": "failed"}
PIPELINE_TAG, PIPELINE_RUN_TAG = "alignlab.pipeline", "alignlab.pipeline_run_id"


def report_plots(runs_dir: Path, name: str) -> list[str]:
    """Plots the report wrote for this ablation (e.g. report_plot.png), as paths under the runs folder."""
    folder = Path(runs_dir) / name
    return [f"{name}/{p.name}" for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []


def grid_status(store: RunStore, catalog: SpecCatalog, name: str) -> dict:
    """Per planned (arm, seed): done / running / failed / missing from its newest run; runs outside the plan
    are listed too (arms or seeds the spec no longer has)."""
    data = load_ablation(store, catalog, name)
    newest = {}
    for run in data.runs:  # oldest first: the newest run of an (arm, seed) wins
        newest[(run["tags"].get(TAG_ARM), run["tags"].get(TAG_SEED))] = run
    planned = [(p.arm, str(p.seed)) for p in data.plans]
    cells = []
    for arm, seed in planned + sorted(k for k in newest if k not in planned):
        run = newest.get((arm, seed))
        cells.append({"arm": arm, "seed": int(seed) if str(seed).lstrip("-").isdigit() else seed,
                      "state": STATES.get(run["status"], "failed") if run else "missing",
                      "run_id": run["run_id"] if run else None, "planned": (arm, seed) in planned})
    counts = {state: sum(c["state"] == state for c in cells) for state in ("done", "running", "failed", "missing")}
    latest = data.runs[-1] if data.runs else None
    pipelines = store.runs(name, tag=PIPELINE_TAG)
    return {
        "name": name, "description": data.spec.description if data.spec else "",
        "spec_file": str(catalog.find(name)[0]) if data.spec else None,
        "arms": list(data.spec.arm_overrides()) if data.spec else sorted({c["arm"] for c in cells}),
        "seeds": data.spec.seeds if data.spec else sorted({c["seed"] for c in cells}, key=str),
        "baseline": data.spec.baseline_arm if data.spec else None,
        "counts": counts, "cells": cells, "runs": len(data.runs),
        "last_update_ms": max((r["start_time"] or 0 for r in data.runs), default=None),
        "git_commit": latest["tags"].get(TAG_GIT_COMMIT) if latest else None,
        "experiment_ids": sorted({r["experiment_id"] for r in data.runs}),
        "kfp_run_ids": [r["tags"][PIPELINE_RUN_TAG] for r in pipelines if r["tags"].get(PIPELINE_RUN_TAG)],
    }


def all_ablations(store: RunStore, catalog: SpecCatalog) -> list[dict]:
    """Every ablation's `grid_status`; one whose runs cannot be read (e.g. a run without its arm tag) is
    listed with the error instead of hiding the others."""
    out = []
    for name in sorted(set(store.ablations()) | set(catalog.by_name())):
        try:
            out.append(grid_status(store, catalog, name))
        except ValueError as err:
            out.append({"name": name, "error": redact(str(err)), "description": "", "arms": [], "seeds": [],
                        "counts": dict.fromkeys(("done", "running", "failed", "missing"), 0), "cells": [],
                        "last_update_ms": None, "git_commit": None, "experiment_ids": [], "kfp_run_ids": []})
    return out
