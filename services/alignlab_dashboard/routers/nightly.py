"""/api/nightly: the regression gate's verdicts and trends."""

from fastapi import APIRouter, Depends

from alignlab_dashboard.deps import Context, context, viewer
from alignlab_dashboard.nightly import nightly

router = APIRouter(prefix="/api/nightly", tags=["nightly"], dependencies=[Depends(viewer)])


@router.get("")
def gates(ctx: Context = Depends(context)) -> list[dict]:
    return nightly(ctx.store, ctx.settings.runs_dir)
