"""Request dependencies: authentication, the ready engine, admission under a bounded load."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, Request

from engine import DualFocusEngine

from . import metrics
from .errors import APIError
from .settings import ServerSettings


def settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def require_api_key(request: Request, settings: ServerSettings = Depends(settings)) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    # Constant-time comparison, so response timing does not leak the key.
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
        raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def ready_engine(request: Request) -> DualFocusEngine:
    state = request.app.state
    if state.engine is None:
        raise APIError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    if state.engine.dead:
        raise APIError(503, "the engine has stopped", code="engine_dead")
    return state.engine


async def admit(request: Request, settings: ServerSettings = Depends(settings)) -> AsyncIterator[None]:
    """At most max_inflight_requests at once; beyond that a polite 429."""
    state = request.app.state
    if state.inflight >= settings.max_inflight_requests:
        raise APIError(429, f"the server is at its limit of {settings.max_inflight_requests} requests in flight",
                       code="queue_full", headers={"Retry-After": "1"})
    state.inflight += 1
    metrics.INFLIGHT.set(state.inflight)
    try:
        yield
    finally:
        state.inflight -= 1
        metrics.INFLIGHT.set(state.inflight)
