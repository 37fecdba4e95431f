"""Pydantic models at the API's edge: query parameters of the compare view and the bodies of posts."""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from alignlab.report import ReportTable
from alignlab.report.render import delta_text, format_p, mean_text
from alignlab_dashboard.compare import (AblationData, available_metrics, config_diff, default_metrics,
                                        protocol_fingerprints)


class CompareQuery(BaseModel):
    """The view a permalink reproduces: metrics (comma-separated), summary, its step / sample count, baseline."""

    metrics: str | None = None
    summary: str = Field("final", pattern="^(final|best|step|samples)$")
    at: int | None = Field(None, ge=0)
    baseline: str | None = None

    def metric_list(self) -> list[str]:
        return [m for m in (self.metrics or "").split(",") if m]


class SpecText(BaseModel):
    text: str = Field(max_length=200_000)


class Submission(BaseModel):
    text: str = Field(max_length=200_000)
    target: str = Field("local", pattern="^(local|kfp)$")
    runner: str = Field("kfp-local", pattern="^(kfp-local|inline)$")


def compare_payload(data: AblationData, table: ReportTable, query: CompareQuery) -> dict:
    """The report table (the core's JSON, NaN as null) plus display texts, metric choices, config diff and
    protocol fingerprints."""
    payload = json.loads(table.to_json())
    for cell in payload["cells"]:
        row = table.cell(cell["arm"], cell["metric"])
        cell["mean_text"] = mean_text(row)
        cell["delta_text"] = "" if cell["arm"] == table.baseline else delta_text(row)
        cell["p_holm_text"] = format_p(row["p_holm"])
    payload.update(ablation=data.name, summary=query.summary, at=query.at,
                   available_metrics=available_metrics(data), default_metrics=default_metrics(data),
                   config_diff=config_diff(data), protocols=protocol_fingerprints(data),
                   run_ids={f"{r['arm']}|{r['seed']}": r["run_id"] for r in data.records})
    return payload
