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
from typing import Any, Literal

from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.completion_usage import CompletionUsage, PromptTokensDetails

from engine import EngineClient, Query, Result, Sampling, TokenLogprob
from engine.trace import OnText

from ..errors import APIError, as_api_error
from ..metrics import ServerMetrics
from ..settings import ServerSettings
from .messages import refuse_unsupported, to_conversation
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChunk,
    DualFocusTrace,
)

log = logging.getLogger("dualfocus.requests")


async def to_query(req: ChatCompletionRequest, settings: ServerSettings, engine: EngineClient) -> Query:
    """Decode: the conversation (chat_completions/messages.py) and the sampling -> Query. Every
    check that needs no pixels runs first, so a refused request costs no image decoding; images
    are decoded on the engine's image workers."""
    max_model_len = engine.model_info.max_model_len
    if req.model != settings.model_name:
        raise APIError(
            404,
            f"model {req.model!r} does not exist; this server serves {settings.model_name!r}",
            param="model",
            code="model_not_found",
        )
    refuse_unsupported(req)
    max_tokens = req.max_completion_tokens or req.max_tokens or min(512, max_model_len)
    if max_tokens >= max_model_len:
        raise APIError(
            400,
            f"max_tokens={max_tokens} does not fit the model's context length of {max_model_len} "
            "tokens with any prompt",
            param="max_tokens",
        )
    options = req.dualfocus
    mode = options.mode or settings.default_mode
    for name in ("zoom_threshold", "zoom_threshold_choice"):
        if getattr(options, name) is not None and mode != "auto":
            raise APIError(
                400,
                f"dualfocus.{name} applies to mode auto only; this request runs in mode {mode}"
                + ("" if options.mode else " (the server's default)"),
                param=f"dualfocus.{name}",
            )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fmt = req.response_format
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=req.temperature or 0.0,
        top_p=req.top_p,
        seed=req.seed,
        stop=stop,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=req.logit_bias,
        ignore_eos=req.ignore_eos,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        json_schema=fmt.json_schema.schema_ if fmt and fmt.type == "json_schema" and fmt.json_schema else None,
        json_object=bool(fmt and fmt.type == "json_object"),
    )
    history, question = await to_conversation(req.messages, settings, engine.image_workers)
    return Query(
        question.text,
        question.images,
        mode=mode,
        sampling=sampling,
        history=history,
        image_ids=question.image_ids,
        zoom_threshold=options.zoom_threshold,
        zoom_threshold_choice=options.zoom_threshold_choice,
    )


def _logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's `logprobs` of a choice (or of a chunk's choice)."""
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e.top],
            }
            for e in entries
        ]
    }


def _usage(result: Result) -> CompletionUsage:
    u = result.usage
    return CompletionUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def _trace(req: ChatCompletionRequest, result: Result) -> DualFocusTrace | None:
    return DualFocusTrace.of(result.trace) if req.dualfocus.return_trace else None


class ChatCompletionsService:
    def __init__(self, engine: EngineClient, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics

    async def complete(self, req: ChatCompletionRequest, query: Query, request_id: str) -> ChatCompletionResponse:
        result = await self._run(query, request_id)
        response = ChatCompletionResponse(
            id=f"chatcmpl-{request_id}",
            object="chat.completion",
            created=int(time.time()),
            model=req.model,
            choices=[
                Choice(
                    index=0,
                    finish_reason=_finish(result),
                    logprobs=_logprobs(result.logprobs),  # type: ignore[arg-type]  # validated into ChoiceLogprobs
                    message=ChatCompletionMessage(role="assistant", content=result.answer),
                )
            ],
            usage=_usage(result),
        )
        response.dualfocus = _trace(req, result)  # the SDK exposes it as response.dualfocus
        return response

    async def stream(
        self, req: ChatCompletionRequest, query: Query, request_id: str, arrived: float
    ) -> AsyncIterator[str]:
        """SSE lines. Macro mode streams text as generated; a DualFocus answer is known only
        after fusion, so it is sent in one chunk as soon as it is chosen."""
        base: dict[str, Any] = dict(
            id=f"chatcmpl-{request_id}", object="chat.completion.chunk", created=int(time.time()), model=req.model
        )
        updates: asyncio.Queue[tuple[str, list[TokenLogprob] | None]] = asyncio.Queue()
        sent, sent_logprobs = "", 0

        def on_text(text: str, logprobs: list[TokenLogprob] | None) -> None:
            updates.put_nowait((text, list(logprobs) if logprobs is not None else None))

        task = asyncio.create_task(self._run(query, request_id, on_text))
        try:
            opening = ChoiceDelta(role="assistant", content="")
            yield _sse(ChatCompletionStreamChunk(**base, choices=[ChunkChoice(index=0, delta=opening)]))
            first = True
            while not (task.done() and updates.empty()):
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                text, logprobs = getter.result()
                if len(text) > len(sent):
                    if first:
                        self.metrics.ttft.observe(time.perf_counter() - arrived)
                        first = False
                    new_logprobs = _logprobs(logprobs[sent_logprobs:] if logprobs is not None else None)
                    delta = ChoiceDelta(content=text[len(sent) :])
                    yield _sse(
                        ChatCompletionStreamChunk(
                            **base,
                            choices=[ChunkChoice(index=0, delta=delta, logprobs=new_logprobs)],  # type: ignore[arg-type]
                        )
                    )
                    sent, sent_logprobs = text, len(logprobs or [])
            try:
                result = task.result()
            except Exception as e:  # the response has started: the error goes in the stream, as OpenAI's does
                yield f"data: {json.dumps(as_api_error(e).body())}\n\n"
                return
            rest = result.answer[len(sent) :] if result.answer.startswith(sent) else result.answer
            rest_logprobs = result.logprobs[sent_logprobs:] if result.logprobs is not None else None
            if rest or rest_logprobs:
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - arrived)
                choice = ChunkChoice(index=0, delta=ChoiceDelta(content=rest), logprobs=_logprobs(rest_logprobs))  # type: ignore[arg-type]
                yield _sse(ChatCompletionStreamChunk(**base, choices=[choice]))
            last = ChatCompletionStreamChunk(
                **base, choices=[ChunkChoice(index=0, delta=ChoiceDelta(), finish_reason=_finish(result))]
            )
            trace = _trace(req, result)
            if trace is not None:  # set only then: _sse leaves unset fields out
                last.dualfocus = trace
            yield _sse(last)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(ChatCompletionStreamChunk(**base, choices=[], usage=_usage(result)))
            yield "data: [DONE]\n\n"
        finally:
            # The client went away (or the stream failed): abort every pass of the request.
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self, query: Query, request_id: str, on_text: OnText | None = None) -> Result:
        mode = query.runs_as
        t0 = time.perf_counter()
        status = "error"
        # Queued until the engine starts the request's first pass.
        started = asyncio.Event()
        self.metrics.queue_depth.inc()
        waiting = asyncio.create_task(started.wait())
        waiting.add_done_callback(lambda _: self.metrics.queue_depth.dec())
        try:
            result = await self.engine.answer(query, request_id, on_text=on_text, started=started)
            status = "ok"
            self.metrics.record_result(result)
            return result
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            waiting.cancel()
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(mode, status).inc()
            self.metrics.request_seconds.labels(mode).observe(seconds)
            log.info("%s request %s in %.0f ms", mode, status, seconds * 1000)


def _finish(result: Result) -> Literal["stop", "length"]:
    return "length" if result.finish_reason == "length" else "stop"


def _sse(chunk: ChatCompletionStreamChunk) -> str:
    # exclude_unset: the trace only where it was set (the last chunk, when asked for).
    return f"data: {json.dumps(chunk.model_dump(exclude_unset=True, exclude_none=False))}\n\n"
