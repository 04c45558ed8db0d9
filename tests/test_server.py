"""The HTTP service through the official openai SDK, as apps call it."""

import asyncio
import json

import httpx
import openai
import pytest
from PIL import Image

from loadtests.soak import wait_idle

from .conftest import RunningServer, data_url, scene

pytestmark = pytest.mark.server
MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=RunningServer.API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=RunningServer.API_KEY, max_retries=0)


def image_message(text, image):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}}]}]


def check_trace(trace, answer, image):
    assert trace["mode"] == "dualfocus"
    assert trace["chosen"] in ("macro", "micro", "same")
    assert answer == (trace["micro_answer"] if trace["chosen"] == "micro" else trace["macro_answer"])
    box = trace["box"]
    assert box["text"].startswith("[") and len(box["normalized"]) == 4
    bx1, by1, bx2, by2 = box["pixels"]  # the model's box in the image's pixels
    assert 0 <= bx1 <= bx2 <= image.width and 0 <= by1 <= by2 <= image.height
    nx1, ny1, nx2, ny2 = box["normalized"]  # as the model wrote it (LLaVA: 0-1 of width and height)
    assert [bx1, bx2] == sorted([round(nx1 * image.width), round(nx2 * image.width)])
    assert [by1, by2] == sorted([round(ny1 * image.height), round(ny2 * image.height)])
    if trace["crop"] is not None:
        x1, y1, x2, y2 = trace["crop"]["rect"]
        assert 0 <= x1 < x2 < image.width and 0 <= y1 < y2 < image.height
        assert (trace["crop"]["width"], trace["crop"]["height"]) == (x2 - x1, y2 - y1)
        assert trace["stages"]["micro"]["cached_tokens"] >= 512
    assert set(trace["stages"]) >= {"macro", "box"}


def test_health_was_503_while_loading_then_200(server):
    assert server.health_statuses[-1] == 200
    assert 503 in server.health_statuses  # the fixture polled from the start


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == 4096


def test_chat_with_image_returns_the_fused_answer_and_trace(client):
    image = scene(seed=1)
    r = client.chat.completions.create(model=MODEL, messages=image_message("What colour is the square?", image),
                                       max_tokens=12, extra_body={"dualfocus": {"return_trace": True}})
    answer = r.choices[0].message.content
    check_trace(r.dualfocus, answer, image)
    assert r.usage.prompt_tokens == sum(s["prompt_tokens"] for s in r.dualfocus["stages"].values())
    cached = sum(s["cached_tokens"] for s in r.dualfocus["stages"].values())
    assert r.usage.prompt_tokens_details.cached_tokens == cached
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert r.id.startswith("chatcmpl-") and r.choices[0].finish_reason in ("stop", "length")


def test_without_return_trace_there_is_no_trace(client):
    r = client.chat.completions.create(model=MODEL, messages=image_message("Where?", scene(seed=2)), max_tokens=4)
    assert getattr(r, "dualfocus", None) is None and r.choices[0].message.content


def test_streamed_dualfocus_answer_ends_with_trace_and_usage(client):
    image = scene(seed=3)
    stream = client.chat.completions.create(
        model=MODEL, messages=image_message("What is on the left?", image), max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"dualfocus": {"return_trace": True}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and getattr(finals[0], "dualfocus", None)
    check_trace(finals[0].dualfocus, text, image)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 1000


async def test_async_macro_mode_streams_tokens_as_generated(aclient):
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=image_message("Describe it.", scene(seed=4)), max_tokens=16, stream=True,
        extra_body={"dualfocus": {"mode": "macro", "return_trace": True}})
    chunks = [c async for c in stream]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 3  # token by token, not one block
    trace = chunks[-1].dualfocus
    assert trace["mode"] == "macro" and trace["micro_answer"] is None and trace["macro_answer"] == "".join(contents)


async def test_async_text_only_chat(aclient):
    r = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                              max_completion_tokens=6, extra_body={"dualfocus": {"return_trace": True}})
    assert r.dualfocus["mode"] == "macro" and r.dualfocus["why"] == "no image: one plain pass"
    assert r.choices[0].message.content == r.dualfocus["macro_answer"]
    assert r.usage.completion_tokens == 6


def test_metrics_count_known_requests_and_carry_vllm_series(server, client):
    before = server.metrics()
    n = 3
    for i in range(n):
        r = client.chat.completions.create(model=MODEL, messages=image_message(f"Question {i}?", scene(seed=10 + i)),
                                           max_tokens=8, extra_body={"dualfocus": {"return_trace": True}})
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("dualfocus_requests_total", mode="dualfocus", status="ok") == n
    assert delta("dualfocus_request_seconds_count", mode="dualfocus") == n
    assert delta("dualfocus_stage_seconds_count", stage="box") == n
    assert sum(delta("dualfocus_fusion_decisions_total", chosen=c) for c in ("macro", "micro", "same")) == n
    assert sum(delta("dualfocus_box_outcomes_total", outcome=o)
               for o in ("ok", "degenerate", "outside", "empty", "unparsed")) == n
    last = r.dualfocus["stages"]["box"]
    assert delta("dualfocus_prompt_tokens_total", stage="box") >= last["prompt_tokens"]
    assert delta("dualfocus_cached_prompt_tokens_total", stage="micro") > 0
    names = {name for name, _ in after}
    assert {"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_requests_running"} <= names


def test_promtool_finds_nothing_wrong_with_our_metrics(server):
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by the test set-up (Debian's prometheus package)"
    text = httpx.get(server.base_url + "/metrics").text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    problems = (out.stdout + out.stderr).strip().splitlines()
    # The whole exposition parses (a parse error names no series). promtool's linter also flags
    # vLLM's own names, which use ':' (a convention for recording rules, legal in exposition);
    # they keep vLLM's names so vLLM's dashboards work. Ours must draw no complaint at all.
    assert problems and all(p.startswith("vllm:") for p in problems), problems
    ours = "\n".join(line for line in text.splitlines() if "dualfocus_" in line) + "\n"
    out = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True)
    assert out.returncode == 0 and (out.stdout + out.stderr).strip() == "", out.stdout + out.stderr


# --- errors --------------------------------------------------------------------------------------

def test_wrong_or_missing_key_is_401_but_health_and_metrics_stay_open(server):
    before = server.value("dualfocus_rejected_requests_total", reason="unauthorized")
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert server.value("dualfocus_rejected_requests_total", reason="unauthorized") == before + 2
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_local_image_under_the_allowed_folder_is_served(server, client):
    image = scene(500, 400, seed=6)
    image.save(server.media_dir / "scene.png")
    r = client.chat.completions.create(
        model=MODEL, max_tokens=6, extra_body={"dualfocus": {"return_trace": True}},
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {
            "type": "image_url", "image_url": {"url": f"file://{server.media_dir}/scene.png"}}]}])
    check_trace(r.dualfocus, r.choices[0].message.content, image)


def test_too_many_pixels_is_413_before_decoding(server, client):
    before = server.value("dualfocus_image_errors_total", reason="too_many_pixels")
    big = Image.new("RGB", (2000, 1000), (0, 0, 0))  # 2 Mpx against the server's 1 Mpx limit
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=image_message("what?", big))
    assert e.value.status_code == 413 and e.value.body["code"] == "image_too_many_pixels"
    assert server.value("dualfocus_image_errors_total", reason="too_many_pixels") == before + 1


def test_body_over_the_limit_is_413(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"x" * 4_100_000,
                   headers={"Authorization": f"Bearer {RunningServer.API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


async def test_over_the_inflight_limit_is_429_with_retry_after(server, aclient):
    async def one(i):
        try:
            await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count {i}."}],
                                                  max_tokens=400)
            return 200
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] == "1" and e.body["code"] == "queue_full"
            return 429

    before = server.value("dualfocus_rejected_requests_total", reason="queue_full")
    statuses = await asyncio.gather(*[one(i) for i in range(10)])
    assert statuses.count(429) > 0 and statuses.count(200) >= 4  # the limit is 4 in flight
    assert server.value("dualfocus_rejected_requests_total", reason="queue_full") == before + statuses.count(429)
    assert server.value("dualfocus_max_inflight_requests") == 4


def _wait_idle(server):
    """No request left here or in vLLM, and every KV-cache block it held released."""
    return wait_idle(server.base_url, timeout=15.0, poll_s=0.2)


def test_client_disconnect_mid_stream_aborts_every_sequence(server):
    before = server.value("dualfocus_requests_total", status="cancelled")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000,
            "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {RunningServer.API_KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.value("dualfocus_inflight_requests") == 1
    assert _wait_idle(server)
    assert server.value("dualfocus_requests_total", status="cancelled") == before + 1


async def test_client_disconnect_without_streaming_aborts_too(server):
    before = server.value("dualfocus_requests_total", status="cancelled")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {RunningServer.API_KEY}"}) as http:
        request = asyncio.create_task(http.post(server.base_url + "/v1/chat/completions", json=body, timeout=60))
        for _ in range(100):
            await asyncio.sleep(0.1)
            if await asyncio.to_thread(server.value, "dualfocus_inflight_requests") == 1:
                break
        assert not request.done(), "the request finished before the client could leave"
        request.cancel()  # the client goes away: its connection closes
        await asyncio.gather(request, return_exceptions=True)
    assert await asyncio.to_thread(_wait_idle, server)
    assert server.value("dualfocus_requests_total", status="cancelled") == before + 1


def test_request_id_is_echoed(server):
    r = httpx.get(server.base_url + "/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert json.loads(r.text) == {"status": "ok"}
