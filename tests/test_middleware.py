"""The request-id and body-limit middleware on a bare app (no engine): chunked bodies are held
to the limit, and a failure no handler knows still gets a 500 in OpenAI's shape with the id."""

import httpx
import pytest
from fastapi import FastAPI

from server.app import RequestIdAndBodyLimit
from server.errors import install_error_handlers


@pytest.fixture
def client():
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdAndBodyLimit, max_body_bytes=100)

    @app.post("/echo")
    async def echo(body: dict):
        return body

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def chunked(text: str):
    async def body():  # no Content-Length: httpx sends it chunked
        for i in range(0, len(text), 16):
            yield text[i:i + 16].encode()
    return body()


async def test_a_chunked_body_over_the_limit_is_413(client):
    r = await client.post("/echo", content=chunked('{"a": "' + "x" * 500 + '"}'),
                          headers={"Content-Type": "application/json", "X-Request-Id": "big-1"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "big-1"
    assert r.json()["error"]["message"] == "request body is larger than 100 bytes"


async def test_a_chunked_body_under_the_limit_reaches_the_app_whole(client):
    r = await client.post("/echo", content=chunked('{"a": "' + "x" * 60 + '"}'),
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json() == {"a": "x" * 60}


async def test_an_unexpected_failure_is_a_500_in_openai_shape_with_the_request_id(client):
    r = await client.get("/boom", headers={"X-Request-Id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json() == {"error": {"message": "internal error", "type": "server_error", "param": None,
                                  "code": "internal_error"}}
