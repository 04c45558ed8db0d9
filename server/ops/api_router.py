"""GET /health and GET /metrics: open to operators without the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ..errors import error_response

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.engine
    if engine is None:
        return error_response(503, "the model is still loading", code="not_ready")
    if engine.dead:
        return error_response(503, "the engine has stopped", code="engine_dead")
    return {"status": "ok"}


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
