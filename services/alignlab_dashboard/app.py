"""The FastAPI app: routers per resource, the HTML pages, static files (uPlot is vendored: no CDN), the
Prometheus /metrics and the error handlers that turn the core's ValueErrors into one-line 4xx answers."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alignlab.redaction import redact
from alignlab_dashboard.auth import Authenticator, load_tokens
from alignlab_dashboard.deps import Context
from alignlab_dashboard.jobs import JobRunner
from alignlab_dashboard.metrics import DashboardMetrics
from alignlab_dashboard.routers import ablations, nightly, pages, runs, submit
from alignlab_dashboard.settings import DashboardSettings
from alignlab_dashboard.specs import SpecCatalog
from alignlab_dashboard.store import NotFound, RunStore

HERE = Path(__file__).parent
log = logging.getLogger("alignlab.dashboard")


def create_app(settings: DashboardSettings | None = None, workdir: Path | None = None) -> FastAPI:
    """The dashboard for `settings` (relative folders are under `workdir`, default the current folder)."""
    settings = settings or DashboardSettings()
    workdir = Path(workdir or Path.cwd()).resolve()
    settings = settings.model_copy(update={name: workdir / getattr(settings, name)
                                           for name in ("specs_dir", "runs_dir", "jobs_dir")})
    metrics = DashboardMetrics()
    tokens = load_tokens(settings.tokens_file) if settings.tokens_file else None
    ctx = Context(settings=settings, store=RunStore(settings.tracking_uri, metrics),
                  catalog=SpecCatalog(settings.specs_dir), jobs=JobRunner(settings.jobs_dir, workdir),
                  auth=Authenticator(tokens, settings.proxy_user_header, settings.proxy_role, settings.secret_key),
                  metrics=metrics, workdir=workdir)
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.jobs.shutdown()  # an orphaned job would run unsupervised

    app = FastAPI(title="alignlab dashboard", lifespan=lifespan, description="Compare ablations over seeds, "
                  "submit specs, watch the nightly gate. Every page's data is an endpoint here.")
    app.state.ctx = ctx
    for module in (ablations, runs, submit, nightly, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _add_observability(app, metrics)
    _add_error_handlers(app)
    return app


def _add_observability(app: FastAPI, metrics: DashboardMetrics) -> None:
    @app.middleware("http")
    async def time_requests(request: Request, call_next):
        tic = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")  # the route template, never the raw path (cardinality)
        metrics.requests.labels(template, request.method, str(response.status_code)).observe(time.perf_counter() - tic)
        return response

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def health() -> dict:
        return {"ok": True}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(request: Request, err: NotFound):
        return JSONResponse({"detail": redact(str(err))}, status_code=404)

    @app.exception_handler(ValueError)
    async def bad_input(request: Request, err: ValueError):
        return JSONResponse({"detail": redact(str(err))}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        if err.status_code == 401 and not request.url.path.startswith("/api/") and request.method == "GET":
            return Response(status_code=303, headers={"Location": f"/login?next={request.url.path}"})
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)
