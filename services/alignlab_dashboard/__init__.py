"""The alignlab dashboard: compare ablations over seeds, submit specs, watch the nightly gate (FastAPI).

It reads MLflow (`alignlab.*` tags), the ablation specs and the runs/ folder through the core library; the
core never imports it. `alignlab dashboard` starts it; `create_app` builds it for tests and ASGI servers.
`create_app` and `DashboardSettings` load on first use: the `alignlab` command registers this package's
sub-command at every start, and FastAPI + MLflow would cost it seconds.
"""

__all__ = ["DashboardSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from alignlab_dashboard.app import create_app

        return create_app
    if name == "DashboardSettings":
        from alignlab_dashboard.settings import DashboardSettings

        return DashboardSettings
    raise AttributeError(f"module 'alignlab_dashboard' has no attribute {name!r}")
