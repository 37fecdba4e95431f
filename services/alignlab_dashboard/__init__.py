"""The alignlab dashboard: compare ablations over seeds, submit specs, watch the nightly gate (FastAPI).

It reads MLflow (`alignlab.*` tags), the ablation specs and the runs/ folder through the core library; the
core never imports it. `alignlab dashboard` starts it; `create_app` builds it for tests and ASGI servers.
"""

from alignlab_dashboard.app import create_app
from alignlab_dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings", "create_app"]
