"""/api/specs and /api/jobs: shipped specs, live validation and dry run with the core schema, submission to
the embedded default's supervised runner or to a KFP host (the `alignlab submit` code path), job status,
logs and cancel. Posts take JSON (with the X-CSRF-Token header) or a form (with a `csrf` field)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ValidationError

from alignlab_dashboard import specs
from alignlab_dashboard.auth import User
from alignlab_dashboard.deps import Context, context, submitter, viewer
from alignlab_dashboard.jobs import JobBusy
from alignlab_dashboard.schemas import SpecText, Submission

router = APIRouter(tags=["submit"])


async def _body(request: Request, ctx: Context, user: User, model: type[BaseModel]) -> BaseModel:
    """The post's body as `model`, after the CSRF check that a cookie- or proxy-authenticated post needs."""
    if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded",
                                                           "multipart/form-data")):
        raw = dict(await request.form())
        presented = raw.pop("csrf", None)
    else:
        raw = await request.json()
        presented = request.headers.get("x-csrf-token")
    ctx.auth.check_csrf(user, presented)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise HTTPException(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()))


@router.get("/api/specs", dependencies=[Depends(viewer)])
def list_specs(ctx: Context = Depends(context)) -> list[dict]:
    out = []
    for path in ctx.catalog.files():
        spec, plans, error = ctx.catalog.load(path)
        out.append({"file": path.name, "name": spec.name if spec else None, "runs": len(plans), "error": error})
    return out


@router.get("/api/specs/{file}", dependencies=[Depends(viewer)])
def spec_text(file: str, ctx: Context = Depends(context)) -> dict:
    match = [p for p in ctx.catalog.files() if p.name == file]
    if not match:
        raise HTTPException(404, f"no spec file {file!r} in {ctx.catalog.specs_dir}")
    return {"file": file, "text": match[0].read_text()}


def _validate(ctx: Context, text: str):
    with tempfile.TemporaryDirectory(prefix="alignlab-spec-") as tmp:
        return specs.validate_text(text, ctx.catalog.specs_dir, Path(tmp))


def _dry_run(ctx: Context, spec, plans) -> dict:
    earlier = [r["metrics"]["train_seconds"] for r in ctx.store.runs(spec.name)
               if r["status"] == "FINISHED" and "train_seconds" in r["metrics"]]
    return specs.dry_run(spec, plans, earlier)


@router.post("/api/specs/validate")
async def validate(request: Request, ctx: Context = Depends(context), user: User = Depends(viewer)) -> dict:
    """{"valid", "errors": [{"path", "message"}], "dry_run"} for the posted spec text."""
    body = await _body(request, ctx, user, SpecText)
    spec, plans, errors = _validate(ctx, body.text)
    return {"valid": not errors, "errors": errors, "dry_run": _dry_run(ctx, spec, plans) if spec else None}


@router.post("/api/submit")
async def submit(request: Request, ctx: Context = Depends(context), user: User = Depends(submitter)) -> dict:
    body = await _body(request, ctx, user, Submission)
    spec, plans, errors = _validate(ctx, body.text)
    if errors:
        ctx.metrics.submissions.labels(body.target, "invalid").inc()
        raise HTTPException(422, {"message": "the spec is not valid", "errors": errors})
    if body.target == "kfp":
        return _submit_kfp(ctx, body.text)
    try:
        job = ctx.jobs.start(specs.absolutise(body.text, ctx.catalog.specs_dir), spec.name, body.runner)
    except JobBusy as err:
        ctx.metrics.submissions.labels("local", "busy").inc()
        raise HTTPException(409, str(err)) from None
    ctx.metrics.submissions.labels("local", "started").inc()
    return {"target": "local", "job": job}


def _submit_kfp(ctx: Context, text: str) -> dict:
    from alignlab_pipelines.compile import submit_spec

    if not ctx.settings.kfp_host:
        ctx.metrics.submissions.labels("kfp", "invalid").inc()
        raise HTTPException(400, "no KFP host configured: start the dashboard with --kfp-host URL")
    with tempfile.TemporaryDirectory(prefix="alignlab-submit-") as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(specs.absolutise(text, ctx.catalog.specs_dir))
        try:
            result = submit_spec(path, ctx.settings.kfp_host)
        except Exception as err:  # the KFP client raises many kinds; the user needs the one line
            ctx.metrics.submissions.labels("kfp", "error").inc()
            raise HTTPException(502, f"KFP did not accept the run: {type(err).__name__}") from None
    ctx.metrics.submissions.labels("kfp", "started").inc()
    return {"target": "kfp", "run_id": result.run_id}


@router.get("/api/jobs", dependencies=[Depends(viewer)])
def jobs(ctx: Context = Depends(context)) -> list[dict]:
    return ctx.jobs.list()


@router.get("/api/jobs/{job_id}", dependencies=[Depends(viewer)])
def job(job_id: str, ctx: Context = Depends(context)) -> dict:
    try:
        return {**ctx.jobs.get(job_id), "log": ctx.jobs.log(job_id)}
    except KeyError:
        raise HTTPException(404, f"no job {job_id!r}") from None


@router.post("/api/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request, ctx: Context = Depends(context),
                 user: User = Depends(submitter)) -> dict:
    presented = request.headers.get("x-csrf-token")
    if "form" in request.headers.get("content-type", ""):
        presented = (await request.form()).get("csrf")
    ctx.auth.check_csrf(user, presented)
    try:
        job = ctx.jobs.cancel(job_id)
    except KeyError:
        raise HTTPException(404, f"no job {job_id!r}") from None
    ctx.metrics.submissions.labels("local", "cancelled").inc()
    return job
