"""Reliability and security of the running service (issue 5): a bad request hurts only itself,
image fetches never reach internal addresses, every log line names its request and holds no
secrets, images never touch the disk. (Overload: test_overload.py; fuzzing: test_fuzz.py.)"""

import base64
import io
import os
import random
import re
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import PRIVATE_IMAGE_HOST, PUBLIC_IMAGE_HOST, RunningServer, data_url, scene

pytestmark = pytest.mark.server
MODEL = "tiny-llava"
AUTH = {"Authorization": f"Bearer {RunningServer.API_KEY}"}


def post(server, body=None, content=None, headers=AUTH, timeout=120) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, content=content, timeout=timeout,
                      headers={**headers, "Content-Type": "application/json"})


def ask(url: str, text: str = "What is it?", **extra) -> dict:
    return {"model": MODEL, "max_tokens": 4, **extra,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def bomb_png(side: int) -> bytes:
    """A valid grey PNG of side x side pixels: a few hundred KB that inflate to side² bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (side + 1)  # filter byte + one byte per pixel
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _jpeg_half() -> str:
    prefix, payload = data_url(scene(), "JPEG").split(",", 1)
    return prefix + "," + payload[: len(payload) // 8 * 4]  # half the JPEG, still valid base64


def _gif() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "GIF")
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()


TEXT = [{"role": "user", "content": "hi"}]
GOOD_IMAGE = data_url(scene(320, 240, seed=3))

# name -> (request body or raw bytes, expected status, expected error code or param (None: any))
BAD_REQUESTS = {
    "invalid JSON": (b"{not json", 400, None),
    "no messages": ({"model": MODEL}, 400, "messages"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "messages"),
    "unknown role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    "unknown part type": ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": "x"}]}]}, 400, None),
    "image in a system message": ({"model": MODEL, "messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": GOOD_IMAGE}}]}, *TEXT]}, 400, "messages.0.content"),
    "ends with an assistant turn": ({"model": MODEL, "messages": [*TEXT, {"role": "assistant", "content": "hello"}]},
                                    400, "messages.1.role"),
    "tool message": ({"model": MODEL, "messages": [*TEXT, {"role": "tool", "content": "4", "tool_call_id": "c"}]},
                     400, "tools_not_supported"),
    "tools": ({"model": MODEL, "messages": TEXT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
              "tools_not_supported"),
    "no text": ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": GOOD_IMAGE}}]}]}, 400, "messages.0.content"),
    "bad base64": (ask("data:image/png;base64,!!!notbase64!!!"), 400, "image_bad_base64"),
    "not an image": (ask("data:image/png;base64,aGVsbG8gd29ybGQ="), 400, "image_not_an_image"),
    "truncated image": (ask(_jpeg_half()), 400, "image_truncated"),
    "empty image": (ask("data:image/png;base64,"), 400, "image_empty"),
    "GIF image": (ask(_gif()), 400, "image_format"),
    "decompression bomb": (ask(png_data_url(bomb_png(20_000))), 413, "image_too_many_pixels"),
    "too many images": ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "compare"}, *[{"type": "image_url", "image_url": {"url": GOOD_IMAGE}}] * 5]}]}, 400,
        "too_many_images"),
    "ftp URL": (ask("ftp://images.example/x.png"), 400, "image_url"),
    "javascript URL": (ask("javascript:alert(1)"), 400, "image_url"),
    "host not allowed": (ask("http://evil.example.org/x.png"), 400, "image_host_not_allowed"),
    "malformed URL": (ask("http://[::1/x.png"), 400, "image_url"),
    "loopback by name": (ask("http://localhost:1/x.png"), 400, "image_address_not_public"),
    "file outside the folder": (ask("file:///etc/hostname"), 400, "image_url"),
    "temperature -1": ({"model": MODEL, "messages": TEXT, "temperature": -1}, 400, "temperature"),
    "temperature 5": ({"model": MODEL, "messages": TEXT, "temperature": 5}, 400, "temperature"),
    "top_p 0": ({"model": MODEL, "messages": TEXT, "top_p": 0}, 400, "top_p"),
    "top_p 1.5": ({"model": MODEL, "messages": TEXT, "top_p": 1.5}, 400, "top_p"),
    "max_tokens 0": ({"model": MODEL, "messages": TEXT, "max_tokens": 0}, 400, "max_tokens"),
    "n 2": ({"model": MODEL, "messages": TEXT, "n": 2}, 400, "n"),
    "unknown dualfocus mode": ({"model": MODEL, "messages": TEXT, "dualfocus": {"mode": "zoom"}}, 400,
                               "dualfocus.mode"),
    "prompt beyond the context": ({"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 3000}],
                                   "max_tokens": 16}, 400, None),
    "reply beyond the context": ({"model": MODEL, "messages": TEXT, "max_tokens": 100_000}, 400, "max_tokens"),
    "unknown model": ({"model": "gpt-4o", "messages": TEXT}, 404, "model_not_found"),
}


def send_bad(server, name) -> httpx.Response:
    body, _, _ = BAD_REQUESTS[name]
    return post(server, content=body) if isinstance(body, bytes) else post(server, body)


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_each_bad_request_gets_an_openai_shaped_4xx(server, name):
    _, status, code_or_param = BAD_REQUESTS[name]
    r = send_bad(server, name)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if code_or_param is not None:
        assert code_or_param in (error["code"], error["param"])


def test_a_valid_request_after_every_kind_of_bad_one_succeeds(server):
    names = list(BAD_REQUESTS) * 2
    random.Random(5).shuffle(names)
    assert all(400 <= send_bad(server, name).status_code < 500 for name in names)
    image = scene(400, 300, seed=11)
    r = post(server, ask(data_url(image), "Where is the disc?", max_tokens=6, dualfocus={"return_trace": True}))
    assert r.status_code == 200, r.text
    body = r.json()
    trace = body["dualfocus"]
    assert body["choices"][0]["message"]["content"] == (
        trace["micro_answer"] if trace["chosen"] == "micro" else trace["macro_answer"])
    assert trace["box"]["outcome"] in ("ok", "degenerate") and trace["stages"]["macro"]["prompt_tokens"] > 500
    assert server.value("dualfocus_inflight_requests") == 0


# --- image URLs: never to loopback, link-local or private addresses, redirects included ---------

@pytest.fixture(scope="module")
def image_hosts(tmp_path_factory):
    """tests/image_host.py in a network namespace of its own, at a public address (routed to
    the namespace on this machine only) and at a private one; its log says which it served."""
    folder = tmp_path_factory.mktemp("image_hosts")
    scene(480, 360, seed=4).save(folder / "scene.png")
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"dfimg{tag}", f"dfi{tag}a", f"dfi{tag}b"
    subnet_host = PRIVATE_IMAGE_HOST.rsplit(".", 1)[0] + ".1"

    def run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True)

    def inside(*cmd):
        run("ip", "netns", "exec", ns, *cmd)

    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        run("ip", "link", "set", there, "netns", ns)
        run("ip", "addr", "add", f"{subnet_host}/24", "dev", here)
        run("ip", "link", "set", here, "up")
        inside("ip", "addr", "add", f"{PRIVATE_IMAGE_HOST}/24", "dev", there)
        inside("ip", "addr", "add", f"{PUBLIC_IMAGE_HOST}/32", "dev", there)
        inside("ip", "link", "set", there, "up")
        inside("ip", "link", "set", "lo", "up")
        inside("ip", "route", "add", "default", "via", subnet_host)
        run("ip", "route", "add", f"{PUBLIC_IMAGE_HOST}/32", "via", PRIVATE_IMAGE_HOST)
        log = folder / "requests.log"
        log.touch()
        image_host = str(Path(__file__).with_name("image_host.py"))
        host = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, image_host,
                                 "8080", str(log), str(folder / "scene.png")])
        for _ in range(100):
            try:
                httpx.get(f"http://{PUBLIC_IMAGE_HOST}:8080/ready", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        log.write_text("")
        yield log
        host.kill()
        host.wait()
    finally:
        subprocess.run(["ip", "route", "del", f"{PUBLIC_IMAGE_HOST}/32"], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


def requests_seen(log: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()]


@pytest.mark.root
def test_an_image_from_an_allowed_public_host_is_fetched(server, image_hosts):
    r = post(server, ask(f"http://{PUBLIC_IMAGE_HOST}:8080/scene.png", max_tokens=6,
                         dualfocus={"return_trace": True}))
    assert r.status_code == 200, r.text
    box = r.json()["dualfocus"]["box"]["pixels"]
    assert 0 <= box[0] <= box[2] <= 480 and 0 <= box[1] <= box[3] <= 360  # in the fetched image's pixels
    assert requests_seen(image_hosts) == [(PUBLIC_IMAGE_HOST, "/scene.png")]


@pytest.mark.root
@pytest.mark.parametrize("target,code", [
    # All on the server's allow-list: only the address policy stands in the way.
    (f"http://{PRIVATE_IMAGE_HOST}:8080/scene.png", "image_address_not_public"),
    ("http://127.0.0.1:8080/scene.png", "image_address_not_public"),
    ("http://[::1]:8080/scene.png", "image_address_not_public"),
    ("http://169.254.169.254/latest/meta-data/", "image_address_not_public"),  # cloud metadata
    ("file:///etc/passwd", "image_url"),
])
def test_no_request_reaches_an_internal_address_directly_or_by_redirect(server, image_hosts, target, code):
    image_hosts.write_text("")
    for url in (target, f"http://{PUBLIC_IMAGE_HOST}:8080/to?url={target}"):
        r = post(server, ask(url))
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    # The redirect was fetched from the public address; nothing ever reached the private one.
    assert requests_seen(image_hosts) == [(PUBLIC_IMAGE_HOST, f"/to?url={target}")]


# --- logs --------------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (\d+) \[([^\]\s]+)\] \S+: ")


def test_every_log_line_carries_a_request_id(server):
    request_id = f"log-check-{uuid.uuid4().hex[:8]}"
    r = post(server, ask(GOOD_IMAGE), headers={**AUTH, "X-Request-Id": request_id})
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    time.sleep(0.5)
    lines = (server.media_dir / "server.log").read_text().splitlines()
    # No line in uvicorn's or vLLM's own formats: every logger goes through ours.
    foreign = re.compile(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL)(:\s| \d\d-\d\d )")
    assert not [line for line in lines if foreign.match(line)]
    records = [line for line in lines if re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)]
    assert records and all(LOG_LINE.match(line) for line in records), \
        [line for line in records if not LOG_LINE.match(line)][:3]
    ours = [line for line in records if f"[{request_id}]" in line]
    assert any("dualfocus.requests: dualfocus request ok" in line for line in ours)
    assert any('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in ours)
    # vLLM's engine processes log in the same format (always "-": request ids stay in this process).
    assert len({LOG_LINE.match(line).group(1) for line in records}) >= 2


def test_a_request_id_that_is_not_an_id_is_replaced(server):
    r = httpx.get(server.base_url + "/health", headers={"X-Request-Id": "x\" [admin] forged=1"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_logs_hold_no_image_bytes_and_no_keys(server):
    image_url = data_url(scene(352, 288, seed=21))
    secret = "sk-wrong-" + uuid.uuid4().hex
    assert post(server, ask(image_url), headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert post(server, ask(image_url)).status_code == 200
    assert post(server, ask(image_url[:-40] + "!!!!")).status_code == 400  # bad base64: logged as refused
    time.sleep(0.5)
    text = (server.media_dir / "server.log").read_text()
    payload = image_url.split(",", 1)[1]
    assert not any(payload[i:i + 24] in text for i in range(0, len(payload) - 24, 24))
    assert secret not in text and RunningServer.API_KEY not in text


def test_images_are_never_written_to_disk(server):
    writes_log = server.media_dir / "writes.log"  # every file the server's processes opened for writing
    before = len(writes_log.read_text().splitlines())
    assert before, "the audit hook saw nothing (is it installed?)"
    rng = random.Random(7)
    images = [Image.frombytes("RGB", (320, 240), rng.randbytes(320 * 240 * 3)) for _ in range(3)]  # noise
    for image in images:
        assert post(server, ask(data_url(image))).status_code == 200
    written = {line.split(" ", 1)[1] for line in writes_log.read_text().splitlines()[before:]}
    # While serving, only devices and shared memory (vLLM's inter-process buffers, not disks) and
    # torch's kernel cache may be written, and nothing written may hold any part of an image.
    assert all(p.startswith(("/dev/", "/proc/", "/tmp/torchinductor_")) for p in written), written
    on_disk = [Path(p) for p in written if not p.startswith(("/dev/", "/proc/")) and Path(p).is_file()]
    fingerprints = [raw[i:i + 48] for raw in (image.tobytes() for image in images) for i in (0, 100_000, 200_000)]
    fingerprints += [base64.b64decode(data_url(image).split(",", 1)[1])[100:148] for image in images]
    for path in on_disk:
        content = path.read_bytes()
        assert not any(f in content for f in fingerprints), f"{path} holds image bytes"


# --- authentication ----------------------------------------------------------------------------

def test_every_v1_route_needs_the_key_and_only_ops_routes_are_open(server):
    paths = httpx.get(server.base_url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(paths)
    for path, operations in paths.items():
        for method in operations:
            for headers in ({}, {"Authorization": "Bearer " + RunningServer.API_KEY[:-1] + "X"},
                            {"Authorization": RunningServer.API_KEY}):  # no scheme
                r = httpx.request(method, server.base_url + path, json={}, headers=headers)
                if path.startswith("/v1/"):
                    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
                else:
                    assert r.status_code == 200, path
