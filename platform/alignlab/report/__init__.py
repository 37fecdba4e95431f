"""Ablation reports: aggregate runs over seeds per arm and compare every arm with a baseline arm."""

from alignlab.report.aggregate import (
    CSV_COLUMNS,
    ReportTable,
    build_report,
    fetch_ablation_runs,
    records_from_mlflow,
    write_report,
)

__all__ = ["CSV_COLUMNS", "ReportTable", "build_report", "fetch_ablation_runs", "records_from_mlflow",
           "write_report"]
