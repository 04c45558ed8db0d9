"""The DualFocus engine: the EngineClient (engine/protocol.py) over one in-process vLLM AsyncLLM.

`DualFocusEngine.answer()` runs one request: the DualFocus program (engine/program.py)
or one plain pass, on the pass runner (engine/runner.py); many run at once and vLLM's
continuous batching mixes their passes. Failures come out as engine/errors.py's
exceptions, never vLLM's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from .config import EngineConfig
from .families import FamilyAdapter, make_adapter
from .gate import ZoomGate
from .image_work import ImageWorkers
from .program import run_dualfocus, run_single_pass
from .protocol import EngineCounters, ModelInfo
from .query import Query
from .runner import PassRunner
from .trace import OnText, Result

log = logging.getLogger(__name__)


class DualFocusEngine:
    def __init__(self, llm: Any, adapter: FamilyAdapter, config: EngineConfig):
        self.adapter = adapter
        self.config = config
        self.runner = PassRunner(llm, adapter.box_regex, config.box_max_tokens, config.data_parallel_size)
        # Decoding, padding, cropping and hashing images, off the event loop that drives every stream.
        self.image_workers = ImageWorkers(config.image_threads)
        self.model_info = ModelInfo(
            model=llm.model_config.model, family=adapter.name, max_model_len=llm.model_config.max_model_len
        )

    @classmethod
    def create(cls, config: EngineConfig) -> DualFocusEngine:
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(config.engine_args())
        model_config = llm.model_config
        adapter = make_adapter(
            config.family,
            model_config.hf_config.model_type,
            llm.tokenizer,
            dict(model_config.hf_image_processor_config or {}),
        )
        log.info("engine ready: model=%s family=%s", model_config.model, adapter.name)
        return cls(llm, adapter, config)

    @property
    def llm(self) -> Any:
        """vLLM's AsyncLLM (None once shut down)."""
        return self.runner.llm

    @property
    def dead(self) -> bool:
        """Shut down, or vLLM's engine core died: nothing more will be served."""
        return self.runner.dead

    def counters(self) -> EngineCounters:
        return EngineCounters(retries=self.runner.retries, scoring_recomputes=self.runner.scoring_recomputes)

    @property
    def num_unfinished_sequences(self) -> int:
        """Sequences vLLM is still tracking (running or waiting) for any request."""
        return self.runner.llm.output_processor.get_num_unfinished_requests()

    async def warm_up(self) -> None:
        """Run each kind of pass once, so the first user request does not pay one-time
        costs (the first prompt-logprob pass took seconds on CPU)."""
        ids = self.adapter.prompt(self.adapter.conversation_prefix([], 0), "warm up")
        await self.runner.score(ids, [], ids[-2:], f"warmup-{uuid.uuid4().hex}")

    def zoom_gate(self, query: Query) -> ZoomGate:
        """Mode auto's gate: the request's own thresholds where it set them, else the engine's."""
        c = self.config
        return ZoomGate(
            threshold=c.zoom_threshold if query.zoom_threshold is None else query.zoom_threshold,
            choice_threshold=c.zoom_threshold_choice
            if query.zoom_threshold_choice is None
            else query.zoom_threshold_choice,
            max_box_area=c.zoom_max_box_area,
            early_box=c.zoom_early_box,
        )

    def shutdown(self) -> None:
        self.image_workers.shutdown()
        self.runner.shutdown()

    async def answer(
        self,
        query: Query,
        request_id: str | None = None,
        on_text: OnText | None = None,
        started: asyncio.Event | None = None,
    ) -> Result:
        """Run one request to its answer and trace. Cancel the task to abort all its passes.

        `on_text` receives the answer's text so far (and its token logprobs, if asked for)
        while it is generated; only a single-pass request knows its answer before the end
        (DualFocus decides at fusion; mode auto at its zoom gate, then at fusion if it zoomed).
        `started` is set when the engine has begun the request (its first pass's prompt is in).
        """
        request_id = request_id or uuid.uuid4().hex
        started = started or asyncio.Event()
        self.runner.pin_replica()
        if query.runs_as == "dualfocus":
            return await run_dualfocus(self.runner, self.adapter, self.image_workers, query, request_id, started)
        if query.runs_as == "auto":
            return await run_dualfocus(
                self.runner, self.adapter, self.image_workers, query, request_id, started, self.zoom_gate(query)
            )
        return await run_single_pass(self.runner, self.adapter, self.image_workers, query, request_id, started, on_text)
