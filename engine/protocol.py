"""What a caller (the HTTP server) needs from an engine, and nothing more.

As vLLM's EngineClient sits between its API server and AsyncLLM: the server depends on
this protocol, DualFocusEngine (engine/engine.py) implements it over vLLM, and tests
implement it with a fake to test the HTTP layer without a model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .image_work import ImageWorkers
from .query import Query
from .trace import OnText, Result


@dataclass(frozen=True)
class ModelInfo:
    model: str  # the checkpoint the engine loaded (a path or a hub name)
    family: str  # the adapter's family: llava | qwen2_vl | qwen2_5_vl
    max_model_len: int  # context length in tokens


@dataclass(frozen=True)
class EngineCounters:
    """Counts the engine keeps itself (monotonic; exported as Prometheus counters)."""

    retries: int = 0  # passes run a second time after a retryable engine failure
    scoring_recomputes: int = 0  # scoring passes re-run without cache reads


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def dead(self) -> bool:
        """Shut down, or failed beyond repair: nothing more will be served."""
        ...

    @property
    def image_workers(self) -> ImageWorkers:
        """The threads CPU-heavy image work runs on (decoding, padding, cropping, hashing), off the
        event loop; the server decodes request images on them too."""
        ...

    def counters(self) -> EngineCounters: ...

    async def answer(
        self,
        query: Query,
        request_id: str | None = None,
        on_text: OnText | None = None,
        started: asyncio.Event | None = None,
    ) -> Result:
        """Run one request to its answer and trace; cancel the task to abort it.

        `on_text` receives the answer's text so far while it is generated, with its token
        logprobs if the sampling asks for them (single-pass requests only); `started` is set
        once the engine has begun the request. Failures are raised as engine/errors.py's
        exceptions."""
        ...

    async def warm_up(self) -> None:
        """Pay one-time costs before the first request."""
        ...

    def shutdown(self) -> None: ...
