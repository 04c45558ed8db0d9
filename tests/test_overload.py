"""Overload (issue 5), the short version of `make soak`: 4x the sustainable rate for 20 s against
the test server (in-flight limit 4) must leave it up, with every request completed or refused
with 429 + Retry-After, memory and latency bounded, and nothing left in flight."""

import pytest

from loadtests.soak import overload

from .conftest import RunningServer

pytestmark = pytest.mark.server


async def test_four_times_the_sustainable_rate_is_refused_politely(server):
    result = await overload(server.base_url, RunningServer.API_KEY, server.process.pid, factor=4, duration=20,
                            max_inflight=4, progress=False)
    assert result["checks"] == {name: True for name in result["checks"]}, result
    assert result["completed"] + result["refused_429"] == result["sent"] and result["completed"] > 0
    assert server.process.poll() is None
