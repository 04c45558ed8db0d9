"""The FastAPI app: factory, lifespan that owns the engine, routers per resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid

from fastapi import FastAPI, Request

from engine import DualFocusEngine

from .chat_completions.api_router import router as chat_router
from .errors import error_response, install_error_handlers
from .models.api_router import router as models_router
from .ops.api_router import router as ops_router
from .settings import ServerSettings

log = logging.getLogger("dualfocus.server")


def create_app(settings: ServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health can answer 503 while the model loads.
        loading = asyncio.create_task(_load_engine(app, settings))
        try:
            yield
        finally:
            loading.cancel()
            engine = app.state.engine
            if engine is not None:
                await _drain(app, settings.drain_seconds)
                engine.shutdown()

    app = FastAPI(title="DualFocus Serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.inflight = 0
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id_and_body_limit(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            response = error_response(413, f"request body is larger than {settings.max_body_bytes} bytes")
        else:
            response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id
        return response

    app.include_router(chat_router)
    app.include_router(models_router)
    app.include_router(ops_router)
    return app


async def _load_engine(app: FastAPI, settings: ServerSettings) -> None:
    try:
        engine = await asyncio.to_thread(DualFocusEngine.create, settings.engine)
        await engine.warm_up()
    except Exception:
        # Nothing to serve: exit non-zero at once so a supervisor restarts or reports it.
        log.exception("the engine failed to start")
        os._exit(1)
    app.state.engine = engine
    log.info("ready: serving %s", settings.model_name)


async def _drain(app: FastAPI, seconds: float) -> None:
    """Let in-flight requests finish (bounded) before the engine goes away."""
    for _ in range(int(seconds * 10)):
        if app.state.inflight == 0:
            return
        await asyncio.sleep(0.1)
    log.warning("drain: %d request(s) still in flight after %.0f s", app.state.inflight, seconds)


def serve(settings: ServerSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=int(settings.drain_seconds) + 5)
