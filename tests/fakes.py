"""Fakes for the fast tests: an engine that implements the engine protocol (for the HTTP
layer) and a pass runner (for the DualFocus program). Neither loads a model or imports vLLM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from engine import EngineCounters, ModelInfo, Query, Result, Sampling, TokenLogprob
from engine.image_work import ImageWorkers
from engine.runner import PassOutput
from engine.trace import BoxTrace, CropTrace, GateTrace, OnText, StageStats, Trace


def dualfocus_result(answer: str = "a red square") -> Result:
    """A finished DualFocus request in which the micro answer won at fusion."""
    return Result(answer, "stop", Trace(
        mode="dualfocus", chosen="micro", why="the micro answer has the lower perplexity",
        macro_answer="a square", micro_answer=answer,
        box=BoxTrace("[0.10, 0.20, 0.30, 0.40]", (0.1, 0.2, 0.3, 0.4), (64, 96, 192, 192), "ok"),
        crop=CropTrace((39, 55, 217, 233)), scores={"macro": 2.5, "micro": 1.25}, zoomed_image=0,
        stages={"macro": StageStats(10.0, 600, 512, 3), "box": StageStats(8.0, 620, 0, 12),
                "micro": StageStats(12.3456, 1300, 640, 4), "fusion": StageStats(5.0, 2600, 2400, 2)}))


def auto_result(zoomed: bool) -> Result:
    """A finished request in mode auto: zoomed (as dualfocus_result) or the macro answer kept,
    its box pass aborted."""
    if zoomed:
        result = dualfocus_result()
        result.trace.mode = "auto"
        result.trace.gate = GateTrace(True, "unsure", 0.25, 0.5, False, 0.08, 0.5, False)
        return result
    return Result("a square", "stop", Trace(
        mode="auto", chosen="macro", why="no zoom: confident", macro_answer="a square", zoomed_image=0,
        gate=GateTrace(False, "confident", 0.875, 0.5, False, None, 0.5, True),
        stages={"macro": StageStats(10.0, 600, 512, 3)}))


def single_pass_result(answer: str, mode_why: str = "no image: one plain pass") -> Result:
    return Result(answer, "length", Trace(mode="macro", chosen="macro", why=mode_why, macro_answer=answer,
                                          stages={"macro": StageStats(7.0, 40, 0, 5)}))


@dataclass
class FakeEngine:
    """The engine protocol with scripted behaviour. By default a single-pass request streams its
    answer in three steps and a DualFocus request returns dualfocus_result(). Set `behaviour` to
    replace what answer() does (raise, block until cancelled, ...)."""

    model_info: ModelInfo = field(default_factory=lambda: ModelInfo("fake-checkpoint", "llava", 4096))
    dead: bool = False
    retries: int = 0
    scoring_recomputes: int = 0
    behaviour: Callable[[Query], Awaitable[Result]] | None = None
    queries: list[Query] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # request ids whose answer() was cancelled
    warmed_up: bool = False
    shut_down: bool = False
    image_workers: ImageWorkers = field(default_factory=lambda: ImageWorkers(1))

    def counters(self) -> EngineCounters:
        return EngineCounters(retries=self.retries, scoring_recomputes=self.scoring_recomputes)

    async def answer(self, query: Query, request_id: str | None = None,
                     on_text: OnText | None = None,
                     started: asyncio.Event | None = None) -> Result:
        self.queries.append(query)
        self.request_ids.append(request_id or "")
        try:
            if started is not None:
                started.set()
            if self.behaviour is not None:
                return await self.behaviour(query)
            if query.runs_as == "dualfocus":
                return dualfocus_result()
            if query.runs_as == "auto":
                return auto_result(zoomed=False)
            answer = "Hello there"
            for end in (3, 7, len(answer)):
                await asyncio.sleep(0)
                if on_text is not None:
                    on_text(answer[:end], None)
            return single_pass_result(answer)
        except asyncio.CancelledError:
            self.cancelled.append(request_id or "")
            raise

    async def warm_up(self) -> None:
        self.warmed_up = True

    def shutdown(self) -> None:
        self.image_workers.shutdown()
        self.shut_down = True


async def blocked_forever(query: Query) -> Result:
    """An answer() behaviour that never finishes on its own (a request still running)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class CharTokenizer:
    """A tokenizer for adapters under test: one id per character, <image> as one special token."""

    bos_token_id, eos_token_id, image_id = 1, 2, 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text == "<image>":
            return [self.image_id]
        return [ord(c) + 10 for c in text]


@dataclass
class Pass:
    """A pass the fake runner ran: what the program asked for."""

    kind: str  # box | macro | micro | score-macro | score-micro
    prompt_ids: list[int]
    image_sizes: list[tuple[int, int]]
    params: object


# The logprob the fake runner gives a stop token: far from any scripted token's, so a confidence
# that counted it would show.
STOP_LOGPROB = -9.0


class FakeRunner:
    """The pass runner's interface (engine/runner.py), answering from a script: `replies` maps a
    pass kind (box, macro, micro) to its text, or to an exception to raise; `nll` maps a scored
    candidate (macro, micro) to its score. `hold` names passes that wait until cancelled; `delay`
    maps a pass kind to seconds it takes. `token_logprob` maps an answer pass kind to the logprob
    of each of its reply's tokens (default 0), given when the pass asks for logprobs; the stop
    token gets STOP_LOGPROB."""

    def __init__(self, replies: dict[str, str | Exception], nll: dict[str, float] | None = None,
                 hold: tuple[str, ...] = (), delay: dict[str, float] | None = None,
                 token_logprob: dict[str, float] | None = None):
        self.replies, self.nll, self.hold = replies, nll or {}, hold
        self.delay, self.token_logprob = delay or {}, token_logprob or {}
        self.passes: list[Pass] = []
        self.scored: dict[str, list[int]] = {}  # candidate -> the reply ids scored
        self.cancelled: list[str] = []

    def answer_params(self, sampling: Sampling, token_logprobs: bool = False, banned: Sequence[int] = ()) -> object:
        return ("answer", sampling, token_logprobs, tuple(banned))

    def box_params(self, regex: str | None = None) -> object:
        return ("box", regex)

    async def generate(self, prompt_ids: list[int], images: list, params: object, request_id: str, priority: int,
                       started: asyncio.Event | None = None,
                       on_text: OnText | None = None) -> PassOutput:
        kind = request_id.rsplit("-", 1)[-1]
        self.passes.append(Pass(kind, prompt_ids, [i.image.size for i in images], params))
        try:
            await asyncio.sleep(0)
            if started is not None:
                started.set()
            if kind in self.hold:
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay.get(kind, 0))
            reply = self.replies[kind]
            if isinstance(reply, Exception):
                raise reply
        except asyncio.CancelledError:
            self.cancelled.append(kind)
            raise
        ids = [ord(c) + 10 for c in reply] + [CharTokenizer.eos_token_id]
        logprobs = None
        if isinstance(params, tuple) and params[0] == "answer" and (params[2] or params[1].logprobs is not None):
            logprob = self.token_logprob.get(kind, 0.0)
            logprobs = [TokenLogprob(c, logprob, []) for c in reply] + [TokenLogprob("</s>", STOP_LOGPROB, [])]
        return PassOutput(prompt_ids, ids, reply, "stop", cached_tokens=len(prompt_ids) // 2, ms=1.0,
                          logprobs=logprobs)

    async def score(self, prefix_ids: list[int], images: list, reply_ids: list[int],
                    request_id: str) -> tuple[float, StageStats]:
        name = request_id.rsplit("-", 1)[-1]
        self.passes.append(Pass(f"score-{name}", prefix_ids + reply_ids, [i.image.size for i in images], None))
        self.scored[name] = reply_ids
        await asyncio.sleep(0)
        return self.nll[name], StageStats(1.0, len(prefix_ids) + len(reply_ids), len(prefix_ids), 1)
