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


@pytest.mark.server
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


@pytest.mark.server
def test_vllms_own_load_tool_runs_against_this_service(server, tiny_llava_path):
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "loadtests.vllm_bench", "--backend", "openai-chat", "--base-url", server.base_url,
         "--endpoint", "/v1/chat/completions", "--model", "tiny-llava", "--tokenizer", str(tiny_llava_path),
         "--dataset-name", "random-mm", "--num-prompts", "6", "--max-concurrency", "3", "--random-input-len", "16",
         "--random-output-len", "8", "--random-mm-base-items-per-request", "1",
         "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
         "--random-mm-bucket-config", "{(336, 336, 1): 1.0}",
         # Fixed output lengths, as vLLM's benchmarks run: a random-weight model's answer may otherwise be
         # empty, which vllm bench counts as a failed request.
         "--ignore-eos"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OPENAI_API_KEY": RunningServer.API_KEY})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line.split(":")[-1].strip() for line in out.stdout.splitlines() if ":" in line}
    assert lines["Successful requests"] == "6" and lines["Failed requests"] == "0"


def test_folder_of_images_with_a_questions_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(
        '{"image": "a.png", "text": "What colour?"}\n\n{"image": "a.png", "question": "Why?"}\n'
    )
    items = scenes.from_folder(tmp_path, tmp_path / "q.jsonl")
    assert [(i.question, i.width, i.height) for i in items] == [("What colour?", 64, 48), ("Why?", 64, 48)]
    assert scenes.from_data_url(items[0].image_url).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.server
async def test_streamed_load_measures_time_to_first_token(server):
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=RunningServer.API_KEY, max_retries=0)
    send = request_fn("ours", client, "tiny-llava", "macro", 8, stream=True)
    samples, wall = await run_load(send, scenes.synthetic(3, seed=5), concurrency=3, requests=3, progress=False)
    summary = summarize(samples, wall)
    assert summary["ok"] == 3 and 0 < summary["ttft_s"]["p50"] <= summary["latency_s"]["p50"]
    await client.close()


def test_the_auto_sweep_compares_medians_and_counts_zooms():
    from loadtests.auto_sweep import compare, configurations, parse_configurations

    assert [c[0] for c in configurations([(0.0, None), (0.5, None)])] == ["macro", "dualfocus", "auto@0", "auto@0.5"]
    # T/C: the multiple-choice threshold of the configuration; T alone: --choice-threshold's (None: the server's).
    pairs = parse_configurations("0.496/0, 0.3,1/1", choice=0.25)
    assert pairs == [(0.496, 0.0), (0.3, 0.25), (1.0, 1.0)]
    assert [c[0] for c in configurations(pairs)][2:] == ["auto@0.496/0", "auto@0.3/0.25", "auto@1/1"]
    assert configurations(pairs)[2] == ("auto@0.496/0", "auto", 0.496, 0.0)
    for bad in ("0.5/", "0.5/2", "x", "0.1/0.2/0.3", ""):
        assert parse_configurations(bad, None) == []

    def run(rps, zoom=None):
        out = {"requests_per_s": rps, "latency_s": {"p50": 1 / rps}, "requests": 10, "ok": 10}
        return {**out, "zoom": zoom} if zoom else out

    table = compare({"macro": [run(10), run(12)], "dualfocus": [run(4), run(6)],
                     "auto@0.5": [run(8, {"zoomed": 3, "skipped": 7, "why": {"confident": 6, "box unparsed": 1},
                                         "box_aborted": 5}),
                                  run(8, {"zoomed": 5, "skipped": 5, "why": {"confident": 5}, "box_aborted": 2})]})
    assert table["macro"]["requests_per_s_median"] == 11 and table["dualfocus"]["vs_macro"] == round(5 / 11, 3)
    auto = table["auto@0.5"]
    assert auto["vs_dualfocus"] == 1.6 and auto["zoomed_share"] == 0.4 and auto["box_aborted"] == 7
    assert auto["why"] == {"confident": 11, "box unparsed": 1} and "zoomed_share" not in table["macro"]
