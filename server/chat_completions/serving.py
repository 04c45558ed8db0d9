"""Chat completions: decode the request into an engine Query, run it, encode OpenAI's response.

Nothing here knows how DualFocus works; it maps OpenAI's schema to engine.Query
and engine.Result back to OpenAI's schema (with the trace when asked for).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.completion_usage import CompletionUsage, PromptTokensDetails

from engine import DualFocusEngine, Query, Result, Sampling

from .. import metrics
from ..errors import APIError, as_api_error
from ..images import load_image
from ..settings import ServerSettings
from .protocol import ChatCompletionRequest, ImagePart, TextPart

log = logging.getLogger("dualfocus.requests")


async def to_query(req: ChatCompletionRequest, settings: ServerSettings, max_model_len: int) -> Query:
    """Decode: one user turn (text and at most the allowed number of images) -> Query."""
    if req.model != settings.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")
    if len(req.messages) != 1 or req.messages[0].role != "user":
        raise APIError(400, "only single-turn requests are supported: send exactly one user message "
                            "(no system or earlier turns)", param="messages")
    content = req.messages[0].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else (content or [])
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
    if len(images) > settings.max_images_per_request:
        raise APIError(400, f"at most {settings.max_images_per_request} image(s) per request, got {len(images)}",
                       param="messages")
    question = "\n".join(texts).strip()
    if not question:
        raise APIError(400, "the user message has no text", param="messages")
    image = await load_image(images[0], settings) if images else None
    max_tokens = req.max_completion_tokens or req.max_tokens or min(512, max_model_len)
    if max_tokens >= max_model_len:
        raise APIError(400, f"max_tokens={max_tokens} does not fit the model's context length of {max_model_len} "
                            "tokens with any prompt", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature or 0.0, top_p=req.top_p,
                        seed=req.seed, stop=stop)
    return Query(question, image, mode=req.dualfocus.mode, sampling=sampling)


def _usage(result: Result) -> CompletionUsage:
    u = result.usage
    return CompletionUsage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                           total_tokens=u.prompt_tokens + u.completion_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens))


def _trace(req: ChatCompletionRequest, result: Result) -> dict | None:
    if not req.dualfocus.return_trace:
        return None
    t = result.trace
    return {
        "mode": t.mode, "chosen": t.chosen, "why": t.why, "macro_answer": t.macro_answer,
        "micro_answer": t.micro_answer,
        "box": None if t.box is None else {"text": t.box.text, "normalized": t.box.normalized,
                                           "pixels": t.box.pixels, "outcome": t.box.outcome},
        "crop": None if t.crop is None else {"width": t.crop.width, "height": t.crop.height, "rect": t.crop.rect},
        "scores": t.scores,
        "stages": {name: {"ms": round(s.ms, 3), "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens}
                   for name, s in t.stages.items()},
    }


class ChatCompletionsService:
    def __init__(self, engine: DualFocusEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings

    async def complete(self, req: ChatCompletionRequest, query: Query, request_id: str) -> ChatCompletion:
        result = await self._run(query, request_id)
        response = ChatCompletion(
            id=f"chatcmpl-{request_id}", object="chat.completion", created=int(time.time()), model=req.model,
            choices=[Choice(index=0, finish_reason=_finish(result),
                            message=ChatCompletionMessage(role="assistant", content=result.answer))],
            usage=_usage(result),
        )
        trace = _trace(req, result)
        if trace is not None:
            response.dualfocus = trace  # extra field; the SDK exposes it as response.dualfocus
        return response

    async def stream(self, req: ChatCompletionRequest, query: Query, request_id: str,
                     arrived: float) -> AsyncIterator[str]:
        """SSE lines. Macro mode streams text as generated; a DualFocus answer is known only
        after fusion, so it is sent in one chunk as soon as it is chosen."""
        base = dict(id=f"chatcmpl-{request_id}", object="chat.completion.chunk", created=int(time.time()),
                    model=req.model)
        updates: asyncio.Queue[str] = asyncio.Queue()
        sent = ""

        def on_text(text: str) -> None:
            updates.put_nowait(text)

        task = asyncio.create_task(self._run(query, request_id, on_text))
        try:
            yield _sse(ChatCompletionChunk(**base, choices=[ChunkChoice(index=0, delta=ChoiceDelta(role="assistant",
                                                                                                   content=""))]))
            first = True
            while not (task.done() and updates.empty()):
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                text = getter.result()
                if len(text) > len(sent):
                    if first:
                        metrics.TTFT.observe(time.perf_counter() - arrived)
                        first = False
                    yield _sse(ChatCompletionChunk(**base, choices=[ChunkChoice(
                        index=0, delta=ChoiceDelta(content=text[len(sent):]))]))
                    sent = text
            try:
                result = task.result()
            except Exception as e:  # the response has started: the error goes in the stream, as OpenAI's does
                yield f"data: {json.dumps(as_api_error(e).body())}\n\n"
                return
            rest = result.answer[len(sent):] if result.answer.startswith(sent) else result.answer
            if rest:
                if first:
                    metrics.TTFT.observe(time.perf_counter() - arrived)
                yield _sse(ChatCompletionChunk(**base, choices=[ChunkChoice(index=0, delta=ChoiceDelta(content=rest))]))
            last = ChatCompletionChunk(**base, choices=[ChunkChoice(index=0, delta=ChoiceDelta(),
                                                                    finish_reason=_finish(result))])
            trace = _trace(req, result)
            if trace is not None:
                last.dualfocus = trace
            yield _sse(last)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(ChatCompletionChunk(**base, choices=[], usage=_usage(result)))
            yield "data: [DONE]\n\n"
        finally:
            # The client went away (or the stream failed): abort every pass of the request.
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self, query: Query, request_id: str, on_text=None) -> Result:
        mode = query.mode if query.image is not None else "macro"
        t0 = time.perf_counter()
        status = "error"
        # Queued until the engine starts the request's first pass.
        started = asyncio.Event()
        metrics.QUEUE_DEPTH.inc()
        waiting = asyncio.create_task(started.wait())
        waiting.add_done_callback(lambda _: metrics.QUEUE_DEPTH.dec())
        try:
            result = await self.engine.answer(query, request_id, on_text=on_text, started=started)
            status = "ok"
            metrics.record_result(result)
            return result
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            waiting.cancel()
            seconds = time.perf_counter() - t0
            metrics.REQUESTS.labels(mode, status).inc()
            metrics.REQUEST_SECONDS.labels(mode).observe(seconds)
            log.info("%s request %s in %.0f ms", mode, status, seconds * 1000)


def _finish(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {json.dumps(chunk.model_dump(exclude_unset=True, exclude_none=False))}\n\n"
