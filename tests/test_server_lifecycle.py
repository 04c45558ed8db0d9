"""Starting and stopping the service as a supervisor would."""

import asyncio
import signal

import httpx
import pytest

from .conftest import start_server

pytestmark = pytest.mark.server


async def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path):
    running = start_server(tmp_path, "--drain-seconds", "20")
    # ignore_eos: the random-weight model's answer runs to max_tokens, long enough to be in flight at SIGTERM.
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 300,
            "ignore_eos": True}
    async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as http:
        request = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await asyncio.to_thread(running.value, "dualfocus_inflight_requests") == 1:
                break
        assert not request.done(), "the request must still be in flight when SIGTERM arrives"
        running.process.send_signal(signal.SIGTERM)
        response = await request
    assert response.status_code == 200
    reply = response.json()
    # The whole answer: it ran to max_tokens, not cut off by the shutdown.
    assert reply["usage"]["completion_tokens"] == 300 and reply["choices"][0]["finish_reason"] == "length"
    assert await asyncio.to_thread(running.process.wait, 60) == 0


def test_engine_death_turns_health_503_then_exits_non_zero(tmp_path):
    import os
    import subprocess
    import time

    running = start_server(tmp_path)
    children = subprocess.run(["pgrep", "-P", str(running.process.pid)], capture_output=True, text=True).stdout.split()
    engine_core = [pid for pid in children
                   if "EngineCore" in open(f"/proc/{pid}/comm").read() or "VLLM" in open(f"/proc/{pid}/comm").read()]
    assert engine_core, f"no engine core among {children}"
    os.kill(int(engine_core[0]), signal.SIGKILL)
    statuses, t0 = [], time.time()
    while time.time() - t0 < 10 and 503 not in statuses:
        try:
            statuses.append(httpx.get(running.base_url + "/health", timeout=2).status_code)
        except httpx.TransportError:
            break
        time.sleep(0.2)
    assert 503 in statuses, statuses
    assert running.process.wait(timeout=60) != 0
