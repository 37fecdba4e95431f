"""FastAPI dependencies: the app's context (store, specs, jobs, auth, metrics) and role checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request

from alignlab_dashboard.auth import Authenticator, User
from alignlab_dashboard.jobs import JobRunner
from alignlab_dashboard.metrics import DashboardMetrics
from alignlab_dashboard.settings import DashboardSettings
from alignlab_dashboard.specs import SpecCatalog
from alignlab_dashboard.store import RunStore


@dataclass
class Context:
    settings: DashboardSettings
    store: RunStore
    catalog: SpecCatalog
    jobs: JobRunner
    auth: Authenticator
    metrics: DashboardMetrics
    workdir: Path


def context(request: Request) -> Context:
    return request.app.state.ctx


def role(name: str):
    """Dependency: the user, 401 when unauthenticated, 403 when below role `name`."""
    def check(request: Request, ctx: Context = Depends(context)) -> User:
        return ctx.auth.require(request, name)
    return check


viewer = role("viewer")
submitter = role("submitter")
