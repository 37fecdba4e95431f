"""The HTML pages. They are rendered from the same functions as the API; the compare and submit pages then
talk to the API from the browser (static/dashboard.js). A browser without a session is sent to /login."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from alignlab.redaction import redact
from alignlab_dashboard import ablations, nightly
from alignlab_dashboard.auth import COOKIE, User
from alignlab_dashboard.deps import Context, context, viewer
from alignlab_dashboard.routers.runs import run_details

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")
templates.env.filters["redact"] = redact  # URIs shown on a page never carry their credentials


def _page(request: Request, ctx: Context, user: User, name: str, **values) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"user": user, "csrf": ctx.auth.csrf_token(user),
                                                      "settings": ctx.settings, **values})


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, ctx: Context = Depends(context), user: User = Depends(viewer)):
    return _page(request, ctx, user, "ablations.html", ablations=ablations.all_ablations(ctx.store, ctx.catalog))


@router.get("/ablations/{name}", response_class=HTMLResponse)
def ablation_page(name: str, request: Request, ctx: Context = Depends(context), user: User = Depends(viewer)):
    return _page(request, ctx, user, "compare.html", ablation=ablations.grid_status(ctx.store, ctx.catalog, name),
                 plots=ablations.report_plots(ctx.settings.runs_dir, name))


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, ctx: Context = Depends(context), user: User = Depends(viewer)):
    return _page(request, ctx, user, "run.html", run=run_details(ctx, run_id))


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request, ctx: Context = Depends(context), user: User = Depends(viewer)):
    files = [path.name for path in ctx.catalog.files()]
    return _page(request, ctx, user, "submit.html", files=files, jobs=ctx.jobs.list(),
                 kfp_host=bool(ctx.settings.kfp_host))


@router.get("/nightly", response_class=HTMLResponse)
def nightly_page(request: Request, ctx: Context = Depends(context), user: User = Depends(viewer)):
    return _page(request, ctx, user, "nightly.html", gates=nightly.nightly(ctx.store, ctx.settings.runs_dir))


def _local_next(target: str) -> str:
    """Only same-site paths: a login link must not send the user elsewhere."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/", error: str = ""):
    return templates.TemplateResponse(request, "login.html", {"next": _local_next(next), "error": error,
                                                              "user": None})


@router.post("/login")
def login(request: Request, token: str = Form(...), next: str = Form("/"), ctx: Context = Depends(context)):
    if not ctx.auth.check_login(token):
        return RedirectResponse(f"/login?error=unknown+token&next={_local_next(next)}", status_code=303)
    response = RedirectResponse(_local_next(next), status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
