"""Request dependencies: authentication, the ready engine, admission under a bounded load."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, Request
from starlette.datastructures import State

from engine import EngineClient

from .errors import APIError
from .metrics import ServerMetrics
from .settings import ServerSettings

# Dependencies are `async def` though none awaits: FastAPI runs a plain `def` dependency on a
# worker thread, a thread hop per dependency per request (docs/performance.md).


async def settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


async def require_api_key(
    request: Request, settings: ServerSettings = Depends(settings), metrics: ServerMetrics = Depends(metrics)
) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    # Constant-time comparison, so response timing does not leak the key.
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
        metrics.rejected.labels("unauthorized").inc()
        raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def engine_unavailable(state: State) -> APIError | None:
    """Why no request can run now (503), or None when the engine is ready."""
    if state.engine_failed:
        return APIError(503, "the engine failed to start", code="engine_dead")
    if state.engine is None:
        return APIError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    if state.engine.dead:
        return APIError(503, "the engine has stopped", code="engine_dead")
    return None


async def ready_engine(request: Request, metrics: ServerMetrics = Depends(metrics)) -> EngineClient:
    error = engine_unavailable(request.app.state)
    if error is not None:
        metrics.rejected.labels(error.code).inc()
        raise error
    return request.app.state.engine


async def admit(
    request: Request, settings: ServerSettings = Depends(settings), metrics: ServerMetrics = Depends(metrics)
) -> AsyncIterator[None]:
    """At most max_inflight_requests at once; beyond that a polite 429."""
    state = request.app.state
    if state.inflight >= settings.max_inflight_requests:
        metrics.rejected.labels("queue_full").inc()
        raise APIError(
            429,
            f"the server is at its limit of {settings.max_inflight_requests} requests in flight",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    state.inflight += 1
    metrics.inflight.set(state.inflight)
    try:
        yield
    finally:
        state.inflight -= 1
        metrics.inflight.set(state.inflight)
