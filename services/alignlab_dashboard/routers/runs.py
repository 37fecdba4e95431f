"""/api/runs: one run (config, metrics, tags, artifacts) and its artifact files; /files: report files under
the runs/ folder. Every path is resolved inside its root; anything else is a 404 that reads nothing."""

from __future__ import annotations

import mimetypes
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from alignlab_dashboard.deps import Context, context, viewer
from alignlab_dashboard.store import NotFound

router = APIRouter(tags=["runs"], dependencies=[Depends(viewer)])
SAFE_TYPES = {"image/png", "image/jpeg", "image/svg+xml", "text/plain", "text/markdown", "text/csv",
              "application/json", "application/x-yaml", "text/yaml"}


def run_details(ctx: Context, run_id: str) -> dict:
    run = ctx.store.run(run_id)
    settings = ctx.settings
    tags = run["tags"]
    checkpoint = [a["path"] for a in ctx.store.artifacts(run_id, "checkpoint")] \
        if any(a["path"] == "checkpoint" for a in ctx.store.artifacts(run_id)) else []
    return {**run, "artifacts": ctx.store.artifacts(run_id),
            "checkpoint_uri": f"runs:/{run_id}/{checkpoint[-1]}" if checkpoint else None,
            "git_commit": tags.get("alignlab.git_commit"),
            "mlflow_url": f"{settings.mlflow_ui_url}/#/experiments/{run['experiment_id']}/runs/{run_id}"
            if settings.mlflow_ui_url else None,
            "kfp_url": None}


@router.get("/api/runs/{run_id}")
def get_run(run_id: str, ctx: Context = Depends(context)) -> dict:
    return run_details(ctx, run_id)


@router.get("/api/runs/{run_id}/artifacts")
def list_artifacts(run_id: str, path: str | None = None, ctx: Context = Depends(context)) -> list[dict]:
    return ctx.store.artifacts(run_id, path)


def _file_response(local: Path, name: str) -> Response:
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    # Only passive types render inline; anything else (HTML, JS) downloads, so an artifact cannot script the app.
    inline = kind in SAFE_TYPES
    return Response(local.read_bytes(), media_type=kind if inline else "application/octet-stream",
                    headers={"Content-Disposition": f'{"inline" if inline else "attachment"}; '
                                                    f'filename="{PurePosixPath(name).name}"',
                             "X-Content-Type-Options": "nosniff"})


@router.get("/api/runs/{run_id}/artifacts/{path:path}")
def artifact(run_id: str, path: str, ctx: Context = Depends(context)) -> Response:
    with ctx.store.scratch() as tmp:
        local = ctx.store.download(run_id, path, Path(tmp))
        return _file_response(local, path)


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
    kind = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
    return FileResponse(local, media_type=kind if kind in SAFE_TYPES else "application/octet-stream",
                        headers={"X-Content-Type-Options": "nosniff"})
