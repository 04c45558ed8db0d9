"""The DualFocus program for one request, read top to bottom like the method.

    0. prefix: the conversation up to the question's text (system and developer
       messages, earlier turns, every image), rendered once by the family's
       template; every pass below starts with it token for token, so the images'
       KV is computed once (and read from the cache in a conversation's later turns)
    1. box pass: where does the question look?  (grammar-guided, greedy)
    2. macro pass: answer on the whole image     (submitted once the box pass's
       prefill is done, so it reads the shared image prefix from the cache)
    3. crop: box -> square, clip, enlarge, crop  (engine/geometry.py), on the
       conversation's most recent image
    4. micro pass: answer again with [images, crop], as a follow-up that
       extends the box prompt and reply token for token
    5. fuse: identical answers stand; otherwise score both as replies to a
       prompt sharing the micro prompt's prefix; lower perplexity wins

Mode auto (adaptive DualFocus) asks the zoom gate (engine/gate.py) whether
zooming pays: only if the macro answer is unsure (below its form's threshold:
multiple choice has its own) and the box gives a small enough crop do 3-5 run.
It runs the macro pass first and the box pass only after an unsure answer, so a
confident one costs a single pass; with the gate's `early_box`, the box pass
starts once the macro prompt is prefilled (if the question's form can zoom at
all) and a confident macro answer that arrives first aborts it (lower latency
when zooming, more compute).

Family details (templates, box format, coordinates) come from the adapter; the
passes run on the pass runner (engine/runner.py), which knows vLLM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from PIL import Image

from .families import FamilyAdapter
from .fusion import decide, parse_question, pick_by_score
from .gate import ZoomGate, box_area, confidence
from .geometry import CropPlan, plan_crop, sorted_box
from .image_work import ImageWorkers
from .query import Query
from .runner import PRIORITY_NEW, PRIORITY_STARTED, ModelImage, PassOutput, PassRunner
from .trace import BoxTrace, CropTrace, GateTrace, OnText, Result, StageStats, Trace


async def run_dualfocus(
    runner: PassRunner,
    adapter: FamilyAdapter,
    workers: ImageWorkers,
    query: Query,
    request_id: str,
    started: asyncio.Event,
    gate: ZoomGate | None = None,
) -> Result:
    """Mode dualfocus (no `gate`): zoom whenever the box gives a crop, the micro pass running
    beside the macro pass. Mode auto: zoom only when `gate` says it pays (engine/gate.py), so
    the micro pass waits for the macro answer; a confident one settles it without the box."""
    images = query.all_images
    assert images, "DualFocus needs an image (Query.runs_as)"
    # The box names a region of the most recent image: the one the question is most likely about.
    zoomed = len(images) - 1
    original = images[zoomed]
    width, height = original.size
    image_ids = query.all_image_ids
    shown = await asyncio.gather(
        *(model_image(workers, adapter, image, image_id=i) for image, i in zip(images, image_ids, strict=True))
    )
    prefix = adapter.conversation_prefix(query.history, len(query.images))

    # An answer goes on into later passes' prompts as its token ids; an image placeholder
    # among them would ask vLLM for an image the request does not have.
    placeholder = adapter.image_ids()

    def answer_params(token_logprobs: bool = False):  # a fresh copy per pass: vLLM owns the params it is given
        return runner.answer_params(query.sampling, token_logprobs, banned=placeholder)

    question = parse_question(query.question)  # stem and, for multiple choice, options
    # The box prompt asks about the question itself; its answer options are not a region.
    box_prompt = adapter.box_prompt(prefix, question.stem)
    box: PassOutput | None = None
    box_trace: BoxTrace | None = None
    plan: CropPlan | None = None
    area: float | None = None  # the box's share of the image
    gate_trace: GateTrace | None = None
    micro: PassOutput | None = None
    crop: ModelImage | None = None
    crop_trace = None

    def box_pass(priority: int, on_prefilled: asyncio.Event | None = None) -> Coroutine[Any, Any, PassOutput]:
        return runner.generate(
            box_prompt,
            shown,
            runner.box_params(adapter.box_regex_for(width, height)),
            f"{request_id}-box",
            priority,
            started=on_prefilled,
        )

    def macro_pass(priority: int, on_prefilled: asyncio.Event | None = None) -> Coroutine[Any, Any, PassOutput]:
        return runner.generate(
            adapter.macro_prompt(prefix, query.question),
            shown,
            answer_params(token_logprobs=gate is not None),  # the gate reads the answer's confidence
            f"{request_id}-macro",
            priority,
            started=on_prefilled,
        )

    async with _tasks() as tasks:
        box_task: asyncio.Task[PassOutput] | None = None
        box_aborted = False
        if gate is None:
            # 1-2. Box first: it is on the critical path. The macro pass waits for the box
            # prompt to be prefilled (`started`), then reuses its cached prefix.
            box_task = tasks.create_task(box_pass(PRIORITY_NEW, started))
            await _first_of(started, box_task)
            macro_task = tasks.create_task(macro_pass(PRIORITY_STARTED))
        else:
            # 1-2. Auto: macro first, as a single pass would run. A confident answer needs no box, so
            # most requests cost one pass; the box pass reads the images' KV from the macro pass's cache.
            macro_task = tasks.create_task(macro_pass(PRIORITY_NEW, started))
            if gate.early_box and gate.may_zoom(question.multiple_choice):
                # Early box: start it once the macro prompt is prefilled, so a zoom does not wait for
                # the answer; a confident answer that arrives first aborts it (vLLM frees its KV blocks).
                await _first_of(started, macro_task)
                box_task = tasks.create_task(box_pass(PRIORITY_STARTED))
                await asyncio.wait({macro_task, box_task}, return_when=asyncio.FIRST_COMPLETED)
                if (
                    macro_task.done()
                    and not box_task.done()
                    and gate.confident(_confidence(adapter, macro_task.result()), question.multiple_choice)
                ):
                    box_task.cancel()
                    await asyncio.wait({box_task})
                    box_aborted = box_task.cancelled()  # else it finished meanwhile: its box is traced
            elif not gate.confident(_confidence(adapter, await macro_task), question.multiple_choice):
                box_task = tasks.create_task(box_pass(PRIORITY_STARTED))
        if box_task is not None and not box_aborted:
            box = await box_task

        # 3. Crop.
        if box is not None:
            parsed = adapter.parse_box(box.text, width, height)
            plan = plan_crop(parsed.pixels, width, height) if parsed else None
            box_trace = BoxTrace(
                box.text,
                parsed.normalized if parsed else None,
                _rounded(sorted_box(parsed.pixels)) if parsed else None,
                plan.outcome if plan else "unparsed",
            )
            area = box_area(sorted_box(parsed.pixels), width, height) if parsed else None

        # 3b. Auto: the gate decides from the macro answer's confidence and the box.
        if gate is not None:
            macro_confidence = _confidence(adapter, await macro_task)
            verdict = gate.decide(
                macro_confidence,
                question.multiple_choice,
                box_trace.outcome if box_trace is not None else "not run",
                plan is not None and plan.usable,
                area,
            )
            gate_trace = GateTrace(
                verdict.zoom,
                verdict.why,
                round(macro_confidence, 6),
                gate.threshold_for(question.multiple_choice),
                question.multiple_choice,
                None if area is None else round(area, 6),
                gate.max_box_area,
                box_aborted,
            )

        # 4. Micro pass, if there is a crop to look at (and, in mode auto, the gate says zoom).
        if plan is not None and plan.rect is not None and (gate_trace is None or gate_trace.zoomed):
            assert box is not None
            crop = await model_image(workers, adapter, original, plan.rect, image_ids[zoomed])
            crop_trace = CropTrace(plan.rect)
            micro = await runner.generate(
                adapter.micro_prompt(box_prompt, box.token_ids, query.question),
                [*shown, crop],
                answer_params(),
                f"{request_id}-micro",
                PRIORITY_STARTED,
            )
        macro = await macro_task

    trace = Trace(
        mode="dualfocus" if gate is None else "auto",
        chosen="macro",
        why="",
        macro_answer=macro.text,
        box=box_trace,
        crop=crop_trace,
        zoomed_image=zoomed,
        gate=gate_trace,
        stages={"macro": macro.stats(), **({"box": box.stats()} if box is not None else {})},
    )
    if gate_trace is not None and not gate_trace.zoomed:
        trace.why = f"no zoom: {gate_trace.why}"
        return _result(adapter, query, macro, trace)
    if micro is None or crop is None:
        assert box_trace is not None
        trace.why = f"no micro pass: box {box_trace.outcome}"
        return _result(adapter, query, macro, trace)
    assert box is not None
    trace.micro_answer = micro.text
    trace.stages["micro"] = micro.stats()

    # 5. Fuse.
    decision = decide(question, macro.text, micro.text)
    trace.chosen, trace.why = decision.chosen or "macro", decision.why
    if decision.candidates is not None:
        t0 = time.perf_counter()
        scoring_prefix = adapter.scoring_prompt(box_prompt, box.token_ids, question.stem)
        generated = {"macro": adapter.strip_stop(macro.token_ids), "micro": adapter.strip_stop(micro.token_ids)}
        replies = {
            # Open-ended answers are scored as the tokens the model generated; option texts are tokenised.
            name: generated[name] if not question.multiple_choice else adapter.reply_ids(text)
            for name, text in decision.candidates.items()
        }
        async with _tasks() as tasks:
            scored = {
                name: tasks.create_task(runner.score(scoring_prefix, [*shown, crop], ids, f"{request_id}-score-{name}"))
                for name, ids in replies.items()
            }
        trace.scores = {name: task.result()[0] for name, task in scored.items()}
        trace.chosen, trace.why = pick_by_score(trace.scores)
        fusion = sum((task.result()[1] for task in scored.values()), StageStats())
        fusion.ms = (time.perf_counter() - t0) * 1000  # wall time: the two scorings run side by side
        trace.stages["fusion"] = fusion
    return _result(adapter, query, micro if trace.chosen == "micro" else macro, trace)


async def run_single_pass(
    runner: PassRunner,
    adapter: FamilyAdapter,
    workers: ImageWorkers,
    query: Query,
    request_id: str,
    started: asyncio.Event,
    on_text: OnText | None = None,
) -> Result:
    """Macro mode, or a conversation without images: one plain pass."""
    images = await asyncio.gather(
        *(
            model_image(workers, adapter, image, image_id=i)
            for image, i in zip(query.all_images, query.all_image_ids, strict=True)
        )
    )
    out = await runner.generate(
        adapter.macro_prompt(adapter.conversation_prefix(query.history, len(query.images)), query.question),
        images,
        runner.answer_params(query.sampling),
        f"{request_id}-macro",
        PRIORITY_NEW,
        started=started,
        on_text=on_text,
    )
    why = "macro mode: one pass" if images else "no image: one plain pass"
    trace = Trace(mode="macro", chosen="macro", why=why, macro_answer=out.text, stages={"macro": out.stats()})
    return _result(adapter, query, out, trace)


async def model_image(
    workers: ImageWorkers,
    adapter: FamilyAdapter,
    image: Image.Image,
    rect: tuple[int, int, int, int] | None = None,
    image_id: str | None = None,
) -> ModelImage:
    """`image` (or its `rect` crop) as the model sees it, with its content id: derived from
    `image_id` (the file's digest) if there is one, else hashed from the pixels. On the image
    workers: for a big photo, padding and hashing take a second of CPU."""

    def prepare() -> ModelImage:
        shown = adapter.model_image(image.crop(rect) if rect is not None else image)
        if image_id is None:
            return ModelImage.of(shown)
        return ModelImage.derived(shown, image_id, f"{adapter.name} crop={rect}")

    width, height = (rect[2] - rect[0], rect[3] - rect[1]) if rect is not None else image.size
    return await workers.run(prepare, pixels=width * height)


def _result(adapter: FamilyAdapter, query: Query, chosen: PassOutput, trace: Trace) -> Result:
    # Logprobs for the answer's tokens, if the request asked for them (mode auto's gate asks for the
    # macro pass's own): the stop token that ended it is not part of the text.
    logprobs = None
    if query.sampling.logprobs is not None and chosen.logprobs is not None:
        logprobs = chosen.logprobs[: len(adapter.strip_stop(chosen.token_ids))]
    return Result(chosen.text, chosen.finish_reason, trace, logprobs)


def _confidence(adapter: FamilyAdapter, answer: PassOutput) -> float:
    """The gate's confidence in an answer: over its tokens' logprobs, the stop token left out."""
    assert answer.logprobs is not None, "the pass was run without token logprobs"
    tokens = adapter.strip_stop(answer.token_ids)
    return confidence([entry.logprob for entry in answer.logprobs[: len(tokens)]])


class _tasks(asyncio.TaskGroup):
    """A TaskGroup that raises its first error itself rather than an ExceptionGroup, so
    callers see vLLM's own exceptions. Leaving it (by error or cancellation) cancels
    every pass still running, which aborts them in vLLM."""

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await super().__aexit__(et, exc, tb)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None


def _rounded(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return round(x1), round(y1), round(x2), round(y2)


async def _first_of(event: asyncio.Event, task: asyncio.Task) -> None:
    """Wait for `event`, or for `task` to end first (a failing task raises here)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done() and not event.is_set():
        task.result()
