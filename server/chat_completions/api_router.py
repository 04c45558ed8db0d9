"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from openai.types.chat import ChatCompletion

from ..deps import admit, ready_engine, require_api_key, settings
from ..errors import APIError, error_responses
from .protocol import ChatCompletionRequest
from .serving import ChatCompletionsService, to_query

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post(
    "/v1/chat/completions", dependencies=[Depends(admit)],
    responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "the completion, or with stream=true its chunks as server-sent events"},
               **error_responses(400, 401, 404, 413, 429, 500, 503)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, engine=Depends(ready_engine),
                                 settings=Depends(settings)):
    arrived = time.perf_counter()
    # Decoding may fetch an image: that too stops if the client goes away.
    query = await _cancel_on_disconnect(request, to_query(body, settings, engine.max_model_len))
    service = ChatCompletionsService(engine, settings)
    request_id = request.state.request_id
    if body.stream:
        return StreamingResponse(service.stream(body, query, request_id, arrived), media_type="text/event-stream")
    return await _cancel_on_disconnect(request, service.complete(body, query, request_id))


async def _cancel_on_disconnect(request: Request, coro):
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

