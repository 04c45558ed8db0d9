"""The DualFocus engine: one in-process vLLM AsyncLLM, and the passes a request submits to it.

`DualFocusEngine.answer()` runs one request (engine/program.py says what it does);
many run at once and vLLM's continuous batching mixes their passes. Every pass
is an ordinary vLLM request, so cancelling the calling task aborts it in vLLM.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from PIL import Image

from .config import EngineConfig
from .families import FamilyAdapter, make_adapter
from .trace import Mode, Result, StageStats

log = logging.getLogger(__name__)

# vLLM's priority scheduling serves lower values first: passes of a request that has
# started (macro, micro, scoring) go ahead of the first pass of a new request.
PRIORITY_STARTED = 0
PRIORITY_NEW = 1

# With vLLM data parallelism, the engine replica every pass of the current request goes to:
# the follow-up passes reuse the first pass's KV cache only on the same replica, and vLLM's
# load balancer would place each pass on its own. Set per request in answer(); the tasks a
# request starts inherit it.
_DATA_PARALLEL_RANK: ContextVar[int | None] = ContextVar("data_parallel_rank", default=None)


@dataclass
class Sampling:
    """The request's sampling parameters; they apply to the answer passes (the box is greedy)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Query:
    question: str
    image: Image.Image | None = None
    mode: Mode = "dualfocus"
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class ModelImage:
    """An image as the model sees it, with a content id computed once per request.

    vLLM keys its prefix and processor caches by each image's hash; given the id it
    skips hashing the pixels again in every pass (a DualFocus request sends the
    full image in five passes), and the same image still gets the same id."""

    image: Image.Image
    uuid: str

    @classmethod
    def of(cls, image: Image.Image) -> "ModelImage":
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{image.mode}{image.size}".encode())
        return cls(image, digest.hexdigest())


@dataclass
class PassOutput:
    """One finished engine sequence."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    cached_tokens: int
    ms: float
    prompt_logprobs: list | None = None

    def stats(self) -> StageStats:
        return StageStats(self.ms, len(self.prompt_token_ids), self.cached_tokens, len(self.token_ids))


class DualFocusEngine:
    def __init__(self, llm, adapter: FamilyAdapter, config: EngineConfig):
        self.llm = llm
        self.adapter = adapter
        self.config = config
        # Passes that re-ran their prompt because the prefix cache already held the
        # candidate tokens being scored (see score()).
        self.scoring_recomputes = 0
        # Passes run a second time after vLLM failed them with a retryable error.
        self.retries = 0
        self._next_rank = itertools.cycle(range(config.data_parallel_size))

    @classmethod
    def create(cls, config: EngineConfig) -> "DualFocusEngine":
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(config.engine_args())
        model_config = llm.model_config
        adapter = make_adapter(config.family, model_config.hf_config.model_type, llm.tokenizer,
                               dict(model_config.hf_image_processor_config or {}))
        log.info("engine ready: model=%s family=%s", model_config.model, adapter.name)
        return cls(llm, adapter, config)

    @property
    def max_model_len(self) -> int:
        return self.llm.model_config.max_model_len

    @property
    def num_unfinished_sequences(self) -> int:
        """Sequences vLLM is still tracking (running or waiting) for any request."""
        return self.llm.output_processor.get_num_unfinished_requests()

    async def warm_up(self) -> None:
        """Run each kind of pass once, so the first user request does not pay one-time
        costs (the first prompt-logprob pass took seconds on CPU)."""
        ids = self.adapter.macro_prompt("warm up", with_image=False)
        await self.score(ids, [], ids[-2:], f"warmup-{uuid.uuid4().hex}")

    @property
    def dead(self) -> bool:
        """Shut down, or vLLM's engine core died: nothing more will be served."""
        return self.llm is None or self.llm.errored

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # Dropping the last reference now lets AsyncLLM's finaliser run while the
            # interpreter is whole (at exit it fails noisily).
            del llm

    async def answer(self, query: Query, request_id: str | None = None,
                     on_text: Callable[[str], None] | None = None,
                     started: asyncio.Event | None = None) -> Result:
        """Run one request to its answer and trace. Cancel the task to abort all its passes.

        `on_text` receives the answer's text so far while it is generated; only a
        single-pass request knows its answer before the end (DualFocus decides at fusion).
        `started` is set when the engine has begun the request (its first pass's prompt is in).
        """
        from .program import run_dualfocus, run_single_pass

        request_id = request_id or uuid.uuid4().hex
        started = started or asyncio.Event()
        if self.config.data_parallel_size > 1:
            _DATA_PARALLEL_RANK.set(next(self._next_rank))  # this task's context only
        if query.image is not None and query.mode == "dualfocus":
            return await run_dualfocus(self, query, request_id, started)
        return await run_single_pass(self, query, request_id, started, on_text)

    # --- passes -----------------------------------------------------------------------------

    def answer_params(self, s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              seed=s.seed, stop=s.stop or None)

    def box_params(self):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(max_tokens=self.config.box_max_tokens, temperature=0.0,
                              structured_outputs=StructuredOutputsParams(regex=self.adapter.box_regex))

    async def generate(self, prompt_ids: list[int], images: list[ModelImage], params, request_id: str,
                       priority: int, started: asyncio.Event | None = None,
                       on_text: Callable[[str], None] | None = None) -> PassOutput:
        """Run one sequence to completion. `started` is set when its first token arrives,
        that is, when its prompt is in the KV cache for others to reuse; `on_text` gets
        the text so far at every step.

        vLLM ends a sequence with finish_reason "error" for a request-level failure it
        documents as retryable (a KV-load failure, a multimodal cache miss: its engine
        drops the stale entry so a resend carries the data). Such a pass runs once more;
        a second failure is raised. Other failures arrive as exceptions and are not retried.
        """
        from vllm.exceptions import RetryableRequestError

        out = await self._generate_once(prompt_ids, images, params, request_id, priority, started, on_text)
        # Not once text has been streamed: a second attempt could say something else.
        if out.finish_reason == "error" and not (on_text is not None and out.text):
            self.retries += 1
            log.warning("pass %s failed in the engine; retrying once", request_id)
            out = await self._generate_once(prompt_ids, images, params, request_id + "-retry", priority,
                                            started, on_text)
        if out.finish_reason == "error":
            raise RetryableRequestError("the engine failed this request twice; please retry")
        return out

    async def _generate_once(self, prompt_ids: list[int], images: list[ModelImage], params, request_id: str,
                             priority: int, started: asyncio.Event | None,
                             on_text: Callable[[str], None] | None) -> PassOutput:
        from vllm.sampling_params import RequestOutputKind

        prompt = {"prompt_token_ids": prompt_ids}
        if images:
            prompt["multi_modal_data"] = {"image": [i.image for i in images]}
            prompt["multi_modal_uuids"] = {"image": [i.uuid for i in images]}
        streamed = started is not None or on_text is not None
        params.output_kind = RequestOutputKind.CUMULATIVE if streamed else RequestOutputKind.FINAL_ONLY
        t0 = time.perf_counter()
        final = None
        async for out in self.llm.generate(prompt, params, request_id, priority=priority,
                                           data_parallel_rank=_DATA_PARALLEL_RANK.get()):
            final = out
            if started is not None:
                started.set()
            if on_text is not None:
                on_text(out.outputs[0].text)
        completion = final.outputs[0]
        return PassOutput(
            prompt_token_ids=list(final.prompt_token_ids),
            token_ids=list(completion.token_ids),
            text=completion.text,
            finish_reason=completion.finish_reason,
            cached_tokens=final.num_cached_tokens or 0,
            ms=(time.perf_counter() - t0) * 1000,
            prompt_logprobs=final.prompt_logprobs,
        )

    async def score(self, prefix_ids: list[int], images: list[ModelImage], reply_ids: list[int],
                    request_id: str) -> tuple[float, StageStats]:
        """Mean negative log-likelihood of `reply_ids` as the reply after `prefix_ids`.

        One prefill with prompt logprobs that reads the prefix cache, so the shared
        prefix (both images) is not recomputed. vLLM skips cache reads for prompt
        logprobs by default because rows of cached positions are not computed; we
        only need the reply's rows, and detokenize=False keeps vLLM from decoding
        the uncomputed ones (which crashed on this build). If the cache held even
        the reply's positions (the same candidate scored before), the rows we need
        were not computed either: then the prompt runs again without cache reads.
        """
        if not reply_ids:
            raise ValueError("an empty reply cannot be scored")
        out = await self.generate(prefix_ids + reply_ids, images, self._scoring_params(read_cache=True),
                                  request_id, PRIORITY_STARTED)
        stats = out.stats()
        first = len(out.prompt_token_ids) - len(reply_ids)  # position of the reply's first token
        # The logprob of token p comes from position p - 1, computed only if not cached.
        if out.cached_tokens > first - 1:
            self.scoring_recomputes += 1
            out = await self.generate(prefix_ids + reply_ids, images, self._scoring_params(read_cache=False),
                                      request_id + "-nocache", PRIORITY_STARTED)
            stats = stats + out.stats()
        rows = out.prompt_logprobs[first:]
        nll = -sum(row[tok].logprob for row, tok in zip(rows, reply_ids)) / len(reply_ids)
        return (nll if math.isfinite(nll) else float("inf")), stats

    def _scoring_params(self, read_cache: bool):
        from vllm import SamplingParams

        # flat_logprobs: vLLM builds a row per prompt position (over a thousand here); flat
        # lists instead of a dict per row cut that cost in the front end by half or more.
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                              skip_reading_prefix_cache=not read_cache, flat_logprobs=True)
