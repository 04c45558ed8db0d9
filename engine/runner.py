"""The pass runner: one in-process vLLM AsyncLLM, and the passes a request submits to it.

A pass is one ordinary vLLM request (a prompt as token ids, its images, sampling
parameters), so vLLM's continuous batching mixes the passes of every request in flight
and cancelling the calling task aborts it in vLLM. The DualFocus program
(engine/program.py) decides which passes a request runs; this module knows vLLM, and
turns vLLM's exceptions into the engine's own (engine/errors.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .errors import (
    EngineDeadError,
    EngineError,
    GenerationFailedError,
    InvalidRequestError,
    RequestRefusedError,
    RetryableEngineError,
)
from .query import Sampling
from .trace import OnText, StageStats, TokenLogprob

log = logging.getLogger(__name__)

# vLLM's priority scheduling serves lower values first: passes of a request that has
# started (macro, micro, scoring) go ahead of the first pass of a new request.
PRIORITY_STARTED = 0
PRIORITY_NEW = 1

# With vLLM data parallelism, the engine replica every pass of the current request goes to:
# the follow-up passes reuse the first pass's KV cache only on the same replica, and vLLM's
# load balancer would place each pass on its own. Set per request (PassRunner.pin_replica);
# the tasks a request starts inherit it.
_DATA_PARALLEL_RANK: ContextVar[int | None] = ContextVar("data_parallel_rank", default=None)

_HASH_STRIP_ROWS = 64


@dataclass(frozen=True)
class ModelImage:
    """An image as the model sees it, with a content id computed once per request.

    vLLM keys its prefix and processor caches by each image's hash; given the id it
    skips hashing the pixels again in every pass (a DualFocus request sends the
    full image in five passes), and the same image still gets the same id."""

    image: Image.Image
    uuid: str

    @classmethod
    def derived(cls, image: Image.Image, source_id: str, how: str) -> ModelImage:
        """`image` made from the file `source_id` identifies, in a way `how` names (family, crop):
        the same file made the same way is the same image, without hashing its pixels."""
        digest = hashlib.blake2b(f"{source_id}|{how}|{image.mode}{image.size}".encode(), digest_size=16)
        return cls(image, digest.hexdigest())

    @classmethod
    def of(cls, image: Image.Image) -> ModelImage:
        # The pixels in strips of rows, the same bytes as image.tobytes() in one: no transient
        # copy of the whole image (140 MB for a padded 35-megapixel photo), and faster.
        digest = hashlib.blake2b(digest_size=16)
        width, height = image.size
        for top in range(0, height, _HASH_STRIP_ROWS):
            digest.update(image.crop((0, top, width, min(height, top + _HASH_STRIP_ROWS))).tobytes())
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
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when asked for

    def stats(self) -> StageStats:
        return StageStats(self.ms, len(self.prompt_token_ids), self.cached_tokens, len(self.token_ids))


class PassRunner:
    """Runs passes on one vLLM AsyncLLM. `box_max_tokens` and `box_regex` shape box passes."""

    def __init__(self, llm: Any, box_regex: str, box_max_tokens: int, data_parallel_size: int = 1):
        self.llm = llm
        self.box_regex = box_regex
        self.box_max_tokens = box_max_tokens
        self.data_parallel_size = data_parallel_size
        # Passes that re-ran their prompt because the prefix cache already held the
        # candidate tokens being scored (see score()).
        self.scoring_recomputes = 0
        # Passes run a second time after vLLM failed them with a retryable error.
        self.retries = 0
        self._next_rank = itertools.cycle(range(data_parallel_size))

    @property
    def dead(self) -> bool:
        return self.llm is None or bool(self.llm.errored)

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # Dropping the last reference now lets AsyncLLM's finaliser run while the
            # interpreter is whole (at exit it fails noisily).
            del llm

    def pin_replica(self) -> None:
        """Send every pass of the calling task's request to one data-parallel replica."""
        if self.data_parallel_size > 1:
            _DATA_PARALLEL_RANK.set(next(self._next_rank))  # this task's context only

    # --- sampling parameters ----------------------------------------------------------------

    def answer_params(self, s: Sampling, token_logprobs: bool = False, banned: Sequence[int] = ()) -> Any:
        """Fresh parameters for an answer pass (vLLM takes ownership of the ones it is given).
        `token_logprobs`: the sampled tokens' logprobs too (PassOutput.logprobs), even if the
        request did not ask for logprobs (mode auto's gate reads them). `banned`: token ids the
        answer must not contain, whatever the request's logit_bias says."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = None  # compact JSON (EngineConfig.engine_args)
        if s.json_schema is not None:
            structured = StructuredOutputsParams(json=s.json_schema)
        elif s.json_object:
            structured = StructuredOutputsParams(json_object=True)
        try:
            # from_optional: vLLM's own checks and conversions (logit_bias keys sent as text, clamped).
            return SamplingParams.from_optional(
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=s.seed,
                stop=s.stop or None,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                logit_bias={**(s.logit_bias or {}), **{str(t): -100.0 for t in banned}} or None,
                ignore_eos=s.ignore_eos,
                # 0: only the sampled token's logprob; a request's own top-k include it.
                logprobs=0 if token_logprobs and s.logprobs is None else s.logprobs,
                structured_outputs=structured,
            )
        except Exception as e:
            raise engine_error(e) from e

    def box_params(self, regex: str | None = None) -> Any:
        """A box pass: greedy, under the family's box grammar (`regex`; default: the one for any image)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(
            max_tokens=self.box_max_tokens,
            temperature=0.0,
            structured_outputs=StructuredOutputsParams(regex=regex or self.box_regex),
        )

    def _scoring_params(self, read_cache: bool) -> Any:
        from vllm import SamplingParams

        # flat_logprobs: vLLM builds a row per prompt position (over a thousand here); flat
        # lists instead of a dict per row cut that cost in the front end by half or more.
        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            skip_reading_prefix_cache=not read_cache,
            flat_logprobs=True,
        )

    # --- passes -----------------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: list[int],
        images: list[ModelImage],
        params: Any,
        request_id: str,
        priority: int,
        started: asyncio.Event | None = None,
        on_text: OnText | None = None,
    ) -> PassOutput:
        """Run one sequence to completion. `started` is set when its first token arrives,
        that is, when its prompt is in the KV cache for others to reuse; `on_text` gets
        the text so far at every step.

        vLLM ends a sequence with finish_reason "error" for a request-level failure it
        documents as retryable (a KV-load failure, a multimodal cache miss: its engine
        drops the stale entry so a resend carries the data). Such a pass runs once more;
        a second failure is raised. Other failures arrive as exceptions and are not retried.
        """
        out = await self._generate_once(prompt_ids, images, params, request_id, priority, started, on_text)
        # Not once text has been streamed: a second attempt could say something else.
        if out.finish_reason == "error" and not (on_text is not None and out.text):
            self.retries += 1
            log.warning("pass %s failed in the engine; retrying once", request_id)
            out = await self._generate_once(
                prompt_ids, images, params, request_id + "-retry", priority, started, on_text
            )
        if out.finish_reason == "error":
            raise RetryableEngineError("the engine failed this request twice; please retry")
        return out

    async def _generate_once(
        self,
        prompt_ids: list[int],
        images: list[ModelImage],
        params: Any,
        request_id: str,
        priority: int,
        started: asyncio.Event | None,
        on_text: OnText | None,
    ) -> PassOutput:
        from vllm.sampling_params import RequestOutputKind

        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
        if images:
            prompt["multi_modal_data"] = {"image": [i.image for i in images]}
            prompt["multi_modal_uuids"] = {"image": [i.uuid for i in images]}
        if started is None and on_text is None:
            params.output_kind = RequestOutputKind.FINAL_ONLY
        else:  # the pieces as generated, put together here
            params.output_kind = RequestOutputKind.DELTA
            if on_text is None:
                # Only the first output (the prompt is prefilled) and the last are read: vLLM always sends
                # those two, and with this interval none in between (no output built per token).
                params.stream_interval = max(1, params.max_tokens or 1)
        t0 = time.perf_counter()
        final = None
        token_ids: list[int] = []
        text = ""
        prompt_logprobs = None
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        try:
            async for out in self.llm.generate(
                prompt, params, request_id, priority=priority, data_parallel_rank=_DATA_PARALLEL_RANK.get()
            ):
                final = out
                piece = out.outputs[0]
                token_ids += piece.token_ids
                text += piece.text
                prompt_logprobs = prompt_logprobs or out.prompt_logprobs  # DELTA: in the first output only
                if started is not None:
                    started.set()
                if logprobs is not None:  # converted as they arrive
                    logprobs += _token_logprobs(piece, params.logprobs)
                if on_text is not None:
                    on_text(text, logprobs)
        except Exception as e:
            raise engine_error(e) from e
        if final is None:
            raise GenerationFailedError(f"pass {request_id} ended without output")
        completion = final.outputs[0]
        return PassOutput(
            prompt_token_ids=list(final.prompt_token_ids),
            token_ids=token_ids,
            text=text,
            finish_reason=completion.finish_reason,
            cached_tokens=final.num_cached_tokens or 0,
            ms=(time.perf_counter() - t0) * 1000,
            prompt_logprobs=prompt_logprobs,
            logprobs=logprobs,
        )

    async def score(
        self, prefix_ids: list[int], images: list[ModelImage], reply_ids: list[int], request_id: str
    ) -> tuple[float, StageStats]:
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
        out = await self.generate(
            prefix_ids + reply_ids, images, self._scoring_params(read_cache=True), request_id, PRIORITY_STARTED
        )
        stats = out.stats()
        first = len(out.prompt_token_ids) - len(reply_ids)  # position of the reply's first token
        # The logprob of token p comes from position p - 1, computed only if not cached.
        if out.cached_tokens > first - 1:
            self.scoring_recomputes += 1
            out = await self.generate(
                prefix_ids + reply_ids,
                images,
                self._scoring_params(read_cache=False),
                request_id + "-nocache",
                PRIORITY_STARTED,
            )
            stats = stats + out.stats()
        assert out.prompt_logprobs is not None  # asked for with prompt_logprobs=0
        rows = out.prompt_logprobs[first:]
        nll = -sum(row[tok].logprob for row, tok in zip(rows, reply_ids, strict=False)) / len(reply_ids)
        return (nll if math.isfinite(nll) else float("inf")), stats


def _token_logprobs(completion: Any, top: int) -> list[TokenLogprob]:
    """The logprobs of the tokens in this (delta) output; each with the `top` most likely."""
    rows = completion.logprobs or []
    entries = []
    for token_id, row in zip(completion.token_ids, rows, strict=False):
        chosen = row[token_id]
        ranked = sorted((lp for lp in row.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank)
        entries.append(
            TokenLogprob(
                chosen.decoded_token or "",
                chosen.logprob,
                [(lp.decoded_token or "", lp.logprob) for lp in ranked[:top]],
            )
        )
    return entries


def engine_error(e: Exception) -> Exception:
    """vLLM's exception as the engine's own (engine/errors.py); anything else unchanged."""
    from vllm.exceptions import (
        GenerationError,
        GracefulHTTPError,
        RetryableRequestError,
        VLLMClientError,
        VLLMValidationError,
    )
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

    if isinstance(e, EngineError):
        return e
    if isinstance(e, VLLMClientError):
        # vLLM refusing what the client sent (prompt longer than the context, bad parameters).
        param = e.parameter if isinstance(e, VLLMValidationError) else getattr(e, "parameter", None)
        return InvalidRequestError(str(e), param=param)
    if isinstance(e, GracefulHTTPError):  # e.g. vLLM's own queue full (503)
        return RequestRefusedError(str(e), int(e.http_status))
    if isinstance(e, RetryableRequestError):
        return RetryableEngineError(str(e))
    if isinstance(e, GenerationError):
        return GenerationFailedError(str(e))
    if isinstance(e, VLLMEngineDeadError):
        return EngineDeadError("the engine has stopped")
    return e
