"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine import EngineClient

from ..deps import admit, metrics, ready_engine, require_api_key, settings
from ..errors import APIError, error_responses
from ..images import ImageRefused
from ..metrics import ServerMetrics
from ..settings import ServerSettings
from .protocol import ChatCompletionRequest, ChatCompletionResponse
from .serving import ChatCompletionsService, to_query

router = APIRouter(dependencies=[Depends(require_api_key)])
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "description": "a chat.completion.chunk as JSON, or [DONE] at the end"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
T = TypeVar("T")


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(admit)],
    response_model=None,
    responses={
        200: {
            "model": ChatCompletionResponse,
            # Before OpenAPI 3.2, an event stream's schema describes each event (what schemathesis checks).
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
            "description": "the completion, or with stream=true its chunks as server-sent events",
        },
        **error_responses(400, 401, 404, 413, 429, 500, 503),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    engine: EngineClient = Depends(ready_engine),
    settings: ServerSettings = Depends(settings),
    metrics: ServerMetrics = Depends(metrics),
) -> JSONResponse | StreamingResponse:
    arrived = time.perf_counter()
    try:
        # Decoding may fetch an image: that too stops if the client goes away.
        query = await _cancel_on_disconnect(request, to_query(body, settings, engine))
    except ImageRefused as e:
        metrics.image_errors.labels(e.reason).inc()
        raise
    service = ChatCompletionsService(engine, metrics)
    request_id = request.state.request_id
    if body.stream:
        return StreamingResponse(service.stream(body, query, request_id, arrived), media_type="text/event-stream")
    response = await _cancel_on_disconnect(request, service.complete(body, query, request_id))
    # The trace only when asked for; OpenAI's own fields always, as the SDK's models have them.
    return JSONResponse(response.model_dump(mode="json", exclude={"dualfocus"} if response.dualfocus is None else None))


async def _cancel_on_disconnect(request: Request, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`; if the client goes away first, cancel it (which aborts its engine passes)."""
    task = asyncio.create_task(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected")
