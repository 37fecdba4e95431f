"""/api/runs: one run (config, metrics, tags, artifacts) and its artifact files; /files: report files under
the runs/ folder. Every path is resolved inside its root; anything else is a 404 that reads nothing."""

from __future__ import annotations

import mimetypes
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from alignlab.redaction import redact
from alignlab_dashboard.ablations import PIPELINE_RUN_TAG
from alignlab_dashboard.deps import Context, context, viewer
from alignlab_dashboard.store import NotFound

router = APIRouter(tags=["runs"], dependencies=[Depends(viewer)])
# Rendered inline; everything else downloads (HTML, JS and SVG could run script in the dashboard's origin).
SAFE_TYPES = {"image/png", "image/jpeg", "text/plain", "text/markdown", "text/csv",
              "application/json", "application/x-yaml", "text/yaml"}


def run_details(ctx: Context, run_id: str) -> dict:
    run = ctx.store.run(run_id)
    settings = ctx.settings
    tags = run["tags"]
    artifacts = ctx.store.artifacts(run_id)
    checkpoint = [a["path"] for a in ctx.store.artifacts(run_id, "checkpoint")] \
        if any(a["path"] == "checkpoint" and a["is_dir"] for a in artifacts) else []
    images = [a["path"] for a in artifacts if a["path"].endswith((".png", ".jpg"))]
    for folder in (a["path"] for a in artifacts if a["is_dir"] and a["path"] != "checkpoint"):
        images += [a["path"] for a in ctx.store.artifacts(run_id, folder) if a["path"].endswith((".png", ".jpg"))]
    return {**run, "artifacts": artifacts, "images": images,
            "checkpoint_uri": f"runs:/{run_id}/{checkpoint[-1]}" if checkpoint else None,
            "git_commit": tags.get("alignlab.git_commit"),
            "mlflow_url": f"{redact(settings.mlflow_ui_url)}/#/experiments/{run['experiment_id']}/runs/{run_id}"
            if settings.mlflow_ui_url else None,
            **_kfp_run(ctx, tags.get("mlflow.parentRunId"))}


def _kfp_run(ctx: Context, parent_run_id: str | None) -> dict:
    """The KFP run of a pipeline step's MLflow run: its parent (the pipeline's run) carries the id."""
    kfp_run_id = None
    if parent_run_id:
        try:
            kfp_run_id = ctx.store.run(parent_run_id)["tags"].get(PIPELINE_RUN_TAG)
        except NotFound:
            pass
    url = ctx.settings.kfp_ui_url
    return {"kfp_run_id": kfp_run_id,
            "kfp_url": f"{redact(url)}/#/runs/details/{kfp_run_id}" if kfp_run_id and url else None}


@router.get("/api/runs/{run_id}")
def get_run(run_id: str, ctx: Context = Depends(context)) -> dict:
    return run_details(ctx, run_id)


@router.get("/api/runs/{run_id}/artifacts")
def list_artifacts(run_id: str, path: str | None = None, ctx: Context = Depends(context)) -> list[dict]:
    return ctx.store.artifacts(run_id, path)


def _file_response(local: Path, name: str, cleanup: BackgroundTask | None = None) -> FileResponse:
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    inline = kind in SAFE_TYPES
    return FileResponse(local, media_type=kind if inline else "application/octet-stream", background=cleanup,
                        headers={"Content-Disposition": f'{"inline" if inline else "attachment"}; '
                                                        f'filename="{PurePosixPath(name).name}"',
                                 "X-Content-Type-Options": "nosniff"})


@router.get("/api/runs/{run_id}/artifacts/{path:path}")
def artifact(run_id: str, path: str, ctx: Context = Depends(context)) -> FileResponse:
    """The artifact file, streamed from a scratch folder removed once it is sent (checkpoints are large)."""
    scratch = Path(tempfile.mkdtemp(prefix="alignlab-dashboard-"))
    try:
        local = ctx.store.download(run_id, path, scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return _file_response(local, path, BackgroundTask(shutil.rmtree, scratch, ignore_errors=True))


@router.get("/files/{path:path}")
def report_file(path: str, ctx: Context = Depends(context)) -> FileResponse:
    """A file under the runs/ folder (reports, plots, gate outputs)."""
    root = ctx.settings.runs_dir.resolve()
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\\" in path or any(p in ("..", ".") for p in parts):
        raise NotFound(f"no file {path!r}")
    local = (root / path).resolve()
    if not local.is_relative_to(root) or not local.is_file():
        raise NotFound(f"no file {path!r}")
    return _file_response(local, local.name)
