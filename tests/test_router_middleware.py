"""The image-affinity middleware (deploy/router/image_affinity.wasm) inside the real vllm-router, in
front of two stand-in workers that record what reaches them (no engine: what is under test is the
router's placement and the header the middleware sets, not the answer). tests/test_fleet.py runs it
in front of real replicas."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from loadtests import router_middleware
from loadtests.fleet import IMAGE_AFFINITY, ROUTER, free_port, stop_process, wait_http

from .conftest import data_url, scene


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def image_key(url: str) -> str:
    """The key the middleware gives a request whose first image is at `url`."""
    return f"image-{fnv1a64(url.encode()):016x}"


@dataclass
class Worker:
    """A stand-in worker: /health, /v1/models; a chat completion records its session header and body."""

    port: int = field(default_factory=free_port)
    seen: list[tuple[str | None, dict]] = field(default_factory=list)

    def serve(self) -> ThreadingHTTPServer:
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._answer(200, {"object": "list", "data": [{"id": "tiny-llava", "object": "model"}]})
                else:
                    self._answer(200 if self.path == "/health" else 404, {})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path != "/v1/chat/completions":
                    self._answer(404, {})  # e.g. the router's /v1/chat/completions/render for text prompts
                    return
                worker.seen.append((self.headers.get("x-session-id"), json.loads(body)))
                self._answer(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "tiny-llava",
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant", "content": str(worker.port)}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture(scope="module")
def routed(tmp_path_factory) -> Iterator[tuple[str, list[Worker]]]:
    workers = [Worker(), Worker()]
    servers = [w.serve() for w in workers]
    port, log = free_port(), Path(tmp_path_factory.mktemp("router")) / "router.log"
    router = subprocess.Popen(
        [*ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", "sticky_least_loaded",
         "--worker-urls", *(f"http://127.0.0.1:{w.port}" for w in workers),
         "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
         "--wasm-middleware", str(IMAGE_AFFINITY)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", router, log, timeout_s=60)
        yield f"http://127.0.0.1:{port}", workers
    finally:
        stop_process(router, timeout_s=15)
        for server in servers:
            server.shutdown()


def question(image_url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": text}]}]


def where(workers: list[Worker], message_text: str) -> tuple[int, str | None]:
    """Which worker got the request whose last text part is `message_text`, with its session key."""
    for i, worker in enumerate(workers):
        for key, body in worker.seen:
            if body["messages"][-1]["content"][-1]["text"] == message_text:
                return i, key
    raise AssertionError(f"no worker got {message_text!r}")


def test_the_committed_component_is_what_its_source_builds_to():
    assert router_middleware.main(["--check"]) == 0


def test_questions_about_one_image_share_a_key_and_a_worker(routed):
    url, workers = routed
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    images = [data_url(scene(seed=500 + i)) for i in range(6)]
    for k in range(3):  # three questions about each image, interleaved
        for i, image in enumerate(images):
            client.chat.completions.create(model="tiny-llava", messages=question(image, f"q{k} about {i}"))
    for i, image in enumerate(images):
        placed = [where(workers, f"q{k} about {i}") for k in range(3)]
        assert placed == [(placed[0][0], image_key(image))] * 3, placed
    # New images (sessions) go to the worker with fewer sessions: both are used.
    assert {where(workers, f"q0 about {i}")[0] for i in range(len(images))} == {0, 1}


def test_the_key_is_the_first_image_s_whatever_the_json_layout(routed):
    url, workers = routed
    image = data_url(scene(seed=600))
    later = [*question(image, "first turn"), {"role": "assistant", "content": "a square"},
             {"role": "user", "content": [{"type": "text", "text": "second turn"}]}]
    # The openai SDK's compact JSON, and an indented body from another client.
    openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.create(
        model="tiny-llava", messages=question(image, "compact"))
    r = httpx.post(url + "/v1/chat/completions", timeout=30, headers={"content-type": "application/json"},
                   content=json.dumps({"model": "tiny-llava", "messages": later}, indent=2))
    assert r.status_code == 200, r.text
    assert where(workers, "compact") == where(workers, "second turn") == (where(workers, "compact")[0],
                                                                           image_key(image))


def test_a_client_key_wins_and_text_requests_get_none(routed):
    url, workers = routed
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    client.chat.completions.create(model="tiny-llava", messages=question(data_url(scene(seed=700)), "keyed"),
                                   extra_headers={"X-Session-ID": "conversation-42"})
    assert where(workers, "keyed")[1] == "conversation-42"
    client.chat.completions.create(model="tiny-llava",
                                   messages=[{"role": "user", "content": [{"type": "text", "text": "no image"}]}])
    assert where(workers, "no image")[1] is None


def test_a_body_over_the_middleware_limit_is_refused_with_413(routed):
    """The router hands the middleware at most 10 MiB of body and refuses larger requests
    (docs/deploy.md, "Many replicas")."""
    url, workers = routed
    before = sum(len(w.seen) for w in workers)
    big = "data:image/png;base64," + "A" * (10 * 1024 * 1024)
    r = httpx.post(url + "/v1/chat/completions", timeout=30,
                   json={"model": "tiny-llava", "messages": question(big, "too big")})
    assert r.status_code == 413
    assert sum(len(w.seen) for w in workers) == before
