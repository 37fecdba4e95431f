"""/api/ablations: the overview, one ablation's grid, its compare table, curves and exports."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse

from alignlab_dashboard import ablations, compare, curves, export
from alignlab_dashboard.deps import Context, context, viewer
from alignlab_dashboard.schemas import CompareQuery, compare_payload

router = APIRouter(prefix="/api/ablations", tags=["ablations"], dependencies=[Depends(viewer)])


@router.get("")
def list_ablations(ctx: Context = Depends(context)) -> list[dict]:
    return ablations.all_ablations(ctx.store, ctx.catalog)


@router.get("/{name}")
def ablation(name: str, ctx: Context = Depends(context)) -> dict:
    return ablations.grid_status(ctx.store, ctx.catalog, name)


def _table(name: str, query: CompareQuery, ctx: Context):
    data = compare.load_ablation(ctx.store, ctx.catalog, name)
    metrics = query.metric_list() or compare.default_metrics(data)
    return data, compare.compare_table(ctx.store, data, metrics, query.summary, query.at, query.baseline)


@router.get("/{name}/compare")
def compare_view(name: str, query: CompareQuery = Depends(), ctx: Context = Depends(context)) -> dict:
    data, table = _table(name, query, ctx)
    return compare_payload(data, table, query)


@router.get("/{name}/curves")
def curve(name: str, metric: str, x: str = Query("step", pattern="^(step|samples)$"), seeds: bool = False,
          ctx: Context = Depends(context)) -> dict:
    data = compare.load_ablation(ctx.store, ctx.catalog, name)
    return curves.curves(ctx.store, data, metric, x, seeds, ctx.settings.curve_points)


@router.get("/{name}/export.{fmt}", response_class=PlainTextResponse)
def export_table(name: str, fmt: str, query: CompareQuery = Depends(), ctx: Context = Depends(context)):
    if fmt not in export.FORMATS:
        raise ValueError(f"format must be one of {sorted(export.FORMATS)}, got {fmt!r}")
    _, table = _table(name, query, ctx)
    filename = f"{name}-{query.summary}.{fmt}"
    return PlainTextResponse(export.export(table, fmt), media_type=export.FORMATS[fmt],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})
