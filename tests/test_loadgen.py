"""The load generator against a running server: closed and open loop, summaries from traces."""

import openai
import pytest

from loadtests import scenes
from loadtests.loadgen import request_fn, run_load, summarize
from loadtests.systems import _reply_nll

from .conftest import RunningServer


def test_reply_nll_reads_the_trailing_tokens_that_spell_the_reply():
    rows = [None, {"5": {"logprob": -9.0, "decoded_token": "Q:"}}, {"7": {"logprob": -1.0, "decoded_token": " re"}},
            {"8": {"logprob": -3.0, "decoded_token": "d"}}]
    assert _reply_nll(rows, " red") == pytest.approx(2.0)


def test_synthetic_scenes_are_distinct_and_sized():
    items = scenes.synthetic(8)
    assert len({i.image_url for i in items}) == 8
    assert {(i.width, i.height) for i in items} == set(scenes.SIZES)


@pytest.mark.engine
@pytest.mark.parametrize("loop", [{"concurrency": 2}, {"rate": 20.0}])
async def test_load_against_this_service(server, loop):
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=RunningServer.API_KEY, max_retries=0)
    send = request_fn("ours", client, "tiny-llava", "dualfocus", 6, stream=False)
    samples, wall = await run_load(send, scenes.synthetic(4, seed=3), requests=4, progress=False, **loop)
    summary = summarize(samples, wall)
    assert summary["ok"] == 4 and summary["errors"] == {}
    assert summary["requests_per_s"] > 0 and summary["latency_s"]["p50"] > 0
    assert summary["stages"]["box"]["count"] == 4
    if "micro" in summary["stages"]:
        assert summary["stages"]["micro"]["cached_ratio"] > 0.4  # the full-image prefix came from the cache
    assert summary["computed_prompt_tokens_per_request"] < summary["prompt_tokens_per_request"]
    await client.close()
