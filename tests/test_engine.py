"""The DualFocus program on a real vLLM engine, once per tiny model family."""

import asyncio
import itertools
import math

import pytest
import pytest_asyncio
import torch

from engine import DualFocusEngine, EngineConfig, Query, Sampling
from engine.config import CPU_BLOCK_SIZE
from engine.errors import RetryableEngineError
from engine.query import Turn
from engine.runner import PRIORITY_NEW, ModelImage
from engine.trace import StageStats

from .conftest import scene

# Own event loop per module: the in-process engine binds to the loop it first runs in.
pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

QUESTIONS = ["What colour is the square?", "Where is the blue disc?", "How many shapes are there?",
             "Is the sky visible?", "What is on the left?", "Which shape is larger?"]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
async def engine(request):
    eng = DualFocusEngine.create(EngineConfig(model=request.param, kv_cache_gib=1, max_model_len=4096))
    await eng.warm_up()
    yield eng
    eng.shutdown()


def block_floor(engine, n):
    size = engine.llm.vllm_config.cache_config.block_size
    return n // size * size


def check_complete(result, image):
    t = result.trace
    assert t.mode == "dualfocus"
    assert {"macro", "box", "micro"} <= set(t.stages)
    assert t.box.outcome in ("ok", "degenerate")
    assert all(0.0 <= v <= 1.0 for v in t.box.normalized)
    bx1, by1, bx2, by2 = t.box.pixels
    assert 0 <= bx1 <= bx2 <= image.width and 0 <= by1 <= by2 <= image.height
    x1, y1, x2, y2 = t.crop.rect
    assert 0 <= x1 < x2 <= image.width - 1 and 0 <= y1 < y2 <= image.height - 1
    assert (t.crop.width, t.crop.height) == (x2 - x1, y2 - y1)
    # The crop holds the box's centre (the square is centred on it; clipping keeps it inside).
    assert x1 <= (bx1 + bx2) / 2 <= x2 and y1 <= (by1 + by2) / 2 <= y2
    assert t.chosen in ("macro", "micro", "same") and t.why
    assert result.answer == (t.micro_answer if t.chosen == "micro" else t.macro_answer)
    if t.chosen == "same":
        assert t.macro_answer.strip() == t.micro_answer.strip()
    for stage in t.stages.values():
        assert stage.ms > 0 and stage.prompt_tokens > 0 and 0 <= stage.cached_tokens <= stage.prompt_tokens


async def test_dualfocus_request_returns_a_complete_trace_and_reuses_the_image_prefix(engine):
    image = scene(672, 672)  # 576 image tokens in both families
    result = await engine.answer(Query(QUESTIONS[0], [image], sampling=Sampling(max_tokens=16)))
    check_complete(result, image)
    stages = result.trace.stages
    # The micro prompt extends the box prompt and reply: all their whole blocks come from the cache.
    assert stages["micro"].cached_tokens >= block_floor(engine, stages["box"].prompt_tokens) >= 512
    # The macro pass waits for the box prefill, then reads the shared system + image prefix.
    assert stages["macro"].cached_tokens >= 256
    usage = result.usage
    assert usage.prompt_tokens == sum(s.prompt_tokens for s in stages.values())


async def test_fusion_scores_both_answers_reading_the_cached_prefix(engine):
    scored = []
    for seed, question in enumerate(QUESTIONS):
        result = await engine.answer(Query(question, [scene(seed=seed)], sampling=Sampling(max_tokens=12)))
        if result.trace.scores is not None:
            scored.append(result)
    assert scored, "no request needed scoring: every macro and micro answer agreed"
    for result in scored:
        t = result.trace
        assert set(t.scores) == {"macro", "micro"} and all(math.isfinite(v) and v > 0 for v in t.scores.values())
        lower = "micro" if t.scores["micro"] < t.scores["macro"] else "macro"
        assert t.chosen == lower
        box = t.stages["box"]
        fusion = t.stages["fusion"]
        # Two scoring sequences, each sharing at least the box prompt and reply with the micro prompt.
        assert fusion.cached_tokens >= 2 * block_floor(engine, box.prompt_tokens + box.completion_tokens) > 0


async def test_follow_up_prompts_extend_earlier_ones_as_vllm_expands_them(engine):
    """Token for token on the expanded ids vLLM reports, image tokens included."""
    a = engine.adapter
    image = scene(seed=3)
    full = ModelImage.of(a.model_image(image))
    crop = ModelImage.of(a.model_image(image.crop((10, 10, 200, 150))))
    box_prompt = a.box_prompt(a.conversation_prefix([], 1), QUESTIONS[1])
    box = await engine.runner.generate(box_prompt, [full], engine.runner.box_params(), "t-box", PRIORITY_NEW)
    micro = await engine.runner.generate(a.micro_prompt(box_prompt, box.token_ids, QUESTIONS[1]), [full, crop],
                                  engine.runner.answer_params(Sampling(max_tokens=4)), "t-micro", PRIORITY_NEW)
    shared = box.prompt_token_ids + a.strip_stop(box.token_ids)
    assert micro.prompt_token_ids[: len(shared)] == shared
    scoring = await engine.runner.generate(a.scoring_prompt(box_prompt, box.token_ids, QUESTIONS[1]), [full, crop],
                                    engine.runner.answer_params(Sampling(max_tokens=1)), "t-score", PRIORITY_NEW)
    image_token = a.token_id("<image>" if a.name == "llava" else "<|image_pad|>")
    last_crop_token = max(i for i, t in enumerate(micro.prompt_token_ids) if t == image_token)
    assert scoring.prompt_token_ids[: last_crop_token + 1] == micro.prompt_token_ids[: last_crop_token + 1]
    assert scoring.cached_tokens >= block_floor(engine, last_crop_token + 1)


async def test_sixteen_concurrent_requests_all_complete(engine):
    images = [scene(320 + 16 * i, 240 + 8 * i, seed=i) for i in range(16)]
    results = await asyncio.gather(*[
        engine.answer(Query(QUESTIONS[i % len(QUESTIONS)], [images[i]], sampling=Sampling(max_tokens=12)))
        for i in range(16)])
    for result, image in zip(results, images, strict=True):
        check_complete(result, image)
    assert engine.num_unfinished_sequences == 0


async def test_cancelled_request_leaves_no_sequences(engine):
    task = asyncio.create_task(engine.answer(Query(QUESTIONS[2], [scene(seed=9)], sampling=Sampling(max_tokens=400))))
    for _ in range(200):  # wait until its passes are in the engine
        await asyncio.sleep(0.01)
        if engine.num_unfinished_sequences > 0:
            break
    assert engine.num_unfinished_sequences > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.num_unfinished_sequences == 0
    # The engine keeps serving.
    result = await engine.answer(Query(QUESTIONS[0], [scene()], mode="macro", sampling=Sampling(max_tokens=4)))
    assert result.trace.macro_answer == result.answer


async def test_macro_mode_and_text_only_are_one_plain_pass(engine):
    for query, why in [(Query(QUESTIONS[0], [scene()], mode="macro", sampling=Sampling(max_tokens=8)), "macro mode"),
                       (Query("Say hello.", [], sampling=Sampling(max_tokens=8)), "no image")]:
        result = await engine.answer(query)
        t = result.trace
        assert t.mode == "macro" and t.chosen == "macro" and why in t.why
        assert list(t.stages) == ["macro"] and t.micro_answer is None and t.box is None
        assert result.answer == t.macro_answer and t.stages["macro"].completion_tokens == 8


async def test_a_pass_read_only_for_its_start_gets_two_outputs_and_the_same_answer_as_streamed(engine, monkeypatch):
    """A non-streamed single pass waits for its first token (the request has started) and its
    end: vLLM delivers just those two; the answer is the one a streamed pass puts together."""
    delivered: dict[str, int] = {}
    real = engine.llm.generate

    async def counting(prompt, params, request_id, **kwargs):
        async for out in real(prompt, params, request_id, **kwargs):
            delivered[request_id] = delivered.get(request_id, 0) + 1
            yield out

    monkeypatch.setattr(engine.llm, "generate", counting)
    query = Query(QUESTIONS[2], [scene(seed=9)], mode="macro", sampling=Sampling(max_tokens=12, logprobs=2))
    started = asyncio.Event()
    quiet = await engine.answer(query, "quiet", started=started)
    pieces: list[str] = []
    streamed = await engine.answer(query, "streamed", on_text=lambda text, logprobs: pieces.append(text))
    # (One, if the loop was too busy to take the first before the last arrived: vLLM merges them.)
    assert started.is_set() and delivered["quiet-macro"] in (1, 2) and delivered["streamed-macro"] >= 2
    assert quiet.trace.stages["macro"].completion_tokens == 12 and len(pieces) >= 2
    assert quiet.answer == streamed.answer == pieces[-1] and quiet.answer
    assert all(b.startswith(a) for a, b in itertools.pairwise(pieces))  # text so far, growing
    # The answer's logprobs, put together from the pieces, one per token either way.
    assert quiet.logprobs is not None and streamed.logprobs is not None
    assert [lp.token for lp in quiet.logprobs] == [lp.token for lp in streamed.logprobs]
    assert len(quiet.logprobs) >= 1 and all(len(lp.top) == 2 for lp in quiet.logprobs)


async def test_request_sampling_applies_to_answers_and_the_box_stays_greedy(engine):
    image = scene(seed=5)
    hot = Sampling(max_tokens=12, temperature=1.0, seed=7)
    first = await engine.answer(Query(QUESTIONS[4], [image], sampling=hot))
    other_seed = Sampling(max_tokens=12, temperature=1.0, seed=8)
    second = await engine.answer(Query(QUESTIONS[4], [image], sampling=other_seed))
    assert first.trace.box.text == second.trace.box.text  # greedy whatever the request's sampling
    answers = [(r.trace.macro_answer, r.trace.micro_answer) for r in (first, second)]
    assert answers[0] != answers[1]


async def test_answers_never_hold_an_image_placeholder_even_when_the_request_pushes_for_one(engine, monkeypatch):
    # A model that said the placeholder would make every later prompt ask for an image the
    # request does not have; a request's logit_bias pushes all answers toward it here.
    placeholder = set(engine.adapter.image_ids())
    push = Sampling(max_tokens=4, logit_bias={str(t): 100.0 for t in placeholder})
    real, said = engine.llm.generate, {}

    async def recording_generate(prompt, params, request_id, **kwargs):
        async for out in real(prompt, params, request_id, **kwargs):
            if out.finished:
                said[request_id] = set(out.outputs[0].token_ids)
            yield out

    monkeypatch.setattr(engine.llm, "generate", recording_generate)
    image = scene(seed=9)
    plain = await engine.answer(Query(QUESTIONS[0], [image], sampling=push, mode="macro"), request_id="ph1")
    # The push works on a lone pass: it says nothing but the placeholder.
    assert plain.trace.mode == "macro" and said["ph1-macro"] and said["ph1-macro"] <= placeholder
    result = await engine.answer(Query(QUESTIONS[0], [image], sampling=push), request_id="ph2")
    check_complete(result, image)
    assert not (said["ph2-macro"] | said["ph2-micro"]) & placeholder, said


class FailingSequences:
    """Makes vLLM end the next `count` sequences with finish_reason "error", as its engine core
    does for a request-level failure (a KV-load failure, a multimodal cache miss); the real
    engine runs them."""

    def __init__(self, engine, count: int):
        self.real, self.count = engine.llm.generate, count
        self.failed_ids: list[str] = []

    async def generate(self, prompt, params, request_id, **kwargs):
        async for out in self.real(prompt, params, request_id, **kwargs):
            if out.finished and self.count > 0:
                self.count -= 1
                self.failed_ids.append(request_id)
                out.outputs[0].finish_reason = "error"
            yield out


async def test_a_pass_the_engine_fails_is_retried_once(engine, monkeypatch):
    faults = FailingSequences(engine, 1)
    monkeypatch.setattr(engine.llm, "generate", faults.generate)
    retries = engine.counters().retries
    result = await engine.answer(Query("Say hello.", [], sampling=Sampling(max_tokens=6)), request_id="req-1")
    assert result.answer == result.trace.macro_answer and result.trace.stages["macro"].completion_tokens == 6
    assert faults.failed_ids == ["req-1-macro"] and engine.counters().retries == retries + 1
    assert engine.num_unfinished_sequences == 0


async def test_a_pass_failed_twice_raises_a_retryable_error(engine, monkeypatch):
    faults = FailingSequences(engine, 2)
    monkeypatch.setattr(engine.llm, "generate", faults.generate)
    with pytest.raises(RetryableEngineError, match="twice"):
        await engine.answer(Query("Say hello.", [], sampling=Sampling(max_tokens=6)), request_id="req-2")
    assert faults.failed_ids == ["req-2-macro", "req-2-macro-retry"]
    assert engine.num_unfinished_sequences == 0


async def test_with_data_parallelism_all_passes_of_a_request_go_to_one_replica(engine, monkeypatch):
    # The engine here has one replica; pretend it has two and record where each pass would go.

    real, ranks = engine.llm.generate, {}

    async def recording_generate(prompt, params, request_id, data_parallel_rank=None, **kwargs):
        ranks[request_id] = data_parallel_rank
        async for out in real(prompt, params, request_id, **kwargs):
            yield out

    monkeypatch.setattr(engine.llm, "generate", recording_generate)
    monkeypatch.setattr(engine.runner, "data_parallel_size", 2)
    monkeypatch.setattr(engine.runner, "_next_rank", itertools.cycle(range(2)))
    await asyncio.gather(*[engine.answer(Query(QUESTIONS[i], [scene(seed=40 + i)], sampling=Sampling(max_tokens=8)),
                                         request_id=f"dp{i}") for i in range(4)])
    by_request = {}
    for pass_id, rank in ranks.items():
        by_request.setdefault(pass_id.split("-")[0], set()).add(rank)
    assert len(ranks) >= 4 * 3  # box, macro and micro at least, per request
    assert all(len(r) == 1 for r in by_request.values()), by_request  # one replica per request
    assert sorted(r.pop() for r in by_request.values()) == [0, 0, 1, 1]  # spread over both


async def test_vllms_exceptions_come_out_as_the_engines_own():
    from http import HTTPStatus

    from vllm.exceptions import (
        GenerationError,
        QueueOverflowError,
        RetryableRequestError,
        VLLMNotFoundError,
        VLLMValidationError,
    )
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

    from engine.errors import (
        EngineDeadError,
        GenerationFailedError,
        InvalidRequestError,
        RequestRefusedError,
    )
    from engine.runner import engine_error

    too_long = engine_error(VLLMValidationError("the prompt is too long", parameter="messages"))
    assert isinstance(too_long, InvalidRequestError) and too_long.param == "messages"
    assert isinstance(engine_error(VLLMNotFoundError("no such thing")), InvalidRequestError)
    busy = engine_error(QueueOverflowError())
    assert isinstance(busy, RequestRefusedError) and busy.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert type(engine_error(RetryableRequestError("again"))) is RetryableEngineError
    assert type(engine_error(GenerationError("kaput"))) is GenerationFailedError
    assert isinstance(engine_error(VLLMEngineDeadError()), EngineDeadError)
    other = ValueError("not vLLM's")
    assert engine_error(other) is other


# --- conversations ---------------------------------------------------------------------------

class RecordedPasses:
    """Every pass the engine runs, by request id, as vLLM reported it (expanded prompt ids)."""

    def __init__(self, engine):
        self.real, self.passes = engine.runner.generate, {}

    async def generate(self, prompt_ids, images, params, request_id, *args, **kwargs):
        out = await self.real(prompt_ids, images, params, request_id, *args, **kwargs)
        self.passes[request_id.rsplit("-", 1)[-1] if "score" not in request_id else request_id.split("-", 1)[-1]] = out
        return out


async def test_a_system_message_goes_into_every_pass_and_all_passes_share_one_prefix(engine, monkeypatch):
    recorded = RecordedPasses(engine)
    monkeypatch.setattr(engine.runner, "generate", recorded.generate)
    system = "You answer in one word about colours and shapes."
    query = Query(QUESTIONS[5], [scene(672, 672, seed=11)], sampling=Sampling(max_tokens=8),  # 576 image tokens
                  history=[Turn("system", system)])
    result = await engine.answer(query, request_id="sys")
    check_complete(result, query.images[0])
    passes = recorded.passes
    prefix = engine.adapter.conversation_prefix(query.history, 1).ids(engine.adapter)
    system_ids = engine.adapter.encode(system)
    box = passes["box"].prompt_token_ids
    # Each later pass starts with the box prompt (and its reply), token for token, as vLLM expanded them.
    shared = box + engine.adapter.strip_stop(passes["box"].token_ids)
    assert passes["micro"].prompt_token_ids[: len(shared)] == shared
    for name, out in passes.items():
        ids = out.prompt_token_ids
        assert any(ids[i: i + len(system_ids)] == system_ids for i in range(len(prefix))), name
        if name != "box":
            assert out.cached_tokens > 0, name
    # The macro prompt shares the box prompt through the image (and the system text before it).
    common = next(i for i, (a, b) in enumerate(zip(box, passes["macro"].prompt_token_ids, strict=False)) if a != b)
    assert common >= len(prefix) - 1 + 576
    assert result.trace.stages["macro"].cached_tokens >= block_floor(engine, common)
    # On CPU the blocks are 32 tokens (EngineConfig.block_size), not vLLM's 128: a fork recomputes less.
    assert engine.llm.vllm_config.cache_config.block_size == CPU_BLOCK_SIZE == 32
    assert common - result.trace.stages["macro"].cached_tokens < CPU_BLOCK_SIZE
    # The bf16 checkpoint computes in float32 on an x86 CPU without AVX-512 (no fast bf16 matmuls there).
    expected = torch.float32 if torch.backends.cpu.get_cpu_capability() == "AVX2" else torch.bfloat16
    assert engine.llm.vllm_config.model_config.dtype == expected


async def test_turn_two_about_the_same_image_reads_its_kv_from_the_cache(engine):
    image = scene(672, 672, seed=12)  # 576 image tokens in both families
    first = await engine.answer(Query("What is in the picture?", [image], sampling=Sampling(max_tokens=8)))
    history = [Turn("user", "What is in the picture?", [image]), Turn("assistant", first.answer)]
    second = await engine.answer(Query("And what colour is it?", [], sampling=Sampling(max_tokens=8), history=history))
    t = second.trace
    assert t.mode == "dualfocus" and t.zoomed_image == 0  # the image from turn 1, though turn 2 has none
    check_complete(second, image)
    # Its first pass (the box) finds the image's KV from turn 1 in the prefix cache.
    assert t.stages["box"].cached_tokens >= block_floor(engine, 576)
    assert second.usage.cached_tokens > first.usage.cached_tokens - t.stages.get("fusion", StageStats()).cached_tokens


async def test_with_two_images_the_most_recent_is_zoomed(engine):
    earlier, latest = scene(640, 480, seed=13), scene(300, 200, seed=14)
    query = Query("Which one shows more red?", [earlier, latest], sampling=Sampling(max_tokens=8))
    result = await engine.answer(query)
    assert result.trace.zoomed_image == 1
    check_complete(result, latest)  # box and crop lie in the second image's pixels
    # Both images are in every pass; the micro pass adds the crop.
    assert result.trace.stages["micro"].prompt_tokens > result.trace.stages["box"].prompt_tokens


async def test_logprobs_of_the_chosen_answer_in_both_modes(engine):
    for mode in ("dualfocus", "macro"):
        result = await engine.answer(Query(QUESTIONS[0], [scene(seed=15)], mode=mode,
                                           sampling=Sampling(max_tokens=10, logprobs=3)))
        lps = result.logprobs
        chosen = result.trace.stages["micro" if result.trace.chosen == "micro" else "macro"]
        assert len(lps) in (chosen.completion_tokens, chosen.completion_tokens - 1)  # less the stop token
        # The tokens spell the answer (the text leaves out special tokens a random model may pick).
        specials = set(engine.adapter.tokenizer.all_special_tokens)
        spelt = "".join(lp.token for lp in lps if lp.token not in specials)
        assert spelt.replace("\ufffd", "") == result.answer.replace("\ufffd", ""), mode
        for lp in lps:
            assert lp.logprob <= 0 and len(lp.top) == 3
            assert lp.top[0][1] >= lp.logprob  # greedy: the chosen token is the most likely one
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    plain = await engine.answer(Query(QUESTIONS[0], [scene(seed=15)], sampling=Sampling(max_tokens=4)))
    assert plain.logprobs is None


async def test_streamed_text_comes_with_its_logprobs(engine):
    seen = []
    result = await engine.answer(Query("Say hello.", [], sampling=Sampling(max_tokens=8, logprobs=0)),
                                 on_text=lambda text, lps: seen.append((text, len(lps))))
    counts = [n for _, n in seen]  # logprobs so far, at each step (vLLM may merge steps)
    assert len(seen) >= 2 and counts == sorted(counts) and counts[-1] == 8
    assert seen[-1][0] == result.answer and len(result.logprobs) in (7, 8)
    assert all(len(lp.top) == 0 for lp in result.logprobs)


async def test_json_schema_answers_in_both_passes(engine):
    import json

    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue", "grey"]}},
              "required": ["colour"], "additionalProperties": False}
    result = await engine.answer(Query(QUESTIONS[0], [scene(seed=16)],
                                       sampling=Sampling(max_tokens=40, json_schema=schema)))
    t = result.trace
    for answer in (t.macro_answer, t.micro_answer, result.answer):
        assert json.loads(answer)["colour"] in ("red", "blue", "grey")


async def test_auto_zooms_at_threshold_one_and_keeps_the_macro_answer_at_zero(engine, monkeypatch):
    # Random weights draw boxes of any size: lift the box-size limit, so the threshold alone decides.
    monkeypatch.setattr(engine.config, "zoom_max_box_area", 1.0)
    image = scene(seed=4)

    def ask(threshold, **sampling):
        return engine.answer(Query(QUESTIONS[0], [image], mode="auto", zoom_threshold=threshold,
                                   sampling=Sampling(**sampling)))

    zoomed = await ask(1.0, max_tokens=12)
    t = zoomed.trace
    assert t.mode == "auto" and t.gate.zoomed and t.gate.why == "unsure" and t.gate.threshold == 1.0
    assert 0 < t.gate.confidence < 1 and not t.gate.box_aborted and zoomed.logprobs is None
    assert {"box", "macro", "micro"} <= set(t.stages) and t.micro_answer is not None and t.crop is not None
    assert t.box.outcome in ("ok", "degenerate") and 0 <= t.gate.box_area <= 1
    assert zoomed.answer == (t.micro_answer if t.chosen == "micro" else t.macro_answer)

    # Threshold 0: the macro answer stands; the confidence is that of its own token logprobs.
    kept = await ask(0.0, max_tokens=12, logprobs=0)
    t = kept.trace
    assert t.mode == "auto" and not t.gate.zoomed and t.gate.why == "confident" and t.why == "no zoom: confident"
    assert "micro" not in t.stages and t.micro_answer is None and t.crop is None and kept.answer == t.macro_answer
    assert kept.logprobs and t.gate.confidence == pytest.approx(
        math.exp(sum(e.logprob for e in kept.logprobs) / len(kept.logprobs)), rel=1e-4)
    assert t.macro_answer == zoomed.trace.macro_answer  # greedy: the same macro pass
    # Box on demand: a confident answer runs no box pass; an unsure one's box reads the image from the cache.
    assert t.box is None and not t.gate.box_aborted and set(t.stages) == {"macro"}
    assert zoomed.trace.stages["box"].cached_tokens > 0

    # Early box: the box pass starts once the macro prompt is prefilled. A three-token answer is ready long
    # before the box (a dozen grammar-guided tokens), and at a threshold of 1e-6 (one that may zoom, so the
    # box does start) it is confident: the box pass is aborted.
    monkeypatch.setattr(engine.config, "zoom_early_box", True)
    short = await ask(1e-6, max_tokens=3, ignore_eos=True)
    t = short.trace
    assert t.gate.box_aborted and t.box is None and set(t.stages) == {"macro"} and short.answer == t.macro_answer
    assert engine.num_unfinished_sequences == 0  # the aborted box pass is gone from vLLM
    again = await ask(1.0, max_tokens=12)  # and the engine serves on, the box's prefix cached
    assert again.trace.gate.zoomed and again.trace.stages["box"].cached_tokens > 0
    # A request without a threshold of its own gets the engine's.
    assert (await ask(None, max_tokens=1)).trace.gate.threshold == engine.config.zoom_threshold == 0.484
