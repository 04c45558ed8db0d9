from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from engine.tiny import ensure_tiny


@pytest.fixture(scope="session")
def tiny_llava_path():
    return ensure_tiny("tiny-llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_path():
    return ensure_tiny("tiny-qwen2-vl")


def scene(width=640, height=480, seed=0):
    """A synthetic scene: coloured shapes on grey, varied by seed."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 10, height // 6, width // 3, height // 2), fill=(200 - 7 * seed % 200, 30, 30))
    disc = (width // 2, height // 2, width - width // 8, height - height // 10)
    draw.ellipse(disc, fill=(30, 60 + 11 * seed % 190, 220))
    return image


def data_url(image, fmt="PNG") -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


# The image hosts of tests/test_reliability.py, in a network namespace: one at a public address
# (routed to the namespace on this machine only) and one at a private address. Both are on the
# session server's allow-list (with loopback and the cloud metadata address), so only the
# address policy keeps it from the private ones.
PUBLIC_IMAGE_HOST = "93.184.215.14"
PRIVATE_IMAGE_HOST = "10.213.0.2"


class RunningServer:
    """`dualfocus serve` in a subprocess, as users run it."""

    API_KEY = "test-key"

    def __init__(self, port: int, process, health_statuses: list[int], media_dir):
        # media_dir: the server's --allowed-local-media-path (its own folder)
        self.port, self.process, self.health_statuses, self.media_dir = port, process, health_statuses, media_dir
        self.base_url = f"http://127.0.0.1:{port}"

    def metrics(self) -> dict:
        """Samples of /metrics by (name, sorted labels)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels) -> float:
        return sum(v for (n, ls), v in self.metrics().items()
                   if n == name and all(dict(ls).get(k) == str(w) for k, w in labels.items()))


def start_server(folder, *args: str) -> RunningServer:
    """Start `dualfocus serve` on a free port with tiny-llava; returns once /health is 200.
    Its log is folder/server.log; the files it opened for writing, folder/writes.log."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    env = {**os.environ, "DUALFOCUS_TEST_WRITES_LOG": str(folder / "writes.log")}
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("audited_serve.py")), "serve",
                                "--port", str(port), "--kv-cache-gib", "1", *args],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    statuses = []
    deadline = time.time() + 240
    while time.time() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}; see {log.name}"
        try:
            statuses.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code)
            if statuses[-1] == 200:
                return RunningServer(port, process, statuses, folder)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server not ready in time; see {log.name}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server for the session: an API key and small limits so tests can reach them."""
    folder = tmp_path_factory.mktemp("server")
    running = start_server(
        folder, "--api-key", RunningServer.API_KEY, "--max-inflight-requests", "4", "--max-image-pixels", "1000000",
        "--max-body-bytes", "4000000", "--drain-seconds", "5",
        "--allowed-image-domains",
        f"localhost,images.example,{PUBLIC_IMAGE_HOST},{PRIVATE_IMAGE_HOST},127.0.0.1,::1,169.254.169.254",
        "--allowed-local-media-path", str(folder))
    yield running
    running.process.terminate()
    running.process.wait(timeout=60)


def pytest_collection_modifyitems(config, items):
    """A test that uses the session server is a server test even if its file forgot to say so:
    `make test-fast` (which deselects server and engine tests) must never start one."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()) and item.get_closest_marker("server") is None:
            item.add_marker(pytest.mark.server)
