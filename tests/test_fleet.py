"""Two real replicas behind the real vllm-router (loadtests/fleet.py, as `make fleet` runs them, with
the image-affinity middleware): DualFocus requests pass through with their extension and trace, and a
question about an image lands on the replica that holds the image's KV from an earlier question,
without the client sending any key."""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import openai
import pytest

from loadtests.fleet import Fleet, metric, metric_samples

from .conftest import data_url, scene

pytestmark = pytest.mark.server  # replicas are `dualfocus serve` subprocesses


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    running = Fleet(2, "sticky_least_loaded", serve_flags=["--kv-cache-gib", "1"],
                    logs=tmp_path_factory.mktemp("fleet"))
    with running:
        yield running


def served_by(fleet: Fleet, index: int) -> float:
    """Requests replica `index` has answered since it started."""
    return metric(metric_samples(fleet.members[index].url + "/metrics"), "dualfocus_requests_total")


def served(fleet: Fleet) -> list[float]:
    return [served_by(fleet, i) for i in range(len(fleet.members))]


def question(image_url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": text}]}]


def test_dualfocus_passes_through_the_router_with_its_trace(fleet):
    for path in ("/health", "/readiness", "/liveness"):  # the router's probes in deploy/k8s
        assert httpx.get(fleet.url + path, timeout=10).status_code == 200, path
    before = served(fleet)
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.chat.completions.create(model="tiny-llava", max_tokens=8,
                                       messages=question(data_url(scene(seed=41)), "What colour is the square?"),
                                       extra_body={"dualfocus": {"mode": "dualfocus", "return_trace": True}})
    trace = r.model_extra["dualfocus"]
    assert trace["mode"] == "dualfocus" and {"box", "macro", "micro"} <= set(trace["stages"])
    assert trace["chosen"] in {"macro", "micro", "same"}
    assert r.choices[0].message.content
    # The micro pass extends the box pass's prompt on the same replica: its image came from cache.
    assert trace["stages"]["micro"]["cached_tokens"] > 0
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert sum(served(fleet)) - sum(before) == 1


def test_a_follow_up_question_lands_where_its_image_is_cached(fleet):
    """Questions about six images spread over both replicas; each image's second question must read
    the image's KV from cache, which only the first replica holds. The client sends no key: the
    router's middleware keys each request by its image (without it, sticky_least_loaded sends every
    keyless request to one replica and the spread fails). Two at a time: the router's middleware
    queue answers 503 to a burst beyond 2 x its worker threads (docs/deploy.md, "Many replicas")."""
    images = [data_url(scene(seed=100 + i)) for i in range(6)]

    async def rounds():
        client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0, timeout=300)
        two_at_a_time = asyncio.Semaphore(2)

        async def ask(image_url: str, text: str):
            async with two_at_a_time:
                return await client.chat.completions.create(
                    model="tiny-llava", max_tokens=4, messages=question(image_url, text),
                    extra_body={"dualfocus": {"mode": "macro"}})

        before = served(fleet)
        firsts = await asyncio.gather(*(ask(url, "What colour is the square?") for url in images))
        spread = [after - b for after, b in zip(served(fleet), before, strict=True)]
        follow_ups = await asyncio.gather(*(ask(url, "Where is the disc?") for url in images))
        await client.close()
        return firsts, spread, follow_ups

    firsts, spread, follow_ups = asyncio.run(rounds())
    assert min(spread) > 0, f"the first questions all went to one replica: {spread}"
    image_tokens = 576  # tiny-llava: a 336x336 CLIP grid, like LLaVA-1.5
    # Images never seen before: nothing of theirs cached. (The template's text before the image is the
    # same in every request: its whole 32-token blocks are.)
    assert all((r.usage.prompt_tokens_details.cached_tokens or 0) < 0.25 * image_tokens for r in firsts), [
        r.usage.prompt_tokens_details.cached_tokens for r in firsts]
    cached = [r.usage.prompt_tokens_details.cached_tokens or 0 for r in follow_ups]
    # Most of the image read from cache (vLLM caches whole blocks); on the other replica: 0.
    assert all(c >= 0.75 * image_tokens for c in cached), cached


def router_view(fleet: Fleet, url: str) -> float:
    """The router's health gauge for one worker (1 healthy, 0 not)."""
    samples = fleet.router_metrics()
    return metric({k: v for k, v in samples.items() if dict(k[1]).get("worker") == url}, "vllm_router_worker_health")


def wait_for(condition, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.25)
    return time.monotonic() - t0


def test_a_killed_replica_is_routed_around_and_taken_back(fleet):
    """SIGKILL one replica under load: requests in flight on it end with an error answer (no hang),
    the router takes it out within seconds and the other replica answers everything; started again,
    the router takes it back and requests keep succeeding."""
    # These requests carry their own X-Session-ID, and their bursts of 8 exceed the router's middleware
    # queue (2 x its worker threads: 503 beyond it; docs/deploy.md), which is not what this test is about.
    fleet.restart_router("sticky_least_loaded", image_affinity=False)
    victim = fleet.members[1]
    images = [data_url(scene(seed=200 + i)) for i in range(8)]

    async def burst(urls: list[str]) -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(url: str):
                try:
                    return await client.post(fleet.url + "/v1/chat/completions", json={
                        "model": "tiny-llava", "max_tokens": 8, "messages": question(url, "What is on the right?"),
                        "dualfocus": {"mode": "dualfocus"}},
                        headers={"X-Session-ID": hashlib.sha256(url.encode()).hexdigest()[:32]})
                except httpx.HTTPError as e:
                    return e
            return await asyncio.gather(*(one(u) for u in urls))

    async def kill_during(urls: list[str]):
        task = asyncio.create_task(burst(urls))
        await asyncio.sleep(0.5)  # the requests are in flight on both replicas
        fleet.kill_replica(1)
        return await task

    during = asyncio.run(kill_during(images))
    for r in during:
        assert isinstance(r, httpx.Response), f"no HTTP answer: {r!r}"
        assert r.status_code == 200 or (r.status_code >= 500 and r.text), (r.status_code, r.text)
    wait_for(lambda: router_view(fleet, victim.url) == 0, 30, "the router marks the killed replica unhealthy")

    before = served_by(fleet, 0)  # replica 1 is gone
    after_kill = asyncio.run(burst([data_url(scene(seed=300 + i)) for i in range(4)]))
    assert [r.status_code for r in after_kill] == [200] * 4, [getattr(r, "text", r) for r in after_kill]
    assert served_by(fleet, 0) - before == 4, "the surviving replica answered them"

    fleet.restart_replica(1)
    wait_for(lambda: router_view(fleet, victim.url) == 1, 60, "the router takes the replica back")
    back = asyncio.run(burst([data_url(scene(seed=400 + i)) for i in range(6)]))
    assert [r.status_code for r in back] == [200] * 6, [getattr(r, "text", r) for r in back]
    # Not asserted: that new sessions land on the restarted replica. Its circuit breaker, opened by
    # the failed sends, keeps it out for --cb-timeout-duration-secs (60 s) after the kill even once
    # healthy, and this replica is back sooner (docs/reliability.md, "A replica dies behind the router").
