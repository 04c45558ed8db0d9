"""GET /health and GET /metrics: open to operators without the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import engine_unavailable
from ..errors import error_responses

router = APIRouter()


@router.get("/health", responses=error_responses(503))
async def health(request: Request) -> dict[str, str]:
    """200 when requests can run; 503 while the model loads or once the engine is dead."""
    error = engine_unavailable(request.app.state)
    if error is not None:
        raise error
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition",
        }
    },
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
