"""Ablation reports: aggregate runs over seeds per arm and compare every arm with a baseline arm.

The names below load `report.aggregate` (numpy, scipy) on first use, so the CLI's `gate` parser, which lives
in this package, does not pay for them."""

__all__ = ["CSV_COLUMNS", "ReportTable", "build_report", "fetch_ablation_runs", "records_from_mlflow",
           "write_report"]


def __getattr__(name: str):
    if name in __all__:
        from alignlab.report import aggregate

        return getattr(aggregate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
