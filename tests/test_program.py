"""The DualFocus program (engine/program.py) against a fake pass runner: which passes run, with
which prompts, and what is answered, for the cases a model rarely produces on demand. No vLLM."""

import asyncio
import math

import pytest
from PIL import Image

from engine.errors import GenerationFailedError
from engine.families.llava import LlavaAdapter
from engine.gate import ZoomGate
from engine.image_work import ImageWorkers
from engine.program import run_dualfocus, run_single_pass
from engine.query import Query, Sampling

from .fakes import CharTokenizer, FakeRunner

IMAGE = Image.new("RGB", (640, 480), (128, 128, 128))
WORKERS: ImageWorkers
BOX = "[0.10, 0.20, 0.30, 0.40]"  # 64,96 - 192,192 in pixels: a usable crop


@pytest.fixture
def adapter():
    return LlavaAdapter(CharTokenizer(), {})


@pytest.fixture(autouse=True)
def workers():
    """The image workers the program pads and hashes on (one per test: their slots belong to its loop)."""
    global WORKERS
    WORKERS = ImageWorkers(1)
    yield WORKERS
    WORKERS.shutdown()


async def run(runner, adapter, question="What colour is the square?", **query):
    return await run_dualfocus(runner, adapter, WORKERS, Query(question, [IMAGE], **query), "r1", asyncio.Event())


@pytest.mark.parametrize("box, outcome", [("no box here", "unparsed"), ("[1.20, 1.30, 1.50, 1.60]", "outside")])
async def test_without_a_usable_box_the_macro_answer_stands_and_no_micro_pass_runs(adapter, box, outcome):
    runner = FakeRunner({"box": box, "macro": "red"})
    result = await run(runner, adapter)
    assert [p.kind for p in runner.passes] == ["box", "macro"]
    t = result.trace
    assert result.answer == "red" and t.chosen == "macro" and t.why == f"no micro pass: box {outcome}"
    assert t.box.text == box and t.box.outcome == outcome and t.crop is None and t.micro_answer is None
    assert set(t.stages) == {"box", "macro"}


async def test_a_usable_box_crops_the_region_and_the_micro_pass_extends_the_box_prompt(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "red"})
    result = await run(runner, adapter, sampling=Sampling(max_tokens=7))
    box, macro, micro = (next(p for p in runner.passes if p.kind == k) for k in ("box", "macro", "micro"))
    t = result.trace
    assert t.box.pixels == (64, 96, 192, 192) and t.box.outcome == "ok"
    assert t.crop.rect == (39, 55, 217, 233)  # squared about the centre, enlarged by 25 px
    assert micro.image_sizes == [(640, 640), (178, 178)]  # LLaVA pads both square
    assert micro.prompt_ids[:len(box.prompt_ids)] == box.prompt_ids  # a follow-up, token for token
    assert box.params == ("box", adapter.box_regex)
    assert macro.params[1].max_tokens == 7 and micro.params[1].max_tokens == 7
    # Both answers go on into the scoring prompts as token ids: no image placeholder among them.
    assert macro.params[3] == micro.params[3] == adapter.image_ids()
    assert t.chosen == "same" and result.answer == "red" and "fusion" not in t.stages  # no scoring needed


async def test_multiple_choice_scores_the_option_texts_and_the_box_asks_about_the_stem(adapter):
    question = "What colour is the square?\nA. red\nB. blue"
    runner = FakeRunner({"box": BOX, "macro": "A", "micro": "B."}, nll={"macro": 3.0, "micro": 1.5})
    result = await run(runner, adapter, question)
    box = next(p for p in runner.passes if p.kind == "box")
    # options name no region
    assert box.prompt_ids == adapter.box_prompt(adapter.conversation_prefix([], 1), "What colour is the square?")
    assert runner.scored == {"macro": adapter.reply_ids("red"), "micro": adapter.reply_ids("blue")}
    t = result.trace
    assert t.scores == {"macro": 3.0, "micro": 1.5} and t.chosen == "micro" and result.answer == "B."
    assert t.stages["fusion"].prompt_tokens == sum(len(p.prompt_ids) for p in runner.passes
                                                   if p.kind.startswith("score"))


async def test_open_ended_answers_are_scored_as_generated_without_the_stop_token(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "crimson"}, nll={"macro": 1.0, "micro": 2.0})
    result = await run(runner, adapter)
    assert runner.scored == {"macro": [ord(c) + 10 for c in "red"], "micro": [ord(c) + 10 for c in "crimson"]}
    assert result.trace.chosen == "macro" and result.answer == "red"


@pytest.mark.parametrize("macro, micro, chosen", [("", "blue", "micro"), ("red", "  ", "macro")])
async def test_an_empty_answer_loses_without_scoring(adapter, macro, micro, chosen):
    runner = FakeRunner({"box": BOX, "macro": macro, "micro": micro})
    result = await run(runner, adapter)
    assert not runner.scored and result.trace.scores is None and "fusion" not in result.trace.stages
    assert result.trace.chosen == chosen and result.trace.why == "the other answer is empty"
    assert result.answer == (micro if chosen == "micro" else macro)


async def test_both_answers_empty_is_the_same_empty_answer(adapter):
    runner = FakeRunner({"box": BOX, "macro": "", "micro": ""})
    result = await run(runner, adapter)
    assert result.answer == "" and result.trace.chosen == "same" and not runner.scored


async def test_a_failing_pass_cancels_the_others_and_its_own_error_is_raised(adapter):
    # The macro pass is still running when the micro pass fails: it is cancelled, and the caller
    # sees the engine's error itself, not an ExceptionGroup.
    runner = FakeRunner({"box": BOX, "micro": GenerationFailedError("micro failed")}, hold=("macro",))
    with pytest.raises(GenerationFailedError, match="micro failed"):
        await run(runner, adapter)
    assert runner.cancelled == ["macro"]


async def test_a_failing_box_pass_fails_the_request_before_the_macro_pass_starts(adapter):
    runner = FakeRunner({"box": GenerationFailedError("box failed"), "macro": "red"})
    with pytest.raises(GenerationFailedError, match="box failed"):
        await run(runner, adapter)
    assert [p.kind for p in runner.passes] == ["box"]


async def test_cancelling_the_request_cancels_every_running_pass(adapter):
    runner = FakeRunner({"box": BOX}, hold=("macro", "micro"))
    task = asyncio.create_task(run(runner, adapter))
    while len(runner.passes) < 3:  # box done; macro and micro running
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(runner.cancelled) == ["macro", "micro"]


async def test_a_single_pass_streams_its_text_and_has_no_image_without_one(adapter):
    runner = FakeRunner({"macro": "hello"})
    result = await run_single_pass(runner, adapter, WORKERS, Query("Say hello.", []), "r2", asyncio.Event())
    (only,) = runner.passes
    assert only.image_sizes == []
    assert only.prompt_ids == adapter.macro_prompt(adapter.conversation_prefix([], 0), "Say hello.")
    assert result.answer == "hello" and result.trace.mode == "macro" and result.trace.why == "no image: one plain pass"


# --- mode auto: the zoom gate (engine/gate.py) ---------------------------------------------------

async def run_auto(runner, adapter, threshold, max_box_area=0.5, early_box=False, choice_threshold=0.0,
                   question="What colour is the square?", **query):
    gate = ZoomGate(threshold, choice_threshold, max_box_area=max_box_area, early_box=early_box)
    return await run_dualfocus(runner, adapter, WORKERS, Query(question, [IMAGE], mode="auto", **query),
                               "r1", asyncio.Event(), gate)


UNSURE = math.log(0.3)  # each macro token's logprob: confidence 0.3


async def test_auto_at_threshold_one_zooms_an_unsure_answer_and_fuses(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "crimson"}, nll={"macro": 2.0, "micro": 1.0},
                        token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=1.0)
    # Box on demand: the macro pass first, then, its answer unsure, the box pass.
    assert [p.kind for p in runner.passes] == ["macro", "box", "micro", "score-macro", "score-micro"]
    t = result.trace
    assert t.mode == "auto" and t.chosen == "micro" and result.answer == "crimson" and t.micro_answer == "crimson"
    g = t.gate
    assert g.zoomed and g.why == "unsure" and g.threshold == 1.0 and not g.box_aborted and not g.multiple_choice
    assert g.confidence == pytest.approx(0.3)  # the stop token (STOP_LOGPROB) left out
    assert g.box_area == pytest.approx(128 * 96 / (640 * 480)) and g.max_box_area == 0.5
    assert t.crop.rect == (39, 55, 217, 233) and set(t.stages) == {"box", "macro", "micro", "fusion"}
    # The gate asked for the macro answer's token logprobs, and only for those.
    macro, micro = (next(p for p in runner.passes if p.kind == k) for k in ("macro", "micro"))
    assert macro.params[2] is True and micro.params[2] is False


async def test_auto_at_threshold_zero_keeps_the_macro_answer_without_running_the_box_pass(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red"}, token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=0.0)
    assert [p.kind for p in runner.passes] == ["macro"]  # a confident answer costs one pass
    t = result.trace
    assert result.answer == "red" and t.chosen == "macro" and t.why == "no zoom: confident"
    assert t.micro_answer is None and t.crop is None and t.scores is None and set(t.stages) == {"macro"}
    assert t.box is None and t.gate.box_area is None and not t.gate.box_aborted
    assert not t.gate.zoomed and t.gate.confidence == pytest.approx(0.3) and t.gate.threshold == 0.0


async def test_the_box_pass_on_demand_extends_the_conversation_as_the_macro_pass_did(adapter):
    """The box prompt shares the macro prompt's prefix (the images' KV, cached by the macro pass)."""
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "red"}, token_logprob={"macro": UNSURE})
    await run_auto(runner, adapter, threshold=0.5)
    macro, box = runner.passes[:2]
    prefix = adapter.conversation_prefix([], 1)
    assert macro.prompt_ids == adapter.macro_prompt(prefix, "What colour is the square?")
    assert box.prompt_ids == adapter.box_prompt(prefix, "What colour is the square?")
    shared = next(i for i, (a, b) in enumerate(zip(macro.prompt_ids, box.prompt_ids, strict=False)) if a != b)
    assert CharTokenizer.image_id in macro.prompt_ids[:shared]  # the image lies in the shared part


async def test_with_early_box_a_confident_answer_after_the_box_keeps_the_box_traced(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red"}, delay={"macro": 0.05}, token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=0.2, early_box=True)
    # The macro pass first, the box once its prompt is prefilled; the box came first: nothing to abort.
    assert [p.kind for p in runner.passes] == ["macro", "box"]
    t = result.trace
    assert result.answer == "red" and t.why == "no zoom: confident" and set(t.stages) == {"box", "macro"}
    assert t.box.outcome == "ok"  # still traced: it was there when the gate decided
    assert not t.gate.box_aborted and runner.cancelled == []


@pytest.mark.parametrize("threshold, choice_threshold, question", [
    (0.0, 1.0, "What colour is the square?"), (1.0, 0.0, "What colour is the square?\nA. red\nB. blue")])
async def test_with_early_box_a_question_whose_threshold_is_zero_runs_no_box(adapter, threshold, choice_threshold,
                                                                             question):
    runner = FakeRunner({"box": BOX, "macro": "A"}, delay={"macro": 0.05}, token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=threshold, choice_threshold=choice_threshold,
                            early_box=True, question=question)
    assert [p.kind for p in runner.passes] == ["macro"]  # it can never zoom: no box to start
    assert not result.trace.gate.zoomed and not result.trace.gate.box_aborted and result.trace.box is None


@pytest.mark.parametrize("threshold, choice_threshold, zoomed", [(1.0, 0.29, False), (0.0, 0.31, True)])
async def test_a_multiple_choice_question_is_held_to_the_choice_threshold(adapter, threshold, choice_threshold,
                                                                          zoomed):
    runner = FakeRunner({"box": BOX, "macro": "A", "micro": "A"}, token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=threshold, choice_threshold=choice_threshold,
                            question="What colour is the square?\nA. red\nB. blue")
    assert [p.kind for p in runner.passes] == (["macro", "box", "micro"] if zoomed else ["macro"])
    g = result.trace.gate
    assert g.multiple_choice and g.threshold == choice_threshold and g.zoomed is zoomed
    assert g.why == ("unsure" if zoomed else "confident")


@pytest.mark.parametrize("threshold, zoomed", [(0.29, False), (0.31, True)])
async def test_auto_between_zooms_below_the_threshold_only(adapter, threshold, zoomed):
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "red"}, token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=threshold)
    assert result.trace.gate.zoomed is zoomed and ("micro" in [p.kind for p in runner.passes]) is zoomed
    assert result.trace.gate.why == ("unsure" if zoomed else "confident")


async def test_with_early_box_a_confident_macro_answer_before_the_box_aborts_the_box_pass(adapter):
    runner = FakeRunner({"macro": "red"}, hold=("box",), token_logprob={"macro": math.log(0.9)})
    result = await run_auto(runner, adapter, threshold=0.5, early_box=True)
    assert runner.cancelled == ["box"]  # cancelled: the runner aborts it in vLLM
    t = result.trace
    assert result.answer == "red" and t.chosen == "macro" and t.why == "no zoom: confident"
    assert t.gate.box_aborted and t.gate.confidence == pytest.approx(0.9) and t.gate.box_area is None
    assert t.box is None and t.crop is None and set(t.stages) == {"macro"}


async def test_with_early_box_an_unsure_macro_answer_before_the_box_waits_for_it_then_zooms(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "red"}, delay={"box": 0.05},
                        token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=0.5, early_box=True)
    assert runner.cancelled == [] and [p.kind for p in runner.passes] == ["macro", "box", "micro"]
    assert result.trace.gate.zoomed and not result.trace.gate.box_aborted and result.trace.box.outcome == "ok"


@pytest.mark.parametrize("box, why", [("no box here", "box unparsed"), ("[1.20, 1.30, 1.50, 1.60]", "box outside"),
                                      ("[0.00, 0.00, 0.90, 0.90]", "box covers most of the image")])
async def test_an_unsure_answer_is_kept_when_the_box_gives_nothing_worth_zooming_into(adapter, box, why):
    runner = FakeRunner({"box": box, "macro": "red"}, token_logprob={"macro": UNSURE})
    result = await run_auto(runner, adapter, threshold=1.0)
    assert [p.kind for p in runner.passes] == ["macro", "box"]
    assert result.trace.gate.why == why and result.trace.why == f"no zoom: {why}" and result.answer == "red"


async def test_auto_returns_logprobs_only_when_the_request_asked(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red"}, token_logprob={"macro": UNSURE})
    assert (await run_auto(runner, adapter, threshold=0.0)).logprobs is None
    result = await run_auto(runner, adapter, threshold=0.0, sampling=Sampling(logprobs=2))
    assert [e.token for e in result.logprobs] == ["r", "e", "d"]  # the answer's tokens, not the stop token


async def test_dualfocus_mode_asks_for_no_logprobs_and_has_no_gate(adapter):
    runner = FakeRunner({"box": BOX, "macro": "red", "micro": "red"})
    result = await run(runner, adapter)
    assert result.trace.gate is None and result.trace.mode == "dualfocus" and result.logprobs is None
    assert next(p for p in runner.passes if p.kind == "macro").params[2] is False
