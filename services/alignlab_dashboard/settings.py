"""Where the dashboard reads from and who may use it: one pydantic model, filled by `alignlab dashboard`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class DashboardSettings(BaseModel):
    """`tracking_uri` None: $MLFLOW_TRACKING_URI or the core's default (local mlflow.db). `tokens_file` None
    turns authentication off, which `alignlab dashboard` allows on 127.0.0.1 only. `proxy_user_header`: the
    header a trusted reverse proxy (oauth2-proxy's X-Forwarded-User) sets; those users get `proxy_role`."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = None
    specs_dir: Path = Path("ablations")
    runs_dir: Path = Path("runs")
    jobs_dir: Path = Path("runs/dashboard-jobs")
    tokens_file: Path | None = None
    proxy_user_header: str | None = None
    proxy_role: str = "viewer"
    kfp_host: str | None = None
    mlflow_ui_url: str | None = None
    kfp_ui_url: str | None = None
    curve_points: int = 400  # points per curve sent to the browser (downsampled by step bins)
    secret_key: bytes | None = None  # CSRF signing key; random per process when None
