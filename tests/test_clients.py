"""The Python client and `dualfocus ask`, against a running server."""

import io
import json
import subprocess
import sys

import pytest
from PIL import Image, ImageChops

from clients.python import (
    AsyncDualFocusClient,
    AuthenticationFailed,
    BadRequest,
    DualFocusClient,
    ModelNotFound,
    RateLimited,
    ServerUnreachable,
)

from .conftest import RunningServer, scene

pytestmark = pytest.mark.server
KEY = RunningServer.API_KEY


@pytest.fixture(scope="module")
def client(server):
    return DualFocusClient(server.base_url, api_key=KEY)


def check(result, image):
    assert result.mode == "dualfocus" and result.chosen in ("macro", "micro", "same")
    assert result.answer == (result.micro_answer if result.chosen == "micro" else result.macro_answer)
    x1, y1, x2, y2 = result.box
    assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height
    assert {"macro", "box"} <= set(result.stages) and result.stages["box"].prompt_tokens > 576
    assert result.usage.prompt_tokens == sum(s.prompt_tokens for s in result.stages.values())


def test_ask_takes_a_path_a_pil_image_or_bytes(client, tmp_path):
    image = scene(seed=21)
    image.save(tmp_path / "a.png")
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    results = [client.ask(tmp_path / "a.png", "What is it?", max_tokens=8),
               client.ask(str(tmp_path / "a.png"), "What is it?", max_tokens=8),
               client.ask(image, "What is it?", max_tokens=8),
               client.ask(buf.getvalue(), "What is it?", max_tokens=8)]
    for result in results:
        check(result, image)
    # The same PNG twice, by Path and by str: the same greedy answer.
    assert results[0].answer == results[1].answer


def test_macro_mode_and_text_only(client):
    r = client.ask(scene(seed=22), "What is it?", mode="macro", max_tokens=5)
    assert r.mode == "macro" and r.micro_answer is None and r.answer == r.macro_answer
    r = client.ask(None, "Say hi.", max_tokens=5)
    assert r.why == "no image: one plain pass" and r.usage.completion_tokens == 5


def test_the_image_goes_before_the_question():
    """So that a router matching request bodies by prefix sees questions about one image share one."""
    from clients.python.client import _request

    request = _request("tiny-llava", scene(seed=23), "What is it?", "dualfocus", 8, False)
    [message] = request["messages"]
    assert [part["type"] for part in message["content"]] == ["image_url", "text"]
    assert message["content"][1]["text"] == "What is it?"
    assert [p["type"] for p in _request("m", None, "Hi", "macro", 8, False)["messages"][0]["content"]] == ["text"]


def test_ask_many_keeps_order_and_reports_failures_in_place(client):
    images = [scene(seed=30 + i) for i in range(5)]
    items = [(image, f"Question {i}?") for i, image in enumerate(images)]
    items.insert(2, (b"not an image", "broken"))
    results = client.ask_many(items, concurrency=3, progress=False, max_tokens=6)
    assert isinstance(results[2], BadRequest) and "not an image" in str(results[2])
    for result, image in zip(results[:2] + results[3:], images, strict=True):
        check(result, image)


async def test_async_client_ask_and_ask_many(server):
    client = AsyncDualFocusClient(server.base_url, api_key=KEY)
    image = scene(seed=40)
    check(await client.ask(image, "Where?", max_tokens=6), image)
    results = await client.ask_many([(scene(seed=41 + i), "What?") for i in range(4)], concurrency=2,
                                    progress=False, max_tokens=6)
    assert len(results) == 4 and all(r.chosen in ("macro", "micro", "same") for r in results)
    await client.close()


def test_server_errors_become_typed_exceptions(server, client):
    with pytest.raises(AuthenticationFailed) as e:
        DualFocusClient(server.base_url, api_key="wrong").ask(None, "hi")
    assert e.value.status == 401
    with pytest.raises(ModelNotFound) as e:
        DualFocusClient(server.base_url, api_key=KEY, model="gpt-4o").ask(None, "hi")
    assert e.value.status == 404 and "tiny-llava" in e.value.message
    with pytest.raises(BadRequest) as e:
        client.ask(Image.new("RGB", (2000, 1000)), "too big?")
    assert e.value.status == 413 and e.value.code == "image_too_many_pixels"
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        DualFocusClient("http://127.0.0.1:9", max_retries=0).ask(None, "hi")


async def test_rate_limited_carries_retry_after(server):
    client = AsyncDualFocusClient(server.base_url, api_key=KEY, max_retries=0)
    results = await client.ask_many([(None, f"Count {i}.") for i in range(10)], concurrency=10, progress=False,
                                    max_tokens=400)
    limited = [r for r in results if isinstance(r, RateLimited)]
    assert limited and all(r.status == 429 and r.retry_after == 1.0 for r in limited)
    await client.close()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "clients", "ask", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_the_answer_and_trace_and_draws_where_it_looked(server, tmp_path):
    image = scene(seed=50)
    image.save(tmp_path / "in.png")
    out = _cli(str(tmp_path / "in.png"), "What colour is the square?", "--url", server.base_url, "--api-key", KEY,
               "--max-tokens", "8", "--draw", str(tmp_path / "out.png"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0]  # the answer comes first
    assert any(line.startswith("chosen") for line in lines) and any(line.startswith("box ") for line in lines)

    as_json = json.loads(_cli(str(tmp_path / "in.png"), "What colour is the square?", "--url", server.base_url,
                              "--api-key", KEY, "--max-tokens", "8", "--json").stdout)
    assert as_json["answer"] == lines[0]
    drawn = Image.open(tmp_path / "out.png")
    assert drawn.format == "PNG" and drawn.size == image.size
    x1, y1, x2, y2 = as_json["box"]
    diff = ImageChops.difference(drawn.convert("RGB"), image)
    assert diff.getpixel((x1, y1)) != (0, 0, 0)  # the box outline is drawn at its corner
    cx1, cy1, cx2, cy2 = as_json["crop"]
    assert diff.getpixel((cx2 - 1, cy2 - 1)) != (0, 0, 0)  # and the crop's
    assert diff.getbbox() is not None


def test_cli_says_clearly_what_went_wrong(server, tmp_path):
    out = _cli(str(tmp_path / "missing.png"), "q", "--url", server.base_url)
    assert out.returncode == 2 and "cannot read image" in out.stderr
    (tmp_path / "in.png").write_bytes(b"garbage")
    assert "cannot read image" in _cli(str(tmp_path / "in.png"), "q", "--url", server.base_url).stderr
    scene().save(tmp_path / "ok.png")
    out = _cli(str(tmp_path / "ok.png"), "q", "--url", "http://127.0.0.1:9")
    assert out.returncode == 1 and "cannot reach the DualFocus server" in out.stderr
    out = _cli(str(tmp_path / "ok.png"), "q", "--url", server.base_url, "--api-key", "wrong")
    assert out.returncode == 1 and "401" in out.stderr


def test_mode_auto_from_the_client_and_the_cli(client, server, tmp_path):
    image = scene(seed=51)
    kept = client.ask(image, "What colour is the square?", mode="auto", zoom_threshold=0.0, max_tokens=6)
    assert kept.mode == "auto" and kept.gate.threshold == 0.0 and not kept.gate.zoomed
    assert kept.gate.why == "confident" and 0 < kept.gate.confidence <= 1
    assert kept.micro_answer is None and "micro" not in kept.stages and kept.answer == kept.macro_answer
    with pytest.raises(BadRequest, match="zoom_threshold"):
        client.ask(image, "What colour is the square?", mode="auto", zoom_threshold=1.5)

    image.save(tmp_path / "in.png")
    out = _cli(str(tmp_path / "in.png"), "What colour is the square?", "--url", server.base_url, "--api-key", KEY,
               "--max-tokens", "6", "--mode", "auto", "--zoom-threshold", "0")
    assert out.returncode == 0, out.stderr
    (zoom_row,) = [line for line in out.stdout.splitlines() if line.startswith("zoom")]
    assert zoom_row.split(None, 1)[1].startswith("no: confident (confidence ") and "threshold 0.0" in zoom_row
    as_json = json.loads(_cli(str(tmp_path / "in.png"), "What colour is the square?", "--url", server.base_url,
                              "--api-key", KEY, "--max-tokens", "6", "--mode", "auto", "--zoom-threshold", "1",
                              "--json").stdout)
    assert as_json["mode"] == "auto" and as_json["gate"]["threshold"] == 1.0
    # Threshold 1: the gate zooms unless the box gives nothing to zoom into (random weights draw any box).
    assert as_json["gate"]["zoomed"] == (as_json["micro_answer"] is not None)
    assert as_json["gate"]["zoomed"] or as_json["gate"]["why"].startswith("box")
