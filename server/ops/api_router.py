"""GET /health and GET /metrics: open to operators without the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ..deps import ready_engine
from ..errors import error_responses

router = APIRouter()


@router.get("/health", dependencies=[Depends(ready_engine)],  # 503 while loading or once dead
            responses=error_responses(503))
async def health():
    return {"status": "ok"}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
