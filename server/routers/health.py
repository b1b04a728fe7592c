"""Public probes: /health (liveness), /ready (model loaded and store reachable), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import error_body
from server.store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request):
    rt = getattr(request.app.state, "runtime", None)
    if rt is not None and not rt.core.alive:
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/ready")
async def ready(request: Request):
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse(error_body(503, "Loading model", "loading"), status_code=503)
    try:
        await rt.store.ping()
    except StoreUnavailable as e:
        return JSONResponse(error_body(503, str(e), "store_unavailable"), status_code=503,
                            headers={"Retry-After": str(e.retry_after_s)})
    if not rt.core.alive:
        return JSONResponse(error_body(503, "the engine process has stopped", "engine_dead"), status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    rt.metrics.snapshot_cache_bytes.set(rt.store.cached_bytes)
    body = generate_latest(rt.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
