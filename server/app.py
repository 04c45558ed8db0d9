"""The FastAPI app: factory, lifespan that brings up and watches the engine, routers per resource.

The app depends on the engine protocol (engine/protocol.py) only. What to do when the
engine cannot start or dies (exit, so a supervisor restarts the process) is the caller's
policy: `serve()` in server/cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import EngineClient

from .chat_completions.api_router import router as chat_router
from .errors import api_error_response, as_api_error, error_response, install_error_handlers
from .logs import REQUEST_ID
from .metrics import ServerMetrics
from .models.api_router import router as models_router
from .ops.api_router import router as ops_router
from .settings import ServerSettings

log = logging.getLogger("dualfocus.server")

# A ready engine, or a factory that loads one (called in a worker thread: a model load takes
# a while, and /health answers 503 until it returns).
EngineSource = EngineClient | Callable[[], EngineClient]
# Called once when the engine fails to start ("start") or dies later ("died").
EngineFailureHandler = Callable[[Literal["start", "died"]], None]


def create_app(
    settings: ServerSettings, engine: EngineSource, on_engine_failure: EngineFailureHandler | None = None
) -> FastAPI:
    """The app over `engine`. An engine the app built from a factory is shut down with the app;
    one handed in ready belongs to the caller. Without `on_engine_failure`, a failed engine
    leaves the app answering 503."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # In the background, so /health can answer 503 while the model loads.
        engine_task = asyncio.create_task(_run_engine(app, engine, on_engine_failure))
        try:
            yield
        finally:
            engine_task.cancel()
            running: EngineClient | None = app.state.engine
            if running is not None:
                await _drain(app, settings.drain_seconds)
                if running is not engine:
                    running.shutdown()

    app = FastAPI(title="DualFocus Serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None  # set once loaded
    app.state.engine_failed = False  # it failed to start
    app.state.inflight = 0
    app.state.metrics = ServerMetrics(
        settings.max_inflight_requests, lambda: app.state.engine.counters() if app.state.engine is not None else None
    )
    install_error_handlers(app)

    app.add_middleware(RequestIdAndBodyLimit, max_body_bytes=settings.max_body_bytes)
    app.include_router(chat_router)
    app.include_router(models_router)
    app.include_router(ops_router)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]  # FastAPI's documented way
    return app


def _openapi_without_422(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 it lists for every body: validation errors are answered
    400 in OpenAI's shape (errors.py)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


# A client's X-Request-Id is honoured if it looks like an id (it goes into every log line).
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdAndBodyLimit:
    """Gives every request an id (the client's X-Request-Id if sent), echoed in the response
    and set for the request's log lines; refuses bodies over the limit (by Content-Length
    before reading, or while reading a chunked body); and answers any failure that escaped
    the app's handlers with a 500 in OpenAI's shape, still carrying the id.

    Plain ASGI rather than @app.middleware("http"): that wrapper hides the client's
    disconnect from the endpoint, and disconnects must abort the request's passes."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _CLIENT_REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # this request's task only: each request runs in its own
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large()(scope, receive, send_with_id)
        if not length and headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            # No length to check up front: read the body here, up to the limit, and replay it.
            replay = await self._read_bounded(receive)
            if replay is None:
                return await self._too_large()(scope, receive, send_with_id)
            receive = replay
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # what no exception handler answered (they answer all they know)
            if started:
                raise
            await api_error_response(as_api_error(e))(scope, receive, send_with_id)

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body is larger than {self.max_body_bytes} bytes")

    async def _read_bounded(self, receive: Receive) -> Receive | None:
        """Read the body's messages, then a `receive` that replays them; None if over the limit."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left; the app will see it
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay


async def _run_engine(app: FastAPI, source: EngineSource, on_failure: EngineFailureHandler | None) -> None:
    """Load the engine (unless handed a ready one), then watch it for as long as the app runs."""
    if isinstance(source, EngineClient):
        engine = source
    else:
        try:
            engine = await asyncio.to_thread(source)
            await engine.warm_up()
        except Exception:
            log.exception("the engine failed to start")
            app.state.engine_failed = True
            if on_failure is not None:
                on_failure("start")
            return
    app.state.engine = engine
    log.info("ready: serving %s", app.state.settings.model_name)
    while not engine.dead:
        await asyncio.sleep(0.5)
    log.error("the engine has died")
    if on_failure is not None:
        on_failure("died")


async def _drain(app: FastAPI, seconds: float) -> None:
    """Let in-flight requests finish (bounded) before the engine goes away."""
    for _ in range(int(seconds * 10)):
        if app.state.inflight == 0:
            return
        await asyncio.sleep(0.1)
    log.warning("drain: %d request(s) still in flight after %.0f s", app.state.inflight, seconds)
