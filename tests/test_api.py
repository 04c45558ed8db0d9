"""The HTTP layer against a fake engine (tests/fakes.py) over ASGI, no vLLM: request -> query
decoding, responses and the trace's wire format, SSE framing, error mapping, admission (429),
client disconnects, loading and engine failure, and /metrics of a fresh app."""

import asyncio
import base64
import contextlib
import dataclasses
import io
import json

import httpx
import jsonschema
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig, Result
from engine.errors import (
    EngineDeadError,
    GenerationFailedError,
    InvalidRequestError,
    RequestRefusedError,
    RetryableEngineError,
)
from server.app import create_app
from server.settings import ServerSettings

from .fakes import FakeEngine, auto_result, blocked_forever, single_pass_result

MODEL = "tiny"


def settings(**overrides) -> ServerSettings:
    return ServerSettings(engine=EngineConfig(model="/models/fake"), served_model_name=MODEL, drain_seconds=1,
                          **overrides)


@contextlib.asynccontextmanager
async def serving(engine=None, on_engine_failure=None, wait_ready=True, **overrides):
    """The app started (its lifespan running) over `engine`, and an httpx client on it."""
    engine = engine if engine is not None else FakeEngine()
    app = create_app(settings(**overrides), engine, on_engine_failure)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as http:
            while wait_ready and app.state.engine is None:
                await asyncio.sleep(0.01)
            yield app, http


def sdk(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    """The official openai SDK over the same ASGI transport."""
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)


def png_url(width=320, height=240) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *image_urls: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in image_urls)]}]


def body(text="What colour is the square?", *image_urls, **extra) -> dict:
    return {"model": MODEL, "messages": user(text, *image_urls), **extra}


def metric(text: str, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def sse_events(raw: str) -> list[str]:
    """The events' data, checking the framing: every event is one `data: ...` line and a blank line."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


# --- request -> query ----------------------------------------------------------------------------

async def test_an_openai_request_becomes_the_engine_query():
    async with serving() as (_, http):
        engine = http._transport.app.state.engine
        await sdk(http).chat.completions.create(
            model=MODEL, messages=user("What colour\nis it?", png_url(320, 240)), max_tokens=9, temperature=0.5,
            top_p=0.9, seed=3, stop="END", extra_body={"dualfocus": {"mode": "macro"}})
        q = engine.queries[-1]
        (image,) = q.images
        assert q.question == "What colour\nis it?" and image.size == (320, 240) and image.mode == "RGB"
        assert q.history == [] and q.sampling.logprobs is None
        assert q.mode == "macro" and q.runs_as == "macro"
        s = q.sampling
        assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (9, 0.5, 0.9, 3, ["END"])

        # Plain string content, no image: the defaults (greedy; max_tokens min(512, context));
        # max_completion_tokens wins.
        await sdk(http).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi."}])
        q = engine.queries[-1]
        assert q.question == "Hi." and q.images == [] and q.mode == "dualfocus" and q.runs_as == "macro"
        assert (q.sampling.max_tokens, q.sampling.temperature, q.sampling.stop) == (512, 0.0, [])
        assert not q.sampling.ignore_eos
        await sdk(http).chat.completions.create(model=MODEL, messages=user("Hi."), max_tokens=5,
                                                max_completion_tokens=6)
        assert engine.queries[-1].sampling.max_tokens == 6


async def test_the_answer_usage_and_trace_come_back_in_openais_shape():
    async with serving() as (app, http):
        response = await sdk(http).chat.completions.create(
            model=MODEL, messages=user("What colour is the square?", png_url()), max_tokens=8,
            extra_body={"dualfocus": {"return_trace": True}}, extra_headers={"X-Request-Id": "req-7"})
        assert app.state.engine.request_ids[-1] == "req-7" and response.id == "chatcmpl-req-7"
        assert response.choices[0].message.content == "a red square"
        assert response.choices[0].finish_reason == "stop" and response.model == MODEL
        u = response.usage
        assert (u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens, u.total_tokens) == (
            600 + 620 + 1300 + 2600, 512 + 640 + 2400, 3 + 12 + 4 + 2, 5120 + 21)
        # The wire format docs/server.md describes, key for key.
        assert response.dualfocus == {
            "mode": "dualfocus", "chosen": "micro", "why": "the micro answer has the lower perplexity",
            "macro_answer": "a square", "micro_answer": "a red square",
            "box": {"text": "[0.10, 0.20, 0.30, 0.40]", "normalized": [0.1, 0.2, 0.3, 0.4],
                    "pixels": [64, 96, 192, 192], "outcome": "ok"},
            "crop": {"width": 178, "height": 178, "rect": [39, 55, 217, 233]},
            "scores": {"macro": 2.5, "micro": 1.25}, "zoomed_image": 0, "gate": None,
            "stages": {"macro": {"ms": 10.0, "prompt_tokens": 600, "cached_tokens": 512},
                       "box": {"ms": 8.0, "prompt_tokens": 620, "cached_tokens": 0},
                       "micro": {"ms": 12.346, "prompt_tokens": 1300, "cached_tokens": 640},
                       "fusion": {"ms": 5.0, "prompt_tokens": 2600, "cached_tokens": 2400}}}
        # Not asked for: no trace at all.
        raw = (await http.post("/v1/chat/completions", json=body("Hi.", png_url()))).json()
        assert "dualfocus" not in raw and raw["choices"][0]["message"]["content"] == "a red square"


async def test_the_response_matches_the_published_schema_trace_included():
    async with serving() as (_, http):
        schema = (await http.get("/openapi.json")).json()
        ok = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
        components = schema["components"]["schemas"]
        assert set(components["DualFocusTrace"]["required"]) >= {"mode", "chosen", "box", "crop", "stages"}
        validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatCompletionResponse",
                                                     "components": schema["components"]})
        for extra in ({"dualfocus": {"return_trace": True}}, {}):
            validator.validate((await http.post("/v1/chat/completions", json=body("Hi.", png_url(), **extra))).json())
        broken = (await http.post("/v1/chat/completions",
                                  json=body("Hi.", png_url(), dualfocus={"return_trace": True}))).json()
        broken["dualfocus"]["box"]["pixels"] = [1, 2, 3]
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


# --- streaming -----------------------------------------------------------------------------------

async def test_a_stream_is_framed_as_server_sent_events_ending_in_done():
    async with serving() as (_, http):
        r = await http.post("/v1/chat/completions", json=body(
            "Say hello.", stream=True, stream_options={"include_usage": True}, dualfocus={"return_trace": True}))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
        assert deltas == ["Hel", "lo t", "here"]  # as the engine produced it, nothing repeated
        finish, usage = chunks[-2], chunks[-1]
        assert finish["choices"][0]["finish_reason"] == "length" and finish["dualfocus"]["mode"] == "macro"
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
        assert [c for c in chunks if "dualfocus" in c] == [finish]  # the trace once, on the last chunk

        # The official SDK reads the same stream.
        stream = await sdk(http).chat.completions.create(model=MODEL, messages=user("Say hello."), stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "Hello there"


async def test_a_dualfocus_answer_streams_in_one_chunk_once_chosen():
    async with serving() as (_, http):
        r = await http.post("/v1/chat/completions", json=body("What colour?", png_url(), stream=True))
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "a red square", None]
        assert "dualfocus" not in chunks[-1]


async def test_a_failure_after_the_stream_started_is_an_error_event():
    async def fail(query):
        raise GenerationFailedError("the engine failed")

    async with serving(FakeEngine(behaviour=fail)) as (_, http):
        r = await http.post("/v1/chat/completions", json=body("Hi.", stream=True))
        events = sse_events(r.text)
        assert r.status_code == 200 and "[DONE]" not in events
        assert json.loads(events[-1]) == {"error": {"message": "the engine failed", "type": "server_error",
                                                    "param": None, "code": "engine_error"}}


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, status, kind, code, param, retry_after", [
    (InvalidRequestError("the prompt is longer than the context", param="messages"), 400, "invalid_request_error",
     None, "messages", None),
    (RequestRefusedError("the engine's queue is full", 503), 503, "service_unavailable", None, None, "1"),
    (RetryableEngineError("the engine failed this request twice; please retry"), 503, "service_unavailable",
     "engine_retryable_error", None, "1"),
    (GenerationFailedError("the engine failed"), 500, "server_error", "engine_error", None, None),
    (EngineDeadError("the engine has stopped"), 503, "service_unavailable", "engine_dead", None, None),
])
async def test_engine_errors_become_openai_shaped_errors(error, status, kind, code, param, retry_after):
    async def fail(query):
        raise error

    async with serving(FakeEngine(behaviour=fail)) as (_, http):
        r = await http.post("/v1/chat/completions", json=body("Hi."), headers={"X-Request-Id": "e-1"})
        assert r.status_code == status and r.headers.get("retry-after") == retry_after
        assert r.json() == {"error": {"message": str(error), "type": kind, "param": param, "code": code}}
        assert r.headers["x-request-id"] == "e-1"


async def test_an_unexpected_engine_failure_is_a_500_that_says_nothing_more():
    async def bug(query):
        raise KeyError("secret internals")

    async with serving(FakeEngine(behaviour=bug)) as (_, http):
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk(http).chat.completions.create(model=MODEL, messages=user("Hi."))
        assert caught.value.body == {"message": "internal error", "type": "server_error", "param": None,
                                     "code": "internal_error"}


ASSISTANT_IMAGE = {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png_url()}}]}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("request_body, status, code, param", [
    (body(model="other"), 404, "model_not_found", "model"),
    (body(max_tokens=4096), 400, None, "max_tokens"),
    (body("Hi.", *[png_url()] * 5), 400, "too_many_images", "messages"),  # 4 per request by default
    (body(" "), 400, None, "messages.0.content"),
    (body(temperature=3), 400, None, "temperature"),
    (body(n=2), 400, None, "n"),
    ({"model": MODEL, "messages": []}, 400, None, "messages"),
    ({"model": MODEL, "messages": user("Hi.") + [{"role": "assistant", "content": "Hello."}]}, 400, None,
     "messages.1.role"),
    ({"model": MODEL, "messages": user("Hi.") + [ASSISTANT_IMAGE] + user("And?")}, 400, None, "messages.1.content"),
    ({"model": MODEL, "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {
        "url": png_url()}}]}] + user("Hi.")}, 400, None, "messages.0.content"),
    ({"model": MODEL, "messages": user("Hi.") + [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, 400,
     "tools_not_supported", "messages.1.role"),
    ({"model": MODEL, "messages": user("Hi.") + [{"role": "assistant", "tool_calls": [TOOL_CALL]}] + user("And?")},
     400, "tools_not_supported", "messages.1.tool_calls"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     None, "messages.0.content.0.type"),
    (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools_not_supported", "tools"),
    (body(tool_choice="required"), 400, "tools_not_supported", "tool_choice"),
    (body(modalities=["text", "audio"]), 400, None, "modalities"),
    (body(top_logprobs=3), 400, None, "top_logprobs"),
    (body(top_logprobs=21, logprobs=True), 400, None, "top_logprobs"),
    (body(response_format={"type": "json_schema"}), 400, None, "response_format.json_schema"),
])
async def test_requests_the_server_cannot_run_are_refused_before_the_engine(request_body, status, code, param):
    async with serving() as (app, http):
        r = await http.post("/v1/chat/completions", json=request_body)
        assert r.status_code == status and r.json()["error"]["code"] == code and r.json()["error"]["param"] == param
        assert app.state.engine.queries == []


async def test_a_conversation_becomes_history_and_the_question():
    async with serving() as (_, http):
        engine = http._transport.app.state.engine
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "developer", "content": [{"type": "text", "text": "No guessing."}]},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(64, 48)}},
                                                 {"type": "text", "text": "What is it?"}], "name": "ann"},
                    {"role": "assistant", "content": "A square."},
                    {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                                 {"type": "image_url", "image_url": {"url": png_url(32, 24)}}]}]
        await sdk(http).chat.completions.create(
            model=MODEL, messages=messages, logprobs=True, top_logprobs=2, presence_penalty=0.5, frequency_penalty=-1,
            logit_bias={"7": -100}, user="u1", metadata={"k": "v"}, parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
            extra_body={"ignore_eos": True})
        q = engine.queries[-1]
        assert [(t.role, t.text, [i.size for i in t.images]) for t in q.history] == [
            ("system", "Be brief.", []), ("system", "No guessing.", []), ("user", "What is it?", [(64, 48)]),
            ("assistant", "A square.", [])]
        assert q.question == "And this?" and [i.size for i in q.images] == [(32, 24)]
        assert [i.size for i in q.all_images] == [(64, 48), (32, 24)] and q.runs_as == "dualfocus"
        s = q.sampling
        assert (s.logprobs, s.presence_penalty, s.frequency_penalty, s.logit_bias) == (2, 0.5, -1, {"7": -100})
        assert s.ignore_eos
        assert s.json_schema == {"type": "object"} and not s.json_object
        # A follow-up without an image of its own still runs DualFocus, on the earlier image.
        await sdk(http).chat.completions.create(model=MODEL, messages=messages[:4] + [
            {"role": "user", "content": "And its colour?"}], response_format={"type": "json_object"})
        q = engine.queries[-1]
        assert q.images == [] and q.runs_as == "dualfocus" and q.sampling.json_object and q.sampling.logprobs is None


async def test_logprobs_come_back_in_openais_shape_streamed_or_not():
    from engine import TokenLogprob

    entries = [TokenLogprob("He", -0.5, [("He", -0.5), ("Hi", -1.5)]), TokenLogprob("llo", -0.25, [("llo", -0.25),
                                                                                                     ("y", -2.0)])]

    async def with_logprobs(query):
        return Result("Hello", "stop", single_pass_result("Hello").trace, entries)

    async with serving(FakeEngine(behaviour=with_logprobs)) as (_, http):
        r = await sdk(http).chat.completions.create(model=MODEL, messages=user("Hi."), logprobs=True, top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert [(c.token, c.logprob, c.bytes) for c in content] == [("He", -0.5, [72, 101]), ("llo", -0.25,
                                                                                              [108, 108, 111])]
        assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("llo", -0.25), ("y", -2.0)]
        stream = await sdk(http).chat.completions.create(model=MODEL, messages=user("Hi."), logprobs=True,
                                                         top_logprobs=2, stream=True)
        streamed = [e.token async for c in stream if c.choices and c.choices[0].logprobs
                    for e in c.choices[0].logprobs.content]
        assert streamed == ["He", "llo"]


async def test_a_refused_image_is_a_400_and_counted_by_reason():
    async with serving() as (app, http):
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(http).chat.completions.create(
                model=MODEL, messages=user("What?", "data:image/png;base64," + base64.b64encode(b"not").decode()))
        assert caught.value.code == "image_not_an_image" and app.state.engine.queries == []
        text = (await http.get("/metrics")).text
        assert metric(text, "dualfocus_image_errors_total", reason="not_an_image") == 1
        assert metric(text, "dualfocus_image_errors_total", reason="too_large") == 0


async def test_of_several_bad_images_the_first_in_message_order_is_the_error():
    not_an_image = "data:image/png;base64," + base64.b64encode(b"not").decode()
    not_a_url = "ftp://example.invalid/a.png"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}},
                                             {"type": "image_url", "image_url": {"url": not_an_image}},
                                             {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                             {"type": "image_url", "image_url": {"url": not_a_url}}]}]
    async with serving() as (app, http):
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(http).chat.completions.create(model=MODEL, messages=messages)
        assert caught.value.code == "image_not_an_image" and app.state.engine.queries == []
        messages[0]["content"][1]["image_url"]["url"] = png_url(20, 10)
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk(http).chat.completions.create(model=MODEL, messages=messages)
        assert caught.value.code == "image_url" and app.state.engine.queries == []
        messages[2]["content"][1]["image_url"]["url"] = png_url(30, 20)
        await sdk(http).chat.completions.create(model=MODEL, messages=messages)
        q = app.state.engine.queries[-1]
        assert [i.size for i in q.all_images] == [(320, 240), (20, 10), (30, 20)]


# --- admission and disconnects -------------------------------------------------------------------

async def test_beyond_the_in_flight_limit_requests_get_429_with_retry_after():
    engine = FakeEngine(behaviour=blocked_forever)
    async with serving(engine, max_inflight_requests=2) as (app, http):
        running = [asyncio.create_task(http.post("/v1/chat/completions", json=body("Hi."))) for _ in range(2)]
        while len(engine.queries) < 2:
            await asyncio.sleep(0.01)
        r = await http.post("/v1/chat/completions", json=body("Hi."))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "the server is at its limit of 2 requests in flight",
                                     "type": "rate_limit_error", "param": None, "code": "queue_full"}
        text = (await http.get("/metrics")).text
        assert metric(text, "dualfocus_rejected_requests_total", reason="queue_full") == 1
        assert metric(text, "dualfocus_inflight_requests") == 2 and len(engine.queries) == 2
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        assert app.state.inflight == 0


async def send_then_disconnect(app, engine: FakeEngine, payload: dict) -> list[dict]:
    """POST over raw ASGI; once the engine has the request, the client goes away. Returns what was sent."""
    data = json.dumps(payload).encode()
    sent, gone, delivered = [], asyncio.Event(), False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("test", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                         (b"x-request-id", b"gone-1")]}
    call = asyncio.create_task(app(scope, receive, send))
    while not engine.queries:
        await asyncio.sleep(0.01)
    gone.set()
    await asyncio.wait_for(call, 5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_cancels_its_engine_request(stream):
    engine = FakeEngine(behaviour=blocked_forever)
    async with serving(engine) as (app, _):
        await send_then_disconnect(app, engine, body("Hi.", stream=stream))
        assert engine.cancelled == ["gone-1"] and app.state.inflight == 0
        text = app.state.metrics.exposition().decode()
        assert metric(text, "dualfocus_requests_total", mode="macro", status="cancelled") == 1


# --- loading, failure, metrics -------------------------------------------------------------------

async def test_health_is_503_while_the_engine_loads_then_the_model_is_listed():
    loaded, engine = asyncio.Event(), FakeEngine()

    def load():  # the factory runs in a worker thread
        asyncio.run_coroutine_threadsafe(loaded.wait(), loop).result()
        return engine

    loop = asyncio.get_running_loop()
    async with serving(load, wait_ready=False) as (app, http):
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"] == "5"
        assert (await http.get("/v1/models")).status_code == 503
        loaded.set()
        while app.state.engine is None:
            await asyncio.sleep(0.01)
        assert (await http.get("/health")).json() == {"status": "ok"} and engine.warmed_up
        models = await sdk(http).models.list()
        card = models.data[0]
        assert (card.id, card.owned_by, card.max_model_len, card.family) == (MODEL, "dualfocus-serve", 4096, "llava")
    assert engine.shut_down  # the app built it, the app shuts it down


async def test_an_engine_handed_in_ready_belongs_to_the_caller():
    engine = FakeEngine()
    async with serving(engine) as (_, http):
        assert (await http.get("/health")).status_code == 200
    assert not engine.shut_down and not engine.warmed_up


async def test_an_engine_that_dies_turns_health_503_and_calls_the_failure_policy():
    failures, engine = [], FakeEngine()
    async with serving(engine, on_engine_failure=failures.append) as (app, http):
        engine.dead = True
        for _ in range(100):
            if failures:
                break
            await asyncio.sleep(0.05)
        assert failures == ["died"]
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        r = await http.post("/v1/chat/completions", json=body("Hi."))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert metric((await http.get("/metrics")).text, "dualfocus_rejected_requests_total", reason="engine_dead") == 1


async def test_an_engine_that_fails_to_start_calls_the_failure_policy():
    def load():
        raise RuntimeError("no such checkpoint")

    failures = []
    async with serving(load, on_engine_failure=failures.append, wait_ready=False) as (app, http):
        while not failures:
            await asyncio.sleep(0.01)
        assert failures == ["start"]
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_a_fresh_apps_metrics_show_every_known_series_at_zero():
    engine = FakeEngine(retries=2, scoring_recomputes=1)
    async with serving(engine, max_inflight_requests=7) as (_, http):
        text = (await http.get("/metrics")).text
        zero = {"dualfocus_requests_total": [{"mode": m, "status": s} for m in ("dualfocus", "auto", "macro")
                                             for s in ("ok", "error", "cancelled")],
                "dualfocus_rejected_requests_total": [{"reason": r} for r in
                                                      ("queue_full", "not_ready", "engine_dead", "unauthorized")],
                "dualfocus_image_errors_total": [{"reason": r} for r in
                                                 ("url", "bad_base64", "too_large", "not_found", "fetch",
                                                  "host_not_allowed", "address_not_public", "empty", "not_an_image",
                                                  "format", "too_many_pixels", "truncated")],
                "dualfocus_fusion_decisions_total": [{"chosen": c} for c in ("macro", "micro", "same")],
                "dualfocus_box_outcomes_total": [{"outcome": o} for o in
                                                 ("ok", "degenerate", "outside", "empty", "unparsed")],
                "dualfocus_prompt_tokens_total": [{"stage": s} for s in ("macro", "box", "micro", "fusion")],
                "dualfocus_cached_prompt_tokens_total": [{"stage": s} for s in ("macro", "box", "micro", "fusion")],
                "dualfocus_stage_seconds_count": [{"stage": s} for s in ("macro", "box", "micro", "fusion")],
                "dualfocus_zoom_decisions_total": [{"decision": d} for d in ("zoom", "skip")],
                "dualfocus_request_seconds_count": [{"mode": m} for m in ("dualfocus", "auto", "macro")]}
        for name, label_sets in zero.items():
            for labels in label_sets:
                assert metric(text, name, **labels) == 0, (name, labels)
        assert metric(text, "dualfocus_inflight_requests") == 0 and metric(text, "dualfocus_queue_depth") == 0
        assert metric(text, "dualfocus_max_inflight_requests") == 7
        # The engine's own counts, read through the engine protocol.
        assert metric(text, "dualfocus_pass_retries_total") == 2
        assert metric(text, "dualfocus_scoring_recomputes_total") == 1

        await http.post("/v1/chat/completions", json=body("Hi.", png_url()))
        text = (await http.get("/metrics")).text
        assert metric(text, "dualfocus_requests_total", mode="dualfocus", status="ok") == 1
        assert metric(text, "dualfocus_fusion_decisions_total", chosen="micro") == 1
        assert metric(text, "dualfocus_box_outcomes_total", outcome="ok") == 1
        assert metric(text, "dualfocus_prompt_tokens_total", stage="micro") == 1300
        assert metric(text, "dualfocus_cached_prompt_tokens_total", stage="fusion") == 2400


def test_the_wire_trace_names_the_same_values_as_the_engines_trace():
    # The wire models cannot import the engine (clients read traces without it): their literals
    # are written out, and must stay the engine's.
    from typing import get_args

    from engine.trace import BOX_OUTCOMES, CHOICES, MODES, GateTrace
    from server.chat_completions.protocol import BoxTrace, DualFocusOptions, DualFocusTrace
    from server.chat_completions.protocol import GateTrace as WireGateTrace

    assert get_args(DualFocusTrace.model_fields["mode"].annotation) == MODES
    assert get_args(get_args(DualFocusOptions.model_fields["mode"].annotation)[0]) == MODES
    assert list(WireGateTrace.model_fields) == [f.name for f in dataclasses.fields(GateTrace)]
    assert get_args(DualFocusTrace.model_fields["chosen"].annotation) == CHOICES
    assert get_args(BoxTrace.model_fields["outcome"].annotation) == BOX_OUTCOMES


# --- mode auto -----------------------------------------------------------------------------------

async def test_mode_auto_and_its_threshold_reach_the_engine_and_the_trace_says_why():
    async with serving() as (app, http):
        engine = app.state.engine
        response = await sdk(http).chat.completions.create(
            model=MODEL, messages=user("What colour is the square?", png_url()),
            extra_body={"dualfocus": {"mode": "auto", "zoom_threshold": 0.25, "zoom_threshold_choice": 0.125,
                                      "return_trace": True}})
        q = engine.queries[-1]
        assert q.mode == "auto" and q.runs_as == "auto" and (q.zoom_threshold, q.zoom_threshold_choice) == (0.25, 0.125)
        assert response.choices[0].message.content == "a square"
        assert response.dualfocus["mode"] == "auto" and response.dualfocus["why"] == "no zoom: confident"
        assert response.dualfocus["gate"] == {"zoomed": False, "why": "confident", "confidence": 0.875,
                                              "threshold": 0.5, "multiple_choice": False, "box_area": None,
                                              "max_box_area": 0.5,
                                              "box_aborted": True}
        assert response.dualfocus["box"] is None and list(response.dualfocus["stages"]) == ["macro"]
        # As published: the gate is in the OpenAPI schema, and a wrong type in it breaks the schema.
        schema = (await http.get("/openapi.json")).json()
        validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatCompletionResponse",
                                                     "components": schema["components"]})
        raw = (await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus={
            "mode": "auto", "return_trace": True}))).json()
        validator.validate(raw)
        raw["dualfocus"]["gate"]["zoomed"] = "maybe"
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(raw)
        # Without a threshold, the engine's own applies (None); other modes have no gate in their trace.
        await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus={"mode": "auto"}))
        assert engine.queries[-1].zoom_threshold is None and engine.queries[-1].zoom_threshold_choice is None
        raw = (await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus={"return_trace": True}))
               ).json()
        assert raw["dualfocus"]["mode"] == "dualfocus" and raw["dualfocus"]["gate"] is None


@pytest.mark.parametrize("options, param, says", [
    ({"mode": "auto", "zoom_threshold": 1.5}, "dualfocus.zoom_threshold", "less than or equal to 1"),
    ({"mode": "auto", "zoom_threshold": -0.1}, "dualfocus.zoom_threshold", "greater than or equal to 0"),
    ({"mode": "auto", "zoom_threshold": "high"}, "dualfocus.zoom_threshold", "valid number"),
    ({"mode": "dualfocus", "zoom_threshold": 0.5}, "dualfocus.zoom_threshold", "applies to mode auto only"),
    ({"zoom_threshold": 0.5}, "dualfocus.zoom_threshold", "mode dualfocus (the server's default)"),
    ({"mode": "auto", "zoom_threshold_choice": 2}, "dualfocus.zoom_threshold_choice", "less than or equal to 1"),
    ({"mode": "macro", "zoom_threshold_choice": 0.5}, "dualfocus.zoom_threshold_choice", "applies to mode auto only"),
    ({"mode": "zoom"}, "dualfocus.mode", "'dualfocus', 'auto' or 'macro'"),
])
async def test_a_bad_mode_or_threshold_is_a_400_naming_it(options, param, says):
    async with serving() as (app, http):
        r = await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus=options))
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and says in error["message"], error
        assert app.state.engine.queries == []


@pytest.mark.parametrize("extra, param", [
    ({"dualfocus": {"mode": "macro", "zoom_threshold": 0.5}}, "dualfocus.zoom_threshold"),
    ({"max_tokens": 10**6}, "max_tokens"),
])
async def test_a_request_refused_for_its_options_is_refused_before_its_images_are_decoded(extra, param):
    # The image is not a PNG: had it been decoded first, the error would be about the image.
    not_an_image = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    async with serving() as (_, http):
        r = await http.post("/v1/chat/completions", json={**body("Hi.", not_an_image), **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
        r = await http.post("/v1/chat/completions", json=body("Hi.", not_an_image))
        assert r.status_code == 400 and "image" in r.json()["error"]["message"], r.json()


async def test_the_default_mode_applies_to_requests_that_name_none():
    async with serving(default_mode="auto") as (app, http):
        engine = app.state.engine
        await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus={"zoom_threshold": 0.75}))
        assert engine.queries[-1].mode == "auto" and engine.queries[-1].zoom_threshold == 0.75
        await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus={"mode": "dualfocus"}))
        assert engine.queries[-1].mode == "dualfocus"  # a request's own mode wins
        await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi."}]})
        assert engine.queries[-1].mode == "auto" and engine.queries[-1].runs_as == "macro"  # no image: one pass
        text = (await http.get("/metrics")).text
        # Counted by the mode they ran in.
        assert [metric(text, "dualfocus_requests_total", mode=m, status="ok") for m in ("dualfocus", "auto", "macro")
                ] == [1, 1, 1]


def test_the_serve_command_takes_the_default_mode_and_the_gate_flags():
    from clients.cli import build_parser
    from engine.cli import engine_config

    args = build_parser().parse_args(["serve", "--default-mode", "auto", "--zoom-threshold", "0.3",
                                      "--zoom-threshold-choice", "0.2", "--zoom-max-box-area", "0.7"])
    assert args.default_mode == "auto"
    config = engine_config(args)
    assert (config.zoom_threshold, config.zoom_threshold_choice, config.zoom_max_box_area) == (0.3, 0.2, 0.7)
    defaults = engine_config(build_parser().parse_args(["serve"]))
    assert (defaults.zoom_threshold, defaults.zoom_threshold_choice) == (0.484, 0.0)  # calibrated on tiny-dualfocus
    assert build_parser().parse_args(["serve"]).default_mode == "dualfocus"
    for bad in (["--zoom-threshold", "2"], ["--zoom-threshold-choice", "-1"], ["--default-mode", "zoom"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])


def test_auto_dtype_is_float32_on_a_cpu_without_avx512_and_a_named_dtype_is_kept():
    from engine.config import cpu_dtype

    assert cpu_dtype("auto", "AVX2") == "float32" and cpu_dtype("auto", "NO AVX") == "float32"
    assert cpu_dtype("auto", "AVX512") == "auto" and cpu_dtype("auto", "SVE256") == "auto"
    assert cpu_dtype("bfloat16", "AVX2") == "bfloat16" and cpu_dtype("float16", "AVX512") == "float16"


async def test_zoom_decisions_are_counted_and_fusion_only_when_it_ran():
    results = iter([auto_result(zoomed=True), auto_result(zoomed=False), auto_result(zoomed=False)])

    async def scripted(query):
        return next(results)

    async with serving(FakeEngine(behaviour=scripted)) as (_, http):
        for _ in range(3):
            r = await http.post("/v1/chat/completions", json=body("Hi.", png_url(), dualfocus={"mode": "auto"}))
            assert r.status_code == 200
        text = (await http.get("/metrics")).text
        assert metric(text, "dualfocus_zoom_decisions_total", decision="zoom") == 1
        assert metric(text, "dualfocus_zoom_decisions_total", decision="skip") == 2
        assert metric(text, "dualfocus_requests_total", mode="auto", status="ok") == 3
        # Fusion ran once (micro won); the kept macro answers went through no fusion.
        assert metric(text, "dualfocus_fusion_decisions_total", chosen="micro") == 1
        assert metric(text, "dualfocus_fusion_decisions_total", chosen="macro") == 0
        assert metric(text, "dualfocus_box_outcomes_total", outcome="ok") == 1  # the aborted boxes: none
        assert metric(text, "dualfocus_stage_seconds_count", stage="box") == 1
