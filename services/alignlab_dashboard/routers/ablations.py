"""/api/ablations: the overview, one ablation's grid, its compare table, curves and exports."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, Response

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
    plan = tuple((p.arm, p.seed) for p in data.plans) + ((data.spec.baseline_arm,) if data.spec else ())
    key = ("table", name, tuple(metrics), query.summary, query.at, query.baseline, plan)
    return data, key, ctx.store.memo(key, data.runs, lambda: compare.compare_table(
        ctx.store, data, metrics, query.summary, query.at, query.baseline))


def _json(payload) -> bytes:
    """Serialised once and cached as bytes: FastAPI's encoder walks every float of a curve on each request."""
    return json.dumps(payload, allow_nan=False).encode()


@router.get("/{name}/compare")
def compare_view(name: str, query: CompareQuery = Depends(), ctx: Context = Depends(context)) -> Response:
    data, key, table = _table(name, query, ctx)
    return Response(ctx.store.memo(key + ("json",), data.runs, lambda: _json(compare_payload(data, table, query))),
                    media_type="application/json")


@router.get("/{name}/curves")
def curve(name: str, metric: str, x: str = Query("step", pattern="^(step|samples)$"), seeds: bool = False,
          ctx: Context = Depends(context)) -> Response:
    data = compare.load_ablation(ctx.store, ctx.catalog, name)
    body = ctx.store.memo(("curves", name, metric, x, seeds), data.runs, lambda: _json(curves.curves(
        ctx.store, data, metric, x, seeds, ctx.settings.curve_points)))
    return Response(body, media_type="application/json")


@router.get("/{name}/export.{fmt}", response_class=PlainTextResponse)
def export_table(name: str, fmt: str, query: CompareQuery = Depends(), ctx: Context = Depends(context)):
    if fmt not in export.FORMATS:
        raise ValueError(f"format must be one of {sorted(export.FORMATS)}, got {fmt!r}")
    _, _, table = _table(name, query, ctx)
    filename = f"{name}-{query.summary}.{fmt}"
    return PlainTextResponse(export.export(table, fmt), media_type=export.FORMATS[fmt],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})
